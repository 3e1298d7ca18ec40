"""OUT/attention.html: every kept layer and head of one forward in one self-contained page.
Choose the attention (self; an encoder-decoder's encoder, decoder or cross), the layer and the head
(or the mean of the heads); hover a token (or a cell of the matrix) to see where it attends."""

from __future__ import annotations

from lmforge.inspect.capture import KIND_TITLES
from lmforge.inspect.html import embed_json, escape, page

SCALE = 1000  # weights travel as integers in thousandths: a quarter of the text of full floats

CSS = """
.controls { margin: 1em 0; display: flex; gap: 1.2em; align-items: center; flex-wrap: wrap; }
.controls label { font-size: 0.9em; } select { font-size: 0.95em; margin-left: 0.3em; }
.side { font-size: 0.8em; color: #666; margin: 0.8em 0 0.2em; }
.tok.query { outline: 2px solid #d62728; }
#info { min-height: 2.8em; font-size: 0.9em; margin: 0.8em 0; color: #333; }
#matrix { margin-top: 0.5em; }
"""

SCRIPT = r"""
const D = JSON.parse(document.getElementById("attention-data").textContent);
const $ = (id) => document.getElementById(id);
const kindSel = $("kind"), layerSel = $("layer"), headSel = $("head");
let cur = null;  // {kind, q, k, w: rows [T][S] of floats, max}

function option(sel, value, text) { const o = document.createElement("option"); o.value = value; o.textContent = text; sel.appendChild(o); }
function show(t) { return t.replace(/ /g, "\u00b7").replace(/\t/g, "\u2192").replace(/\n/g, "") || "\u2205"; }

D.kinds.forEach((k, i) => option(kindSel, i, k.title));
function fillLayers() {
  layerSel.innerHTML = ""; const k = D.kinds[+kindSel.value];
  k.layers.forEach((l, i) => option(layerSel, i, "layer " + l));
  headSel.innerHTML = "";
  D.heads.forEach((h, i) => option(headSel, i, "head " + h));
  if (D.heads.length > 1) option(headSel, "mean", "mean of heads");
}
function weights() {
  const k = D.kinds[+kindSel.value], layer = k.w[+layerSel.value];
  const heads = headSel.value === "mean" ? layer : [layer[+headSel.value]];
  const T = heads[0].length, S = heads[0][0].length, rows = [];
  let max = 1e-9;
  for (let i = 0; i < T; i++) {
    const row = new Array(S).fill(0);
    for (const h of heads) for (let j = 0; j < S; j++) row[j] += h[i][j] / D.scale / heads.length;
    for (let j = 0; j < S; j++) max = Math.max(max, row[j]);
    rows.push(row);
  }
  return {kind: k, q: D.tokens[k.q], k: D.tokens[k.k], same: k.q === k.k, w: rows, max};
}
function spans(el, toks, cls) {
  el.innerHTML = "";
  return toks.map((t, i) => {
    const s = document.createElement("span"); s.className = "tok " + cls; s.dataset.i = i;
    s.textContent = t.replace(/\n/g, ""); if (t.includes("\n")) s.classList.add("nl");
    el.appendChild(s); if (t.includes("\n")) el.appendChild(document.createTextNode("\n"));
    return s;
  });
}
let keySpans = [], querySpans = [];
function render() {
  cur = weights();
  $("keys-side").textContent = cur.same ? "tokens (hover one: the colours show where it attends)" : "keys: the source (encoder input)";
  keySpans = spans($("keys"), cur.k, "key");
  $("queries-side").style.display = $("queries").style.display = cur.same ? "none" : "";
  querySpans = cur.same ? keySpans : spans($("queries"), cur.q, "q");
  querySpans.forEach((s, i) => { s.onmouseenter = () => focus(i); s.onmouseleave = clear; });
  drawMatrix(-1, -1); clear();
}
function focus(i, j) {
  clear(false);
  const row = cur.w[i]; let rowMax = 1e-9; row.forEach((v) => rowMax = Math.max(rowMax, v));
  keySpans.forEach((s, jj) => { s.style.background = "rgba(33,113,181," + (row[jj] / rowMax).toFixed(3) + ")";
                                s.style.color = row[jj] / rowMax > 0.6 ? "#fff" : ""; s.title = row[jj].toFixed(3); });
  querySpans[i].classList.add("query");
  const top = row.map((v, jj) => [v, jj]).sort((a, b) => b[0] - a[0]).slice(0, 8).filter((x) => x[0] > 0);
  let text = "query " + i + " \u201c" + show(cur.q[i]) + "\u201d attends to: " +
             top.map(([v, jj]) => "\u201c" + show(cur.k[jj]) + "\u201d (" + jj + ") " + v.toFixed(3)).join(" \u00b7 ");
  if (j !== undefined) text = "weight of key " + j + " \u201c" + show(cur.k[j]) + "\u201d: " + row[j].toFixed(4) + ". " + text;
  $("info").textContent = text;
  drawMatrix(i, j === undefined ? -1 : j);
}
function clear(redraw = true) {
  keySpans.concat(querySpans).forEach((s) => { s.style.background = ""; s.style.color = ""; s.classList.remove("query"); s.title = ""; });
  $("info").textContent = "Hover a token" + (cur && !cur.same ? " of the decoder input" : "") + " or a cell of the matrix.";
  if (redraw) drawMatrix(-1, -1);
}
function cell() { return Math.max(3, Math.min(18, Math.floor(560 / Math.max(cur.w.length, cur.w[0].length)))); }
function margin() { return cell() >= 9 ? 84 : 0; }  // token labels beside the rows and above the columns
function label(t) { t = show(t); return t.length > 11 ? t.slice(0, 10) + "…" : t; }
function drawMatrix(hi, hj) {
  const c = $("matrix"), n = cell(), m = margin(), T = cur.w.length, S = cur.w[0].length;
  c.width = S * n + m; c.height = T * n + m; const g = c.getContext("2d");
  g.fillStyle = "#fff"; g.fillRect(0, 0, c.width, c.height);
  for (let i = 0; i < T; i++) for (let j = 0; j < S; j++) {
    g.fillStyle = "rgba(33,113,181," + (cur.w[i][j] / cur.max).toFixed(3) + ")"; g.fillRect(m + j * n, m + i * n, n, n);
  }
  if (m) {
    g.font = Math.min(12, n - 2) + "px monospace"; g.textBaseline = "middle";
    for (let i = 0; i < T; i++) { g.fillStyle = i === hi ? "#d62728" : "#333"; g.textAlign = "right"; g.fillText(label(cur.q[i]), m - 4, m + i * n + n / 2); }
    for (let j = 0; j < S; j++) {
      g.save(); g.translate(m + j * n + n / 2, m - 4); g.rotate(-Math.PI / 2); g.textAlign = "left";
      g.fillStyle = j === hj ? "#ff7f0e" : "#333"; g.fillText(label(cur.k[j]), 0, 0); g.restore();
    }
  }
  g.lineWidth = 1;
  if (hi >= 0) { g.strokeStyle = "#d62728"; g.strokeRect(m + 0.5, m + hi * n + 0.5, S * n - 1, n - 1); }
  if (hj >= 0) { g.strokeStyle = "#ff7f0e"; g.strokeRect(m + hj * n + 0.5, m + 0.5, n - 1, T * n - 1); }
}
$("matrix").onmousemove = (e) => {
  const n = cell(), m = margin(), r = e.target.getBoundingClientRect();
  const i = Math.floor((e.clientY - r.top - m) / n), j = Math.floor((e.clientX - r.left - m) / n);
  if (i >= 0 && i < cur.w.length && j >= 0 && j < cur.w[0].length) focus(i, j);
};
$("matrix").onmouseleave = () => clear();
kindSel.onchange = () => { fillLayers(); render(); };
layerSel.onchange = headSel.onchange = render;
fillLayers(); render();
"""


