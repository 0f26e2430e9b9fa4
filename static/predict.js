"use strict";
// The predict page: send the photo's bytes (no form, no file name), show the answer the server returns.
const $ = (id) => document.getElementById(id);
let maxBytes = 0;

fetch("/api/info").then((r) => r.json()).then((info) => {
  maxBytes = info.max_upload_bytes;
  $("run").textContent = `${info.run}: ${info.models.length} model(s), ${info.backbone} at ${info.img_size} px, TTA ${info.tta}`;
  $("limits").textContent = `JPEG or PNG, up to ${(maxBytes / 2 ** 20).toFixed(0)} MB. Nothing is stored.`;
});

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function showError(text) {
  $("status").textContent = "";
  $("result").hidden = true;
  $("error").textContent = text;
  $("error").hidden = false;
}

async function send(file) {
  $("error").hidden = true;
  if (maxBytes && file.size > maxBytes) {
    const mb = (n) => (n / 2 ** 20).toFixed(1);
    showError(`This file is ${mb(file.size)} MB: the limit is ${mb(maxBytes)} MB. Send a smaller copy of the photo.`);
    return;
  }
  $("status").textContent = `Predicting ${file.name}…`;
  let response;
  try {
    response = await fetch("/api/predict", {method: "POST", body: file, headers: {"Content-Type": "application/octet-stream"}});
  } catch (e) {
    showError(`The server did not answer (${e.message}).`);
    return;
  }
  const out = await response.json().catch(() => ({error: `The server answered ${response.status}.`}));
  if (!response.ok || out.error) {
    showError(out.error || `The server answered ${response.status}.`);
    return;
  }
  render(out, file.name);
}

function render(out, name) {
  $("status").textContent = `${name}:`;
  $("crop").src = out.crop;
  $("cam").src = out.cam;
  $("answer").textContent = `${out.answer.name} (class ${out.answer.cls}), p = ${out.answer.p.toFixed(2)}`;
  $("note").textContent = out.note;
  $("note").hidden = !out.note;
  $("top").textContent = "Top 3: " + out.top.map((t) => `${t.name} ${t.p.toFixed(2)}`).join(", ");
  const bars = $("bars");
  bars.replaceChildren();
  for (const [task, rows] of Object.entries(out.bars)) {
    bars.append(el("h3", null, task));
    const best = Math.max(...rows.map((r) => r.p));
    for (const {name: label, p} of rows) {
      const row = el("div", p === best ? "bar best" : "bar");
      row.dataset.task = task;
      const fill = el("div", "fill");
      fill.style.width = `${(100 * p).toFixed(1)}%`;
      const track = el("div", "track");
      track.append(fill);
      row.append(el("span", "label", label), track, el("span", "value", p.toFixed(2)));
      bars.append(row);
    }
  }
  const s = out.seconds;
  $("timing").textContent = `face crop ${(1000 * s.prepare).toFixed(0)} ms, prediction ${(1000 * s.predict).toFixed(0)} ms, ` +
    `heat map ${(1000 * s.grad_cam).toFixed(0)} ms` + (out.face_found ? `; face found (confidence ${out.face_conf.toFixed(2)})` : "") +
    (out.vote ? `; gender and age: ${out.vote}` : "");
  $("result").hidden = false;
}

$("file").addEventListener("change", (e) => {
  if (e.target.files.length) send(e.target.files[0]);
  e.target.value = "";  // the same file again fires change again
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]);
});
