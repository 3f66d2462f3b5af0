// logitlab playground, Logit lens and Sequence tabs. Uses playground.js's helpers ($, api, el, state ...).
"use strict";

const views = { lensKey: null, seq: null };

// ---- logit lens -------------------------------------------------------------------------------------
function lensKey() {
  const ctx = viewContext();
  return `${state.promptKey}|${ctx.generated.join(",")}|${$("lens-top").value}`;
}

async function runLens() {
  const ctx = viewContext();
  const key = lensKey();
  views.lensKey = key;
  $("lens-info").textContent = "reading\u2026";
  try {
    const top = Math.round(Number($("lens-top").value));
    const d = await api("/v1/logit_lens", { prompt: await promptIds(), generated: ctx.generated, top });
    if (views.lensKey !== key) return;  // the step changed meanwhile
    renderLens(d, ctx);
  } catch (e) {
    $("lens-info").textContent = e.message;
    views.lensKey = null;
  }
}

function renderLens(d, ctx) {
  const table = $("lens-table");
  table.textContent = "";
  const k = d.layers[0].top.length;
  const head = table.insertRow();
  const names = ["layer", ...Array.from({ length: k }, (_, i) => `top ${i + 1}`), `p(${showTok(d.final_top.token)})`,
    "rank", "entropy"];
  for (const h of names) {
    const th = document.createElement("th");
    th.textContent = h;
    head.append(th);
  }
  for (const layer of d.layers) {
    const tr = table.insertRow();
    tr.className = "lens-row" + (layer.layer === d.num_layers ? " final" : "");
    tr.dataset.layer = layer.layer;
    tr.dataset.top1 = layer.top[0].id;
    tr.insertCell().textContent = layer.name;
    for (const t of layer.top) {
      const c = tr.insertCell();
      c.className = "lens-cell mono" + (t.id === d.final_top.id ? " final-tok" : "")
        + (ctx.chosen !== null && t.id === ctx.chosen ? " chosen-tok" : "");
      c.dataset.id = t.id;
      c.dataset.p = t.p;
      // the cell's shade is the probability (a square root so that small ones still show)
      c.style.background = `rgba(47, 111, 219, ${(0.08 + 0.8 * Math.sqrt(t.p)).toFixed(3)})`;
      c.style.color = t.p > 0.35 ? "#fff" : "#1d1d1f";
      const tok = document.createElement("div");
      tok.textContent = showTok(t.token);
      const p = document.createElement("div");
      p.className = "sub";
      p.textContent = pct(t.p);
      c.append(tok, p);
      c.title = `${JSON.stringify(t.token)} id ${t.id}, p ${t.p.toFixed(4)}`;
    }
    const pc = tr.insertCell();
    pc.className = "num";
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = Math.max(1, Math.round(80 * layer.final_top_prob)) + "px";
    pc.append(bar, document.createTextNode(" " + pct(layer.final_top_prob)));
    const rc = tr.insertCell(); rc.className = "num"; rc.textContent = layer.final_top_rank;
    const ec = tr.insertCell(); ec.className = "num"; ec.textContent = layer.entropy.toFixed(2);
  }
  $("lens-info").textContent = `${d.num_layers} blocks, ${d.context_tokens} context tokens \u00b7 ` +
    `the model predicts ${JSON.stringify(d.final_top.token)}`;
}

// ---- sequence view ----------------------------------------------------------------------------------
const BUCKETS = [  // GLTR's colours: top-1 / 10 / 100 / 1000 / beyond
  { key: 1, label: "top 1", color: "#6fcf8e" }, { key: 10, label: "top 10", color: "#c8efc0" },
  { key: 100, label: "top 100", color: "#fbe38a" }, { key: 1000, label: "top 1000", color: "#f7a8a8" },
  { key: 0, label: "beyond", color: "#d9b8f0" }];

function surprisalColor(bits) { return `hsl(${Math.round(120 * (1 - Math.min(bits, 16) / 16))}, 75%, 80%)`; }

function seqMode() { return $("seq-mode-surprisal").checked ? "surprisal" : "rank"; }

function fillSequence() {
  $("seq-text").value = $("prompt").value + state.tokens.map((t) => t.text).join("");
}

async function runSequence() {
  if (!$("seq-text").value) fillSequence();
  $("seq-stats").textContent = "reading\u2026";
  try {
    views.seq = await api("/v1/sequence_view", { text: $("seq-text").value });
    renderSequence();
  } catch (e) {
    $("seq-stats").textContent = e.message;
  }
}

