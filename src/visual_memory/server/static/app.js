// visual-memory web UI: plain JS over the JSON API, no build step.
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...kids) => {
  const n = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") n.className = v;
    else if (k.startsWith("on")) n.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(n.dataset, v);
    else n.setAttribute(k, v);
  }
  for (const kid of kids) n.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  return n;
};
const fmt = (x, d = 3) => Number(x).toFixed(d);

// -- token: from #token=... (printed by `vismem serve`), else remembered --------------
const tokenInput = $("#token");
const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
if (fromHash) {
  localStorage.setItem("vismem-token", fromHash);
  history.replaceState(null, "", location.pathname);  // keep the token out of the address bar
}
tokenInput.value = localStorage.getItem("vismem-token") || "";
tokenInput.addEventListener("change", () => localStorage.setItem("vismem-token", tokenInput.value.trim()));

async function api(method, path, body) {
  const headers = {};
  const token = tokenInput.value.trim();
  if (token) headers["Authorization"] = "Bearer " + token;
  if (body && !(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(body);
  }
  const res = await fetch(path, { method, headers, body });
  const data = res.headers.get("content-type")?.includes("json") ? await res.json() : null;
  if (!res.ok) {
    const msg = (data && data.detail) || res.statusText;
    throw new Error(res.status === 401 ? `${msg} — enter the server's token at the top right` : msg);
  }
  return data;
}

let toastTimer;
function toast(msg, bad = false) {
  const t = $("#toast");
  t.textContent = msg;
  t.className = "toast" + (bad ? " bad" : "");
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (t.hidden = true), bad ? 8000 : 3000);
}

// -- tabs ----------------------------------------------------------------------------
for (const b of document.querySelectorAll("nav .tab")) {
  b.addEventListener("click", () => showTab(b.dataset.tab));
}
function showTab(name) {
  for (const b of document.querySelectorAll("nav .tab")) b.classList.toggle("active", b.dataset.tab === name);
  for (const p of document.querySelectorAll(".panel")) p.hidden = p.id !== "tab-" + name;
  if (name === "browse") loadClasses();
  if (name === "audit") loadAudit();
}

// -- stats -----------------------------------------------------------------------------
let labelCounts = {};
async function loadStats() {
  try {
    const s = await api("GET", "/stats");
    labelCounts = s.labels;
    $("#stats").textContent = `${s.count} records · ${Object.keys(s.labels).length} labels · ${s.encoder} · version ${s.version}`;
  } catch (e) {
    $("#stats").textContent = e.message;
  }
}

// -- drop zones ------------------------------------------------------------------------
function dropZone(zone, input, onFiles) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    onFiles([...e.dataTransfer.files].filter((f) => f.type.startsWith("image/")));
  });
  input.addEventListener("change", () => onFiles([...input.files]));
}

// -- classify --------------------------------------------------------------------------
let current = null;  // the File being explained
let currentSha = null;  // its SHA-256 as the server saw it (the probe of edit previews)
dropZone($("#drop"), $("#file"), (files) => { if (files.length) { current = files[0]; classify(); } });
$("#k").addEventListener("change", () => current && classify());
$("#vote").addEventListener("change", () => current && classify());

async function classify() {
  const fd = new FormData();
  fd.append("file", current);
  const q = new URLSearchParams({ k: $("#k").value || "10", vote: $("#vote").value });
  try {
    const p = await api("POST", "/classify?" + q, fd);
    currentSha = p.image && p.image.sha256;
    render(p);
  } catch (e) {
    toast(e.message, true);
  }
}

function render(p) {
  $("#result").hidden = false;
  const img = $("#query-img");
  if (img.dataset.file !== current.name + current.size) {
    img.src = URL.createObjectURL(current);
    img.dataset.file = current.name + current.size;
  }
  $("#pred-label").textContent = p.label ?? "(no vote: the memory is empty)";
  $("#pred-meta").textContent = `confidence ${fmt(p.confidence, 2)} · k=${p.k} · ${p.vote} vote · memory version ${p.version}`;
  const bars = $("#bars");
  bars.replaceChildren();
  // p.ranking keeps the vote's order (winner first); Object.entries would put labels like "3" first.
  const entries = (p.ranking ?? Object.keys(p.scores)).map((lab) => [lab, p.scores[lab]]);
  const top = Math.max(...entries.map(([, s]) => s), 1e-12);
  const total = entries.reduce((a, [, s]) => a + s, 0) || 1;
  for (const [lab, s] of entries) {
    const fill = el("span", { class: "fill" });
    fill.style.width = (100 * s / top).toFixed(1) + "%";
    bars.append(el("div", { class: "bar" + (lab === p.label ? " win" : ""), dataset: { label: lab } },
      el("span", { class: "name", title: lab }, lab), el("span", { class: "track" }, fill),
      el("span", { class: "val" }, `${fmt(s)} (${Math.round(100 * s / total)}%)`)));
  }
  const g = $("#gallery");
  g.replaceChildren(...p.neighbors.map((n) => neighborCard(n, p.label)));
}

