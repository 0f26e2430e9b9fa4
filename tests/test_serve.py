"""serve.py end to end: a tiny trained run served on a free loopback port, its two pages driven in headless
Chromium (Debian's /usr/bin/chromium through Playwright: no browser download). Screenshots of each page go
to the test's tmp folder and to /tmp/serve/ (not committed)."""

import http.client
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from conftest import REPO, last_line, run
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.is_file(), reason="/usr/bin/chromium not here (apt-get install chromium)"
)
pytestmark = pytest.mark.trains  # every test here serves a tiny run trained first
SHOTS_DIR = Path("/tmp/serve")
LIMIT_MB = 2  # the server's --max-upload-mb here: a 3 MB file is the oversized one


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """12 demo persons cropped (train only: the pages need no eval crops), two folds of a tiny model."""
    work = tmp_path_factory.mktemp("serve")
    run("tools/make_demo_data.py", "--out", work / "data", "--persons", 12, "--eval-persons", 1, "--seed", 3)
    run("preprocess.py", "--data", work / "data", "--out", work / "crops", "--workers", 1, "--size", 48,
        "--splits", "train")  # fmt: skip
    run("split.py", "--crops", work / "crops", "--folds", 3, "--out", work / "folds.csv")
    for fold in (0, 1):
        run("train_multi.py", "--crops", work / "crops", "--folds", work / "folds.csv", "--fold", fold, "--out",
            work / "run", "--backbone", "test_efficientnet", "--pretrained", "none", "--img-size", 32,
            "--batch-size", 16, "--epochs", 1, "--threads", 1)  # fmt: skip
    return work


def sure_stacker(path):
    """An embedding stacker (ensemble.py's _embedding.npz) sure of female, 30-59 whatever the face: fitted on noise
    nearly all labelled 4 (gender * 3 + age band), voting with weight 2."""
    import numpy as np

    import stacking

    rng = np.random.default_rng(0)
    target = np.where(rng.random(600) < 0.95, 4, rng.integers(0, 6, 600))
    stacking.save_stacker(path, stacking.fit(rng.normal(size=(600, 128)), target), 2.0)
    return path


@pytest.fixture(scope="module")
def server(tiny):
    """serve.py on port 0 (the system picks a free one; the server prints it), every person listed, with an
    embedding stacker that votes female, 30-59."""
    log = tiny / "server.log"
    cmd = [sys.executable, str(REPO / "serve.py"), "--run", tiny / "run", "--crops", tiny / "crops", "--port", 0,
           "--min-conf", 0, "--max-upload-mb", LIMIT_MB, "--draft", tiny / "relabel_draft.csv",
           "--embedding", sure_stacker(tiny / "sub_embedding.npz")]  # fmt: skip
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen(list(map(str, cmd)), cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    url = None
    deadline = time.time() + 180
    while url is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        url = next(iter(re.findall(r"serving (http://127\.0\.0\.1:\d+)/", log.read_text())), None)
    if url is None:
        proc.kill()
        pytest.fail(f"serve.py did not start:\n{log.read_text()[-3000:]}")
    host, port = url.removeprefix("http://").split(":")
    for _ in range(100):  # listening a moment after the line
        try:
            if get(host, int(port), "/api/info")[0] == 200:
                break
        except OSError:
            time.sleep(0.1)
    yield SimpleNamespace(url=url, host=host, port=int(port), proc=proc, log=log, work=tiny)
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1200, "height": 900})  # fmt: skip
        yield context
        context.close()


def get(host, port, path):
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read()


def screenshot(page, tmp_path, name):
    path = tmp_path / name
    page.wait_for_load_state("networkidle")  # the images in view have arrived
    page.screenshot(path=path)
    SHOTS_DIR.mkdir(exist_ok=True)
    shutil.copy(path, SHOTS_DIR / name)