function renderSequence() {
  const d = views.seq;
  if (!d) return;
  const mode = seqMode();
  const out = $("seq-out");
  out.textContent = "";
  for (const [i, t] of d.tokens.entries()) {
    const s = document.createElement("span");
    s.className = "seq-tok" + (t.rank === null ? " first" : ` bucket-${t.bucket || "rest"}`);
    s.textContent = t.text;
    s.dataset.index = i;
    s.dataset.id = t.id;
    if (t.rank !== null) {
      s.dataset.rank = t.rank;
      s.dataset.bucket = t.bucket;
      s.style.background = mode === "rank" ? BUCKETS.find((b) => b.key === t.bucket).color : surprisalColor(t.surprisal_bits);
      s.title = `${JSON.stringify(t.text)} id ${t.id}\nrank ${t.rank}, p ${Math.exp(t.logprob).toFixed(4)} ` +
        `(${t.surprisal_bits.toFixed(2)} bits)\nentropy of the prediction ${t.entropy.toFixed(3)} nats`;
    } else {
      s.title = "the first token: nothing predicts it";
    }
    out.append(s);
  }
  const legend = $("seq-legend");
  legend.textContent = "";
  if (mode === "rank") {
    for (const b of BUCKETS) {
      const sw = document.createElement("span");
      sw.className = "sw";
      sw.style.background = b.color;
      legend.append(sw, document.createTextNode(` ${b.label} (${d.buckets[b.key ? String(b.key) : "rest"]})`));
    }
  } else {
    const g = document.createElement("span");
    g.className = "grad rev";
    legend.append(document.createTextNode("surprisal \u2212log\u2082 p: 0 bits "), g, document.createTextNode(" 16+ bits"));
  }
  $("seq-stats").textContent = `${d.tokens.length} tokens (${d.scored} predicted) \u00b7 perplexity ` +
    `${d.perplexity.toFixed(2)} \u00b7 mean entropy ${d.mean_entropy.toFixed(2)} nats`;
  $("seq-stats").dataset.perplexity = d.perplexity;
  renderSeqChart(d);
}

function renderSeqChart(d) {
  // per predicted token: its surprisal (bars) and the entropy of the prediction (line), both in bits
  const rows = d.tokens.filter((t) => t.rank !== null);
  const LN2 = Math.log(2);
  const W = 940, H = 200, m = { l: 44, r: 12, t: 14, b: 24 };
  const iw = W - m.l - m.r, ih = H - m.t - m.b;
  const ymax = niceMax(Math.max(1, ...rows.map((t) => Math.max(t.surprisal_bits, t.entropy / LN2))));
  const band = iw / Math.max(1, rows.length);
  const y = (v) => m.t + ih * (1 - v / ymax);
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  for (let i = 0; i <= 4; i++) {
    const v = (ymax * i) / 4;
    el("line", { x1: m.l, x2: W - m.r, y1: y(v), y2: y(v), stroke: "#eee" }, svg);
    el("text", { x: m.l - 6, y: y(v) + 4, "text-anchor": "end", "font-size": 11, fill: "#666" }, svg).textContent =
      Number.isInteger(v) ? String(v) : v.toFixed(1);
  }
  el("text", { x: 12, y: m.t + ih / 2, "font-size": 11, fill: "#666", transform: `rotate(-90 12 ${m.t + ih / 2})`,
    "text-anchor": "middle" }, svg).textContent = "bits";
  rows.forEach((t, i) => {
    const r = el("rect", { x: m.l + i * band + band * 0.1, y: y(t.surprisal_bits), width: Math.max(1, band * 0.8),
      height: Math.max(0, y(0) - y(t.surprisal_bits)), fill: BUCKETS.find((b) => b.key === t.bucket).color,
      stroke: "#999", "stroke-width": 0.5, class: "surprisal-bar" }, svg);
    el("title", {}, r).textContent = `${JSON.stringify(t.text)}: ${t.surprisal_bits.toFixed(2)} bits, ` +
      `entropy ${(t.entropy / LN2).toFixed(2)} bits`;
  });
  const pts = rows.map((t, i) => `${m.l + (i + 0.5) * band},${y(t.entropy / LN2)}`).join(" ");
  el("polyline", { points: pts, fill: "none", stroke: "#e8871e", "stroke-width": 2, class: "entropy-line" }, svg);
  el("line", { x1: m.l, x2: W - m.r, y1: y(0), y2: y(0), stroke: "#999" }, svg);
  el("text", { x: W - m.r, y: H - 6, "text-anchor": "end", "font-size": 11, fill: "#666" }, svg).textContent =
    "bars: surprisal of each token \u00b7 orange line: entropy of the prediction";
  $("seq-chart").textContent = "";
  $("seq-chart").append(svg);
}

// ---- wiring -----------------------------------------------------------------------------------------
distListeners.push(() => {
  if (currentTab() === "lens" && views.lensKey !== lensKey()) runLens();
});

tabListeners.push((name) => {
  if (name === "lens" && views.lensKey !== lensKey()) runLens();
  if (name === "sequence" && !$("seq-text").value) fillSequence();
});

document.addEventListener("DOMContentLoaded", () => {
  $("lens-run").addEventListener("click", runLens);
  $("lens-top").addEventListener("change", runLens);
  $("seq-fill").addEventListener("click", fillSequence);
  $("seq-run").addEventListener("click", runSequence);
  for (const id of ["seq-mode-rank", "seq-mode-surprisal"]) $(id).addEventListener("change", renderSequence);
});
