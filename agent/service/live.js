// The live page: one EventSource on /live/events ("state" on every (re)connect, then "shot" and "status" events).
// Data from the wire is only ever set as text (textContent), never parsed as HTML.
"use strict";

const view = { history: 20, remote: false, status: {}, shots: {}, selected: null };
// Built once per shot and moved, never rebuilt: the images are not fetched again (the server says no-store).
const tiles = new Map(); // seq -> element
let shown = null; // the seq the detail panel shows
const GATED = {
  face_size: "face smaller than min_face", det_score: "detector score below min_det_score",
  sharpness: "blurred (sharpness below min_sharpness)", budget: "not scored: scoring budget spent elsewhere",
};

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
const num = (v, digits = 3) => (typeof v === "number" ? v.toFixed(digits) : "–");
const clock = (unix) => (typeof unix === "number" ? new Date(unix * 1000).toLocaleTimeString() : "–");

function fields(pairs) {
  const dl = el("dl");
  for (const [label, value, cls] of pairs) {
    dl.append(el("dt", null, label), el("dd", cls, value));
  }
  return dl;
}

function image(seq, which) {
  const img = el("img", which);
  img.alt = which;
  img.src = `/live/shot/${seq}/${which}.jpg`;
  return img;
}

function recognisable(m) {
  const r = m.extra && m.extra.recognisable;
  return r === undefined ? "–" : r ? "yes" : "no";
}

function tile(m) {
  const t = el("div", `tile ${m.status}`);
  t.dataset.seq = m.seq;
  t.dataset.camera = m.camera;
  t.dataset.track = m.track_id;
  t.dataset.frame = m.frame_index;
  const imgs = el("div", "imgs");
  imgs.append(image(m.seq, "face"), image(m.seq, "context"));
  t.append(imgs, fields([
    ["track", `${m.track_id} (${m.status})`, "track"],
    ["quality", num(m.quality), "quality"],
    ["PreFIQs", num(m.prefiqs), "prefiqs"],
    ["ERS", num(m.extra && m.extra.ers), "ers"],
    ["recognisable", recognisable(m), "recognisable"],
    ["frames", `${m.frames_seen} seen / ${m.frames_scored} scored`, "frames"],
    ["time", clock(m.published_at), "time"],
  ]));
  t.addEventListener("click", () => { view.selected = m.seq; render(); });
  tiles.set(m.seq, t);
  return t;
}

function statusLine(cam) {
  const s = view.status[cam] || {};
  const h = el("h2");
  h.append(el("span", "name", cam));
  const state = view.remote ? "remote" : s.up ? "up" : "down";
  h.append(el("span", `badge ${state}`, state));
  if (!view.remote) {
    h.append(el("span", "stat fps", `${num(s.fps, 1)} fps in`), el("span", "stat dropped", `${s.dropped ?? 0} dropped`),
      el("span", "stat reconnects", `${s.reconnects ?? 0} reconnects`));
  }
  h.append(el("span", "stat shots", `${s.shots ?? 0} shots, last ${clock(s.last_shot)}`));
  if (s.error) h.append(el("span", "error", s.error));
  return h;
}

function render() {
  const root = document.getElementById("cameras");
  const cams = [...new Set([...Object.keys(view.status), ...Object.keys(view.shots)])].sort();
  root.replaceChildren();
  if (!cams.length) root.append(el("p", "empty", "No camera yet."));
  for (const cam of cams) {
    const sec = el("section", "camera");
    sec.dataset.camera = cam;
    const row = el("div", "tiles");
    const shots = view.shots[cam] || [];
    for (const m of [...shots].reverse()) {
      const t = tiles.get(m.seq) || tile(m);
      t.classList.toggle("selected", m.seq === view.selected);
      row.append(t);
    }
    if (!shots.length) row.append(el("p", "empty", "No shot yet."));
    sec.append(statusLine(cam), row);
    root.append(sec);
  }
  const kept = new Set(Object.values(view.shots).flat().map((m) => m.seq));
  for (const seq of tiles.keys()) if (!kept.has(seq)) tiles.delete(seq);
  if (shown !== view.selected || !kept.has(view.selected)) renderDetail();
  const total = cams.reduce((n, c) => n + (view.shots[c] || []).length, 0);
  document.getElementById("summary").textContent =
    `${cams.length} camera(s), ${total} shot(s) kept (last ${view.history} per camera)`;
}