def test_help_missing_run_and_port_in_use_are_one_line(tiny, tmp_path):
    import socket

    assert "--max-upload-mb" in run("serve.py", "--help").stdout
    for bad in (tmp_path / "nowhere", tmp_path):  # no folder; a folder without models
        proc = run("serve.py", "--run", bad, "--port", 0, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and str(bad) in last_line(proc.stderr)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = run("serve.py", "--run", tiny / "run", "--port", taken.getsockname()[1], check=False)
    assert proc.returncode == 2 and "cannot listen" in last_line(proc.stderr)


@needs_chromium
def test_predict_page_answers_with_bars_and_heat_map_and_explains_bad_uploads(server, browser, tmp_path):
    from skimage import data

    photo, no_face, text = tmp_path / "astronaut.jpg", tmp_path / "coffee.jpg", tmp_path / "notes.txt"
    Image.fromarray(data.astronaut()).save(photo, quality=90)
    Image.fromarray(data.coffee()).save(no_face, quality=90)
    text.write_text("not a photo\n")
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector("#limits:not(:empty)")  # the page knows the limit

    page.set_input_files("#file", text)  # a text file: a clear message
    page.wait_for_selector("#error:not([hidden])")
    assert "not an image" in page.inner_text("#error") and page.is_hidden("#result")
    screenshot(page, tmp_path, "predict_error.png")
    big = dict(name="big.jpg", mimeType="image/jpeg", buffer=b"\xff" * (LIMIT_MB + 1) * 2**20)
    page.set_input_files("#file", big)  # over the limit: refused before it is sent
    page.wait_for_selector("#error:has-text('limit')")
    assert f"limit is {LIMIT_MB:.1f} MB" in page.inner_text("#error")
    page.set_input_files("#file", no_face)  # no face: the fallback crop, said so
    page.wait_for_selector("#note:not([hidden])", timeout=60_000)
    assert "No face found" in page.inner_text("#note")

    page.set_input_files("#file", photo)  # after all that, the server still answers
    page.wait_for_selector("#note[hidden]", state="attached", timeout=60_000)
    page.wait_for_selector("#result:not([hidden])")
    answer = page.inner_text("#answer")
    assert re.fullmatch(
        r"(wear|incorrect|not_wear)/(male|female)/(<30|30-59|>=60) \(class \d+\), p = [01]\.\d\d", answer
    )
    widths = "rows => rows.map(r => [r.dataset.task, parseFloat(r.querySelector('.fill').style.width)])"
    bars = page.eval_on_selector_all(".bar", widths)
    assert [task for task, _ in bars] == ["mask"] * 3 + ["gender"] * 2 + ["age"] * 3
    for task in ("mask", "gender", "age"):  # each task's bars are its probabilities: they add up to 100 %
        assert abs(sum(w for t, w in bars if t == task) - 100) < 1
    sizes = page.eval_on_selector_all("#crop, #cam", "imgs => imgs.map(i => i.naturalWidth)")
    assert sizes == [48, 48]  # the crop at the crops' size, and the heat map over it
    screenshot(page, tmp_path, "predict.png")

    gender, age = ([w for t, w in bars if t == task] for task in ("gender", "age"))
    assert gender[1] > 90 and age[1] > 90  # female, 30-59: the embedding's vote shows
    assert "gender and age: embedding voted (weight 2, " in page.inner_text("#timing")  # and the page says so

    # the page prepares and predicts a photo as inference.py --image --embedding does
    line = last_line(run("inference.py", "--run", server.work / "run", "--crops", server.work / "crops",
                         "--image", photo, "--embedding", server.work / "sub_embedding.npz").stdout)  # fmt: skip
    cls, p = re.search(r"class (\d+) \(.*\) p=([\d.]+)", line).groups()
    assert f"(class {cls})" in answer and abs(float(answer.rsplit(" ", 1)[1]) - float(p)) <= 0.011
    page.close()


def test_uploads_over_the_limit_are_refused_unread(server):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.putrequest("POST", "/api/predict")  # says 50 MB and sends none: answered from the header alone
    conn.putheader("Content-Length", str(50 * 2**20))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and b"50.0 MB" in response.read()
    conn.close()
    chunks = (b"\xff" * 2**16 for _ in range(3 * 16))  # 3 MB with no length given: cut off at the limit
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    conn.request("POST", "/api/predict", body=chunks, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413 and b"limit" in response.read()
    conn.close()
    assert get(server.host, server.port, "/api/info")[0] == 200 and server.proc.poll() is None


@needs_chromium
def test_audit_page_marks_a_fix_into_a_draft_preprocess_reads(server, browser, tmp_path):
    page = browser.new_page()
    page.goto(server.url + "/audit")
    page.wait_for_selector("#persons[data-ready='true']")
    cards = page.locator("section.person")
    assert cards.count() >= 1 and page.locator("section.person .shot img").count() >= 7
    person = cards.first.get_attribute("data-person")
    labelled = re.search(r"labelled (male|female)", cards.first.locator("h2").inner_text()).group(1)
    other = "female" if labelled == "male" else "male"
    gender = f"section.person[data-person='{person}'] button.fix[data-field='gender']"
    page.click(gender)
    page.wait_for_selector(gender + "[aria-pressed='true']")
    draft_path = server.work / "relabel_draft.csv"
    assert page.inner_text("#draft-path") == str(draft_path)
    screenshot(page, tmp_path, "audit.png")

    draft = pd.read_csv(draft_path, dtype=str, keep_default_na=False)
    base = pd.read_csv(REPO / "relabel.csv", dtype=str, keep_default_na=False)
    assert draft.columns.tolist() == ["id", "field", "old", "new", "note"]
    assert draft.iloc[: len(base)].equals(base)  # the fixes the crops were made with come first
    mark = draft.iloc[len(base) :]
    assert mark[["id", "field", "old", "new"]].values.tolist() == [[person, "gender", labelled, other]]
    assert not list(draft_path.parent.glob(".*.tmp*"))  # written through a temporary file, renamed

    # the real reader takes it: preprocess.py --relabel applies the fix (the finished crops are reused)
    crops = tmp_path / "crops"
    shutil.copytree(server.work / "crops", crops)
    proc = run("preprocess.py", "--data", server.work / "data", "--out", crops, "--workers", 1, "--size", 48,
               "--splits", "train", "--relabel", draft_path)  # fmt: skip
    assert f"{person}: gender {labelled} -> {other}" in proc.stdout
    index = pd.read_csv(crops / "train.csv", dtype={"person_id": str})
    assert (index.loc[index["person_id"] == person, "gender"] == ("male", "female").index(other)).all()

    page.click(gender)  # a second click takes the mark back
    page.wait_for_selector(gender + "[aria-pressed='false']")
    assert len(pd.read_csv(draft_path, dtype=str)) == len(base)
    status, body = get(server.host, server.port, "/api/crop/0")
    assert status == 200 and body[:2] == b"\xff\xd8"  # a JPEG thumbnail of the crop
    page.close()


def test_fix_requests_are_checked_and_other_sites_refused(server):
    import json

    def post(body, headers=None):
        conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
        conn.request("POST", "/api/fix", body=json.dumps(body), headers={"Content-Type": "application/json",
                                                                          **(headers or {})})  # fmt: skip
        response = conn.getresponse()
        return response.status, response.read().decode()

    assert post(dict(person_id="../../etc", field="gender", new="male"))[0] == 400
    index = pd.read_csv(server.work / "crops" / "train.csv", dtype={"person_id": str})
    person = index["person_id"].iloc[0]
    assert post(dict(person_id=person, field="age", new="old"))[0] == 400
    assert post(dict(person_id=person, field="swap", old="mask1", new="/etc/passwd"))[0] == 400
    assert post(dict(person_id=person, field="age", new="61"), {"Origin": "http://example.com"})[0] == 403
    draft = server.work / "relabel_draft.csv"
    assert not draft.is_file() or person not in pd.read_csv(draft, dtype=str)["id"].tolist()