function thumb(url, alt) {
  if (!url) return el("div", { class: "noimg" }, "no image");
  const img = el("img", { src: url + "?v=" + Date.now(), alt, loading: "lazy" });
  img.addEventListener("error", () => img.replaceWith(el("div", { class: "noimg" }, "no image")));
  return img;
}

function neighborCard(n, winner) {
  const relabelInput = el("input", { placeholder: "new label", "aria-label": "new label", "data-testid": "relabel-input" });
  const box = el("div", { class: "preview", "data-testid": "preview", hidden: "" });
  // Every edit is previewed first (a dry run: nothing is written), then applied on confirm.
  const preview = async (path, body, verb, done) => {
    const dry = currentSha ? { probe: [currentSha], k: Number($("#k").value || 10), vote: $("#vote").value } : true;
    try {
      const p = await api("POST", path, { ...body, dry_run: dry });
      showPreview(box, p, verb, () => edit("POST", path, body, done));
    } catch (e) {
      toast(e.message, true);
    }
  };
  const act = () => {
    const label = relabelInput.value.trim();
    if (!label) return toast("type the new label first", true);
    preview("/relabel", { ids: [n.id], label }, "relabel", () => `relabelled ${n.label} → ${label}`);
  };
  relabelInput.addEventListener("keydown", (e) => e.key === "Enter" && act());
  const half = n.weight / 2;
  return el("div", { class: "card" + (n.label === winner ? " win" : ""), "data-testid": "neighbor", dataset: { id: n.id, label: n.label } },
    thumb(n.thumbnail_url, n.label),
    el("div", { class: "lab", title: n.label }, `#${n.rank + 1} ${n.label}`),
    el("div", { class: "nums" }, `sim ${fmt(n.similarity)} · w ${+n.weight.toFixed(3)}`),
    el("div", { class: "nums" }, `contribution ${fmt(n.contribution)}`),
    el("div", { class: "acts" },
      relabelInput,
      el("button", { onclick: act, "data-testid": "relabel" }, "relabel"),
      el("button", { onclick: () => preview("/reweight", { ids: [n.id], weight: half }, "down-weight", () => `weight of ${n.label} neighbour → ${+half.toFixed(3)}`), "data-testid": "downweight", title: "halve this record's vote weight" }, "weight ÷2"),
      el("button", { class: "danger", onclick: () => preview("/forget", { ids: [n.id] }, "erase for good", (r) => `forgot ${r.erased ?? 1} record(s)`), "data-testid": "forget" }, "forget")),
    box);
}

function showPreview(box, p, verb, apply) {
  const lines = p.changes.map((c) => {
    if (c.label_after === null) return `erases ${c.label_before} record ${c.id.slice(0, 10)}…`;
    if (c.label_before !== c.label_after) return `label ${c.label_before} → ${c.label_after}`;
    return `weight ${+c.weight_before.toFixed(3)} → ${+c.weight_after.toFixed(3)}`;
  });
  if (!lines.length) lines.push("changes nothing");
  if (p.probe) {
    const mine = p.probe.changes[0];
    lines.push(mine ? `this image: ${mine.before} → ${mine.after}` : "this image's prediction stays the same");
  }
  box.replaceChildren(
    el("div", { class: "muted" }, `preview (nothing changed yet, version ${p.version})`),
    ...lines.map((t) => el("div", { "data-testid": "preview-line" }, t)),
    el("div", { class: "acts" },
      el("button", { class: verb.startsWith("erase") ? "danger" : "", "data-testid": "confirm", onclick: () => { box.hidden = true; apply(); } }, verb),
      el("button", { "data-testid": "cancel", onclick: () => { box.hidden = true; } }, "cancel")));
  box.hidden = false;
}