def page_data(am, model_name: str) -> dict:
    kinds = []
    for kind, layers in am.maps.items():
        q, k = {"self": ("tgt", "tgt"), "decoder": ("tgt", "tgt"), "encoder": ("src", "src"), "cross": ("tgt", "src")}[kind]
        kinds.append({"kind": kind, "title": KIND_TITLES[kind], "q": q, "k": k, "layers": list(layers),
                      "w": [(probs * SCALE).round().int().tolist() for probs in layers.values()]})
    return {"model": model_name, "scale": SCALE, "heads": am.heads, "kinds": kinds,
            "tokens": {"tgt": am.inputs.texts, "src": am.inputs.src_texts or []}}


def render_page(am, model_name: str) -> str:
    data = page_data(am, model_name)
    n_tok = len(am.inputs.texts)
    src = f", source {len(am.inputs.src_texts)} tokens" if am.inputs.src_texts else ""
    body = f"""<h1>Attention: {escape(model_name)}</h1>
<p class="meta">{n_tok} tokens{src}; {len(am.heads)} head(s) per layer. Rows of the matrix are queries, columns
keys; colours are relative to the largest weight shown (hovering: to the largest of the row).</p>
<div class="controls">
<label>attention<select id="kind"></select></label>
<label>layer<select id="layer"></select></label>
<label>head<select id="head"></select></label>
</div>
<div class="side" id="queries-side">queries: the decoder input (hover one)</div>
<div class="tokens" id="queries"></div>
<div class="side" id="keys-side"></div>
<div class="tokens" id="keys"></div>
<div id="info"></div>
<canvas id="matrix"></canvas>
<script type="application/json" id="attention-data">{embed_json(data)}</script>"""
    return page(f"attention: {model_name}", body, css=CSS, script=SCRIPT)