function table(cls, head, rows) {
  const t = el("table", cls);
  const tr = el("tr");
  for (const h of head) tr.append(el("th", null, h));
  t.append(tr);
  for (const r of rows) {
    const row = el("tr");
    for (const c of r) row.append(el("td", null, c));
    t.append(row);
  }
  return t;
}

function renderDetail() {
  const d = document.getElementById("detail");
  const m = Object.values(view.shots).flat().find((s) => s.seq === view.selected);
  shown = m ? m.seq : null;
  if (!m) { d.hidden = true; return; }
  const x = m.extra || {};
  d.hidden = false;
  d.replaceChildren(el("h3", null, `${m.camera}, track ${m.track_id}: ${m.status} shot`), image(m.seq, "context"),
    fields([["frame", m.frame_index], ["quality", num(m.quality)], ["PreFIQs", num(m.prefiqs)],
      ["drift", num(m.drift)], ["detector", num(m.det_score)], ["ERS", num(x.ers)], ["recognisable", recognisable(m)],
      ["seen", `${num(m.timestamps && m.timestamps.first_seen, 2)}–${num(m.timestamps && m.timestamps.last_seen, 2)} s`],
      ["frames", `${m.frames_seen} seen / ${m.frames_scored} scored`], ["face", (m.face_size || []).join("×")],
      ["model", m.model_id]]));
  if (x.top_k) {
    const diverse = new Set((x.shots || []).map((s) => s.frame_index));
    const why = (k, i) => (k.frame_index === m.frame_index ? "best quality: the published shot"
      : diverse.has(k.frame_index) ? `diverse shot (DiffProb), rank ${i + 1} by quality`
        : `rank ${i + 1} by quality: in the template's pool`);
    d.append(el("h3", null, `Top ${x.top_k.length} frames by quality (the pool for the template and the shots)`),
      table("top-k", ["frame", "pts", "quality", "why kept"], x.top_k.map((k, i) => [k.frame_index, num(k.pts, 2),
        num(k.quality), why(k, i)])));
  }
  if (x.shots) {
    d.append(el("h3", null, "Diverse shots (DiffProb)"), table("diverse", ["frame", "quality", "ERS", "why kept"],
      x.shots.map((s) => [s.frame_index, num(s.quality), num(s.ers), "diverse: no better near-duplicate"])));
  }
  if (x.identity_switch_suspects) {
    d.append(el("p", "error", `possible identity switch at frames ${x.identity_switch_suspects.join(", ")}`));
  }
  const gated = Object.entries(x.gated || {});
  d.append(el("h3", null, "Frames of this track not scored"), gated.length
    ? table("gated", ["reason", "frames"], gated.map(([k, n]) => [GATED[k] || k, n]))
    : el("p", "empty gated-none", x.gated ? "none" : "not known (an update, or an older agent)"));
  if (x.cues) {
    d.append(el("h3", null, "Quality cues"), table("cues", ["cue", "value"],
      Object.entries(x.cues).map(([k, v]) => [k, num(v)])));
  }
}

function connect() {
  const conn = document.getElementById("conn");
  const events = new EventSource("/live/events");
  events.addEventListener("state", (e) => {
    Object.assign(view, JSON.parse(e.data));
    conn.textContent = "live"; conn.className = "";
    render();
  });
  events.addEventListener("shot", (e) => {
    const m = JSON.parse(e.data);
    const list = (view.shots[m.camera] = view.shots[m.camera] || []);
    list.push(m);
    while (list.length > view.history) list.shift();
    render();
  });
  events.addEventListener("status", (e) => { view.status = JSON.parse(e.data); render(); });
  events.onerror = () => { conn.textContent = "reconnecting…"; conn.className = "down"; };  // it retries by itself
}

connect();
