"""Load test of serve.py's predict endpoint on loopback: requests per second and p95 latency with 1 and 4
concurrent clients, failed requests, and the server's memory (RSS) before and after.

    python bench/serve_bench.py --run WORK/bench/runs/single [--requests 40] [--max-seconds 300] [--table FILE]

Starts serve.py on a free loopback port (--port 0), sends skimage's astronaut photo (a 512x512 JPEG) from
each client in a loop (one request at a time per client, keep-alive), bounded by --requests per setting and
--max-seconds in all, then stops the server. The server predicts one photo at a time (the CPU's cores are
the models'), so 4 clients queue: their requests per second is about one client's, their latency 4x.
Memory: the server's RSS after start, after warming up and after each round (--rounds 2: flat if the second
round adds nothing). Exit code 1 if any request failed.
"""

import argparse
import http.client
import io
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from table import bench_rows  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--run", required=True, help="a trained run")
parser.add_argument("--crops", default=None, help="serve.py --crops (default: the run's)")
parser.add_argument("--tta", default="flip", help="serve.py --tta")
parser.add_argument("--threads", default="1", help="serve.py --threads")
parser.add_argument("--use-folds", default="all", help="serve.py --use-folds")
parser.add_argument("--clients", type=int, nargs="+", default=[1, 4], help="concurrent clients, one setting each")
parser.add_argument("--requests", type=int, default=40, help="requests per setting and round (after 3 to warm up)")
parser.add_argument("--rounds", type=int, default=2, help="every setting again: the server's memory after each round")
parser.add_argument("--max-seconds", type=float, default=300, help="the whole load, at most (then it stops)")
parser.add_argument("--table", default=None, help="append the figures to this markdown table (make bench)")
args = parser.parse_args()


def photo():
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def start_server(log):
    cmd = [sys.executable, str(HERE.parent / "serve.py"), "--run", args.run, "--port", "0"]
    cmd += ["--tta", args.tta, "--threads", args.threads, "--use-folds", args.use_folds]
    cmd += ["--crops", args.crops] if args.crops else []
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        found = re.findall(r"serving http://127\.0\.0\.1:(\d+)/", Path(log.name).read_text())
        if found:
            return proc, int(found[0])
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"serve.py did not start:\n{Path(log.name).read_text()[-2000:]}")


def load(port, body, clients, n, deadline):
    """n requests from `clients` threads; returns latencies (s), failures, wall seconds."""
    latencies, failures, lock, sent = [], [], threading.Lock(), [0]

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.time() < deadline:
            with lock:
                if sent[0] >= n:
                    break
                sent[0] += 1
            t = time.perf_counter()
            try:
                conn.request("POST", "/api/predict", body=body, headers={"Content-Type": "application/octet-stream"})
                response = conn.getresponse()
                answer = response.read()
                ok = response.status == 200 and b'"answer"' in answer
                if ok:
                    stages.append(json.loads(answer)["seconds"])
            except OSError as e:
                ok, answer = False, str(e).encode()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            with lock:
                (latencies if ok else failures).append(time.perf_counter() - t if ok else answer[:200])
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, failures, time.perf_counter() - t0


def rss_mb(proc):
    return psutil.Process(proc.pid).memory_info().rss / 2**20


body = photo()
stages = []  # the server's own time per step of each answer
with tempfile.NamedTemporaryFile("w+", prefix="serve_bench_", suffix=".log") as log:
    proc, port = start_server(log)
    try:
        deadline = time.time() + args.max_seconds
        started = rss_mb(proc)
        _, failed, _ = load(port, body, 1, 3, deadline)
        info = re.search(r"(\d+) model\(s\) \((.*?)\), (\S+) at (\d+) px", Path(log.name).read_text()).groups()
        memory = [("after start", started), ("after 3 to warm up", rss_mb(proc))]
        runs = {c: ([], [], 0.0) for c in args.clients}  # clients -> latencies, failures, seconds
        for r in range(args.rounds):
            for clients in args.clients:
                latencies, failures, wall = load(port, body, clients, args.requests, deadline)
                print(f"round {r + 1}, {clients} client(s): {len(latencies)} answered, {len(failures)} failed "
                      f"in {wall:.1f}s", flush=True)  # fmt: skip
                before = runs[clients]
                runs[clients] = (before[0] + latencies, before[1] + failures, before[2] + wall)
                failed += failures
            memory.append((f"after round {r + 1}", rss_mb(proc)))
    finally:
        proc.terminate()
        proc.wait(30)

n_models, names, backbone, size = info
print(f"\n{args.run}: {n_models} model(s) ({names}), {backbone} at {size} px, tta {args.tta}, "
      f"{args.threads} thread(s); photo 512x512 JPEG")  # fmt: skip
rows = []
for clients, (latencies, failures, wall) in runs.items():
    p50 = statistics.median(latencies) if latencies else float("nan")
    p95 = float(np.percentile(latencies, 95)) if latencies else float("nan")
    rows.append((clients, len(latencies), len(failures), len(latencies) / max(wall, 1e-9), p50, p95))
print(f"{'clients':>7} {'answered':>8} {'failed':>6} {'req/s':>6} {'p50 ms':>7} {'p95 ms':>7}")
for clients, done, bad, rps, p50, p95 in rows:
    print(f"{clients:>7} {done:>8} {bad:>6} {rps:>6.2f} {1000 * p50:>7.0f} {1000 * p95:>7.0f}")
step_ms = {k: 1000 * statistics.median(s[k] for s in stages) for k in stages[0]} if stages else {}
print("server's median per photo: " + ", ".join(f"{k} {v:.0f} ms" for k, v in step_ms.items()))
print("server RSS: " + ", ".join(f"{what} {mb:.0f} MB" for what, mb in memory))
for reason in sorted(set(failed)):
    print(f"failed {failed.count(reason)}x: {reason.decode(errors='replace')}")
what = f"serve.py predict ({backbone} {size} px x{n_models}, tta {args.tta}, {args.threads} thread(s))"
bench_rows(args.table, [
    *((f"{what}, {c} client(s)", f"{rps:.2f} req/s, p95 {1000 * p95:.0f} ms, {bad} failed")
      for c, _, bad, rps, _, p95 in rows),
    ("serve.py RSS " + " / ".join(w for w, _ in memory[1:]), " / ".join(f"{mb:.0f}" for _, mb in memory[1:]) + " MB"),
])  # fmt: skip
sys.exit(1 if failed else 0)
