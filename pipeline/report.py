"""The audit's findings as one self-contained HTML file: no server, no CDN, thumbnails inlined as small JPEGs.

The findings travel as JSON inside the page; a short script draws each section's table a page at a time, so a
report of thousands of images opens quickly: a thumbnail's base64 text becomes an image only when its row is
shown. Tables sort on a click of their heading.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from headstart.export.files import atomic_write
from headstart.export.progress import bar

THUMB = 96  # longest side of a thumbnail, pixels
QUALITY = 70  # their JPEG quality: ~3 KB each
MAX_THUMBS = 5000  # thumbnails inlined at most; images past this show the placeholder
PAGE = 50  # table rows a page
# Shown where an image could not be read (moved, deleted, or not an image).
PLACEHOLDER = ("data:image/svg+xml;base64," + base64.b64encode(
    b'<svg xmlns="http://www.w3.org/2000/svg" width="96" height="72"><rect width="96" height="72" fill="#ddd"/>'
    b'<text x="48" y="40" font-size="11" text-anchor="middle" fill="#666">no image</text></svg>').decode())


def thumbnail(path: str) -> str | None:
    """A small JPEG of the image at `path` as base64 text, or None when it cannot be read."""
    from PIL import Image

    from .decode import BadImage, read_bytes

    try:
        with Image.open(io.BytesIO(read_bytes(path))) as img:
            img = img.convert("RGB")
            img.thumbnail((THUMB, THUMB))
            out = io.BytesIO()
            img.save(out, "JPEG", quality=QUALITY)
    except (OSError, BadImage, ValueError, Image.DecompressionBombError):
        return None
    return base64.b64encode(out.getvalue()).decode()


def _paths(findings: dict) -> list[str]:
    """Every image the report shows, in the order of its sections (leaks first), each once."""
    seen: dict[str, None] = {}
    for g in findings["leaks"] + findings["near_duplicates"]:
        for m in g["members"]:
            seen.setdefault(m["path"])
    for e in findings["label_issues"] + findings["outliers"]:
        seen.setdefault(e["path"])
    return list(seen)


def write_report(findings: dict, path: str | Path, max_thumbs: int = MAX_THUMBS) -> int:
    """Write the HTML report of `findings` (from pipeline.audit.audit) to `path`; returns its size in bytes."""
    paths = _paths(findings)
    thumbs: dict[str, str] = {}
    for p in bar(paths[:max_thumbs], desc="thumbnails", unit="img"):
        t = thumbnail(p)
        if t is not None:
            thumbs[p] = t
    data = json.dumps({"findings": findings, "thumbs": thumbs, "page": PAGE, "placeholder": PLACEHOLDER},
                      separators=(",", ":")).replace("</", "<\\/")  # no "</script>" can end the block early
    title = html.escape(f"headstart audit: {findings['dataset']} ({findings['images']} images)")
    text = TEMPLATE.replace("{title}", title).replace("{data}", data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path.stat().st_size


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.4em 0}td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:left;
vertical-align:middle}th{cursor:pointer;background:#f5f5f5;user-select:none}th.nosort{cursor:default}
img{display:block;max-width:96px;max-height:96px}.group{display:flex;flex-wrap:wrap;gap:8px;margin:.5em 0;
padding:6px;border:1px solid #ddd}.member{font-size:11px;max-width:120px;word-break:break-all}
.leak .member .split{color:#b00;font-weight:bold}.pager button{margin:0 4px}.path{font-size:12px;word-break:break-all}
.cm td{text-align:right}.small{color:#666;font-size:12px}
</style></head><body>
<h1>{title}</h1>
<p id="summary" class="small"></p>
<section id="leaks"><h2>Leaks: near-duplicates in more than one split (<span class="count"></span>)</h2>
<div class="body"></div></section>
<section id="label-issues"><h2>Label suspects (<span class="count"></span>)</h2><div class="body"></div></section>
<section id="near-duplicates"><h2>Near-duplicate groups within a split (<span class="count"></span>)</h2>
<div class="body"></div></section>
<section id="outliers"><h2>Outliers (<span class="count"></span>)</h2><div class="body"></div></section>
<section id="classes"><h2>Classes (<span class="count"></span>)</h2><div class="body"></div></section>
<section id="confusion"><h2>Out-of-fold confusion matrix</h2><div class="body"></div></section>
<script id="data" type="application/json">{data}</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent), F = D.findings, PAGE = D.page;
const esc = s => String(s ?? "").replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"})[c]);
const img = p => `<img loading="lazy" alt="" title="${esc(p)}" src="${D.thumbs[p] ? "data:image/jpeg;base64," +
  D.thumbs[p] : D.placeholder}">`;
const num = v => typeof v === "number" ? (Number.isInteger(v) ? v : v.toFixed(3)) : esc(v);
function section(id, n) { const s = document.getElementById(id), c = s.querySelector(".count");
  if (c) c.textContent = n; s.dataset.count = n; return s.querySelector(".body"); }
function pager(body, items, draw) {
  let page = 0; const pages = Math.max(1, Math.ceil(items.length / PAGE));
  const box = document.createElement("div"), nav = document.createElement("div");
  nav.className = "pager"; body.append(box); if (pages > 1) body.append(nav);
  function show() { box.innerHTML = draw(items.slice(page * PAGE, (page + 1) * PAGE));
    nav.innerHTML = `<button ${page ? "" : "disabled"}>&lt;</button> page ${page + 1} of ${pages}
      <button ${page < pages - 1 ? "" : "disabled"}>&gt;</button>`;
    const [prev, next] = nav.querySelectorAll("button");
    prev.onclick = () => { page--; show(); }; next.onclick = () => { page++; show(); }; }
  show(); return show;
}
function table(body, items, cols) {
  if (!items.length) { body.innerHTML = "<p>None found.</p>"; return; }
  let key = null, dir = 1;
  const show = pager(body, items, rows => `<table><thead><tr>${cols.map(c =>
      `<th data-key="${c.key || ""}" class="${c.key ? "" : "nosort"}">${c.name}</th>`).join("")}</tr></thead><tbody>` +
    rows.map(r => `<tr class="row">${cols.map(c => `<td>${c.cell(r)}</td>`).join("")}</tr>`).join("") +
    "</tbody></table>");
  body.addEventListener("click", e => { const k = e.target.dataset && e.target.dataset.key; if (!k) return;
    dir = key === k ? -dir : 1; key = k;
    items.sort((a, b) => (a[k] > b[k] ? 1 : a[k] < b[k] ? -1 : 0) * dir); show(); });
}
function groups(body, items, leak) {
  if (!items.length) { body.innerHTML = "<p>None found.</p>"; return; }
  pager(body, items, gs => gs.map(g => `<div class="group ${leak ? "leak" : ""}">` + g.members.map(m =>
    `<div class="member">${img(m.path)}<span class="split">${esc(m.split)}</span> ${esc(m.label)}<br>${esc(m.path)}
    </div>`).join("") + `<div class="small">similarity ${num(g.min_similarity)}..${num(g.max_similarity)}` +
    `${g.identical ? ", identical bytes" : ""}</div></div>`).join(""));
}
const s = F.settings;
document.getElementById("summary").textContent = `${F.images} images (${Object.entries(F.splits).map(([k, v]) =>
  k + " " + v).join(", ")}), layer ${F.layer}; head ${s.head}, ${s.folds} folds, out-of-fold accuracy ` +
  `${F.oof_accuracy == null ? "n/a" : (100 * F.oof_accuracy).toFixed(1) + "%"}; near-duplicates from cosine ` +
  `${s.threshold}; ${F.pairs.length} near-duplicate pairs.`;
groups(section("leaks", F.leaks.length), F.leaks, true);
table(section("label-issues", F.label_issues.length), F.label_issues, [
  {name: "rank", key: "rank", cell: r => r.rank}, {name: "image", cell: r => img(r.path)},
  {name: "given", key: "given", cell: r => esc(r.given)}, {name: "suggested", key: "suggested",
  cell: r => esc(r.suggested)}, {name: "score", key: "score", cell: r => num(r.score)},
  {name: "split", key: "split", cell: r => esc(r.split)}, {name: "path", key: "path",
  cell: r => `<span class="path">${esc(r.path)}</span>`}]);
groups(section("near-duplicates", F.near_duplicates.length), F.near_duplicates, false);
table(section("outliers", F.outliers.length), F.outliers, [
  {name: "rank", key: "rank", cell: r => r.rank}, {name: "image", cell: r => img(r.path)},
  {name: "label", key: "label", cell: r => esc(r.label)}, {name: "mean similarity", key: "score",
  cell: r => num(r.score)}, {name: "z", key: "z", cell: r => num(r.z)}, {name: "split", key: "split",
  cell: r => esc(r.split)}, {name: "path", key: "path", cell: r => `<span class="path">${esc(r.path)}</span>`}]);
table(section("classes", F.class_overview.length), F.class_overview, [
  {name: "class", key: "class", cell: r => esc(r.class)}, {name: "images", key: "count", cell: r => r.count},
  {name: "by split", cell: r => esc(Object.entries(r.splits).map(([k, v]) => k + " " + v).join(", "))},
  {name: "out-of-fold accuracy", key: "oof_accuracy", cell: r => num(r.oof_accuracy)},
  {name: "suspects", key: "suspects", cell: r => r.suspects}]);
const cm = section("confusion", F.confusion ? F.confusion.classes.length : 0);
if (F.confusion) {
  const C = F.confusion;
  cm.innerHTML = `<table class="cm"><tr><th class="nosort">given \\\\ predicted</th>${C.classes.map(c =>
    `<th class="nosort">${esc(c)}</th>`).join("")}</tr>` + C.matrix.map((row, i) => `<tr><th class="nosort">` +
    `${esc(C.classes[i])}</th>${row.map(v => `<td>${v}</td>`).join("")}</tr>`).join("") + "</table>" +
    (F.confused_pairs.length ? "<p>Most confused: " + F.confused_pairs.map(p =>
      `${esc(p.given)} taken for ${esc(p.predicted)} (${p.count})`).join("; ") + "</p>" : "");
} else { cm.innerHTML = "<p>No labels to classify.</p>"; }
document.body.dataset.ready = "1";
</script></body></html>
"""
