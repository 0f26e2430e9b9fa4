"use strict";
// The audit page: one card per person (ranked), the fixes the model points to as buttons, the shots as a
// contact sheet. The server checks every click against its labels and writes the draft.
const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

const key = (m) => [m.person_id ?? m.id, m.field, m.old, m.new].join("|");
let marked = new Set();

function showDraft(draft) {
  $("draft-path").textContent = draft.path;
  $("draft-count").textContent = `${draft.marks.length} fix(es) marked here, after ${draft.base} from --relabel`;
  $("draft-command").textContent = `python preprocess.py --data DATA --out WORK/crops --relabel ${draft.path}`;
  $("draft-text").textContent = draft.text || "(not written yet)";
  $("draft-text").scrollTop = $("draft-text").scrollHeight;  // the marks are the last lines
  marked = new Set(draft.marks.map(key));
  for (const b of document.querySelectorAll("button.fix")) b.setAttribute("aria-pressed", marked.has(b.dataset.key));
}

async function toggle(button, person, fix) {
  const on = button.getAttribute("aria-pressed") !== "true";
  button.disabled = true;
  try {
    const r = await fetch("/api/fix", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({person_id: person.person_id, field: fix.field, old: fix.old, new: fix.new, on}),
    });
    const out = await r.json();
    if (!r.ok) throw new Error(out.error || r.status);
    $("error").hidden = true;
    showDraft(out.draft);
  } catch (e) {
    $("error").textContent = `Not saved: ${e.message}`;
    $("error").hidden = false;
  } finally {
    button.disabled = false;
  }
}

function card(person) {
  const c = el("section", "person");
  c.dataset.person = person.person_id;
  c.append(el("h2", null, `${person.person_id}: labelled ${person.gender}, ${person.age} (${person.band})  —  disagreement ${person.score.toFixed(2)}`));
  const fixes = el("div", "fixes");
  for (const fix of person.fixes) {
    const b = el("button", fix.confident ? "fix confident" : "fix", fix.text);
    b.title = fix.why;
    b.dataset.field = fix.field;
    b.dataset.key = key({person_id: person.person_id, ...fix});
    b.setAttribute("aria-pressed", marked.has(b.dataset.key));
    b.addEventListener("click", () => toggle(b, person, fix));
    const why = el("span", "small", fix.why);
    const wrap = el("span");
    wrap.append(b, " ", why);
    fixes.append(wrap);
  }
  c.append(fixes);
  const shots = el("div", "shots");
  for (const s of person.shots) {
    const f = el("figure", s.wrong ? "shot wrong" : "shot");
    const img = el("img");
    img.src = `/api/crop/${s.row}`;
    img.alt = `${person.person_id} ${s.shot}`;
    img.loading = "lazy";
    const cap = el("figcaption");
    cap.append(el("strong", null, s.shot), el("br"), el("span", null, `label ${s.label}`), el("br"),
      el("span", "answer", `model ${s.answer} ${s.p.toFixed(2)}`));
    f.append(img, cap);
    shots.append(f);
  }
  c.append(shots);
  return c;
}

fetch("/api/info").then((r) => r.json()).then((info) => { $("run").textContent = `${info.run}: ${info.models.length} model(s)`; });
fetch("/api/audit").then((r) => r.json()).then((audit) => {
  $("note").textContent = audit.note + ". Red: the model's answer differs with at least " +
    `${audit.min_conf} probability; a red button is a fix it is that sure of (hover for why).`;
  showDraft(audit.draft);
  const list = $("persons");
  for (const person of audit.persons) list.append(card(person));
  if (!audit.persons.length) list.append(el("p", null, "No person to list."));
  list.dataset.ready = "true";
});