async function edit(method, path, body, describe) {
  try {
    const r = await api(method, path, body);
    toast(describe(r));
    await Promise.all([current ? classify() : null, loadStats()]);
  } catch (e) {
    toast(e.message, true);
  }
}

// -- add -------------------------------------------------------------------------------
let toAdd = [];
dropZone($("#add-drop"), $("#add-files"), (files) => {
  toAdd = files;
  $("#add-preview").replaceChildren(...files.map((f) => el("div", { class: "card" }, el("img", { src: URL.createObjectURL(f), alt: f.name }), el("div", { class: "nums" }, f.name))));
  updateAddButton();
});
$("#add-label").addEventListener("input", updateAddButton);
function updateAddButton() {
  $("#add-go").disabled = !(toAdd.length && $("#add-label").value.trim());
}
$("#add-go").addEventListener("click", async () => {
  const fd = new FormData();
  for (const f of toAdd) fd.append("files", f);
  const q = new URLSearchParams({ label: $("#add-label").value.trim(), skip_existing: "true" });
  $("#add-status").textContent = `adding ${toAdd.length} image(s)…`;
  try {
    const r = await api("POST", "/records?" + q, fd);
    $("#add-status").textContent = `added ${r.added} as “${$("#add-label").value.trim()}”` + (r.skipped.length ? `, ${r.skipped.length} already present` : "") + ` · memory version ${r.version}`;
    toAdd = [];
    $("#add-preview").replaceChildren();
    updateAddButton();
    await loadStats();
  } catch (e) {
    $("#add-status").textContent = "";
    toast(e.message, true);
  }
});

// -- browse ----------------------------------------------------------------------------
const PAGE = 60;
let browseLabel = null, browseOffset = 0;
async function loadClasses() {
  await loadStats();
  const box = $("#classes");
  box.replaceChildren(...Object.entries(labelCounts).map(([lab, n]) =>
    el("button", { class: lab === browseLabel ? "active" : "", dataset: { label: lab }, onclick: () => { browseLabel = lab; browseOffset = 0; loadClasses(); } }, `${lab} (${n})`)));
  if (browseLabel === null && Object.keys(labelCounts).length) browseLabel = Object.keys(labelCounts)[0];
  if (browseLabel !== null) {
    for (const b of box.children) b.classList.toggle("active", b.dataset.label === browseLabel);
    await loadPage();
  }
}
async function loadPage() {
  const q = new URLSearchParams({ label: browseLabel, offset: browseOffset, limit: PAGE });
  try {
    const r = await api("GET", "/records?" + q);
    $("#browse-grid").replaceChildren(...r.records.map((rec) =>
      el("div", { class: "card", "data-testid": "record", dataset: { id: rec.id } }, thumb(rec.thumbnail_url, rec.label),
        el("div", { class: "nums", title: rec.id }, rec.id.slice(0, 10) + "…"), el("div", { class: "nums" }, `w ${rec.weight}`))));
    $("#page").textContent = r.total ? `${r.offset + 1}–${r.offset + r.records.length} of ${r.total}` : "empty";
    $("#prev").disabled = browseOffset === 0;
    $("#next").disabled = browseOffset + PAGE >= r.total;
  } catch (e) {
    toast(e.message, true);
  }
}
$("#prev").addEventListener("click", () => { browseOffset = Math.max(0, browseOffset - PAGE); loadPage(); });
$("#next").addEventListener("click", () => { browseOffset += PAGE; loadPage(); });

// -- audit -----------------------------------------------------------------------------
async function loadAudit() {
  try {
    const r = await api("GET", "/history?limit=200");
    $("#audit").replaceChildren(...r.entries.map((e) => {
      const { ts, op, version, ...rest } = e;
      delete rest.actor;
      if (Array.isArray(rest.ids) && rest.ids.length > 3) rest.ids = rest.ids.slice(0, 3).concat([`… ${rest.ids.length - 3} more`]);
      return el("tr", { dataset: { op } }, el("td", {}, (ts || "").replace("T", " ").slice(0, 19)), el("td", {}, op), el("td", {}, version ?? ""),
        el("td", { class: "details" }, JSON.stringify(rest)));
    }));
  } catch (e) {
    toast(e.message, true);
  }
}

loadStats();
