// logitlab playground: the next-token distribution before/after the sampling knobs (and stage by stage),
// generation, and the shared pieces the other views use (tree.js: branches and beam search; views.js:
// logit lens and sequence view). Plain JS + SVG, no dependencies, no network access beyond this server's API.
"use strict";

const $ = (id) => document.getElementById(id);
const SVGNS = "http://www.w3.org/2000/svg";
const KNOBS = ["temperature", "top_k", "top_p", "min_p", "frequency_penalty", "presence_penalty",
  "repetition_penalty", "top_n_sigma", "xtc_probability", "xtc_threshold", "dry_multiplier", "dry_base",
  "dry_allowed_length", "no_repeat_ngram_size", "dynatemp_range", "dynatemp_exponent", "mirostat",
  "mirostat_tau", "mirostat_eta"];
const INT_KNOBS = new Set(["top_k", "dry_allowed_length", "no_repeat_ngram_size", "mirostat"]);

const state = {
  promptKey: null, promptIds: null,   // the tokenized prompt (cached per text + chat flag)
  tokens: [],                         // generated: {id, text, logprob, top, trace}
  seed: null,                         // the seed of the current output (Generate and Step share it)
  busy: false, genAbort: null, distAbort: null, distTimer: null,
  view: null,                         // null: next token after everything so far; i: the step of token i
  treeView: null,                     // a tree node being viewed: {generated, chosen, title} (tree.js)
  lastDist: null, lastCtx: null,      // the latest /v1/pipeline answer and the context it was asked for
};
const distListeners = [];             // fn(dist, ctx) after every chart update (tree.js, views.js)

class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("apikey").value || localStorage.getItem("logitlab_api_key");
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function api(path, body, signal) {
  const r = await fetch(path, {
    method: body === undefined ? "GET" : "POST", headers: headers(),
    body: body === undefined ? undefined : JSON.stringify(body), signal,
  });
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) {
    if (r.status === 401) $("keybox").classList.remove("hidden");
    const msg = data && data.error ? data.error.message : `${r.status} ${r.statusText}`;
    throw new ApiError(msg, r.status);
  }
  return data;
}

function setStatus(text, isError) {
  const s = $("status");
  s.textContent = text || "";
  s.classList.toggle("error", !!isError);
}

// ---- controls ---------------------------------------------------------------------------------
function buildControls() {
  for (const div of document.querySelectorAll(".ctl")) {
    const d = div.dataset;
    const label = document.createElement("label");
    label.textContent = d.label;
    label.htmlFor = "k_" + d.name;
    const input = document.createElement("input");
    Object.assign(input, { type: "range", id: "k_" + d.name, min: d.min, max: d.max, step: d.step, value: d.value });
    input.dataset.name = d.name;
    const out = document.createElement("output");
    out.id = "v_" + d.name;
    out.textContent = d.value;
    input.addEventListener("input", () => {
      out.textContent = input.value;
      if (d.name !== "max_tokens") scheduleDist(40);
    });
    div.append(label, input, out);
  }
}

function knobs() {
  const k = {};
  for (const name of KNOBS) {
    const v = Number($("k_" + name).value);
    k[name] = INT_KNOBS.has(name) ? Math.round(v) : v;
  }
  return k;
}

function maxTokens() { return Math.round(Number($("k_max_tokens").value)); }

// ---- the constraint (the pipeline's first stage) ------------------------------------------------
function constraintChoices() { return $("c_value").value.split("\n").filter((c) => c.length); }

function constraintFields() {
  // for /v1/pipeline: guided_regex / guided_choice / guided_json
  const kind = $("c_kind").value, v = $("c_value").value;
  if (!kind || !v.trim()) return {};
  if (kind === "regex") return { guided_regex: v };
  if (kind === "choice") return { guided_choice: constraintChoices() };
  return { guided_json: v };
}

function completionConstraint() {
  // for /v1/completions: a choice is streamed as its token-level grammar (what the Pipeline tab shows),
  // written as the server writes it (decoding/constraints.py choice_grammar)
  const f = constraintFields();
  if (!f.guided_choice) return f;
  return { guided_grammar: "root ::= " + f.guided_choice.map((c) => JSON.stringify(c)).join(" | ") };
}

function seedForRun() {
  const v = $("seed").value.trim();
  if (v !== "" && Number.isFinite(Number(v))) return Math.max(0, Math.floor(Number(v)));
  return Math.floor(Math.random() * 2147483647);
}

// ---- prompt -----------------------------------------------------------------------------------
async function promptIds() {
  const text = $("prompt").value;
  const chat = $("chat").checked;
  const key = (chat ? "chat:" : "text:") + text;
  if (state.promptKey === key && state.promptIds) return state.promptIds;
  if (!text) throw new ApiError("the prompt is empty", 400);
  const body = chat ? { messages: [{ role: "user", content: text }] } : { prompt: text };
  const data = await api("/tokenize", body);
  state.promptKey = key;
  state.promptIds = data.tokens;
  return data.tokens;
}

// ---- the distribution chart -------------------------------------------------------------------
function scheduleDist(delay) {
  clearTimeout(state.distTimer);
  state.distTimer = setTimeout(updateDist, delay);
}

function viewContext() {
  // the step every view looks at: a tree node, a clicked output token, or the next token after the output
  if (state.treeView) return { ...state.treeView, live: false };
  const step = state.view;
  const n = state.tokens.length;
  return {
    generated: state.tokens.slice(0, step === null ? n : step).map((t) => t.id),
    chosen: step === null ? null : state.tokens[step].id,
    title: step === null ? (n ? `Next token (after ${n} generated)` : "Next token") : `Distribution at step ${step + 1}`,
    live: step === null,
  };
}

async function updateDist() {
  if (state.distAbort) state.distAbort.abort();
  const ctrl = new AbortController();
  state.distAbort = ctrl;
  const ctx = viewContext();
  try {
    const ids = await promptIds();
    const body = { prompt: ids, generated: ctx.generated, top: 50, stage_top: 20, ...knobs(), ...constraintFields() };
    const d = await api("/v1/pipeline", body, ctrl.signal);
    if (ctrl.signal.aborted) return;
    state.lastDist = d;
    state.lastCtx = ctx;
    renderChart(d, ctx.chosen);
    renderStages(d, ctx.chosen);
    $("chart-title").textContent = ctx.title;
    $("live").classList.toggle("hidden", ctx.live);
    for (const fn of distListeners) fn(d, ctx);
  } catch (e) {
    if (e.name === "AbortError") return;
    chartMessage(e.message);
    $("stage-table").textContent = "";
    $("constraint-box").classList.add("hidden");
  }
}

function chartMessage(text) {
  const c = $("chart");
  c.textContent = "";
  const div = document.createElement("div");
  div.className = "msg";
  div.textContent = text;
  c.append(div);
  $("chart").dataset.signature = "";
}

function el(name, attrs, parent) {
  const e = document.createElementNS(SVGNS, name);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (parent) parent.append(e);
  return e;
}

function showTok(s) {
  return s.replace(/ /g, "\u2423").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5") || "\u2205";
}

function niceMax(x) {
  const e = Math.pow(10, Math.floor(Math.log10(x)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * e >= x) return m * e;
  return 10 * e;
}

function pct(p) {
  const v = 100 * p;
  return (Math.abs(v - Math.round(v)) < 1e-9 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2)) + "%";
}

function renderChart(d, chosenId) {
  const rows = d.tokens;
  const n = rows.length;
  const W = 940, H = 380, m = { l: 50, r: 46, t: 46, b: 80 };
  const iw = W - m.l - m.r, ih = H - m.t - m.b;
  const band = iw / Math.max(n, 1);
  const pmax = niceMax(Math.max(1e-6, ...rows.map((r) => Math.max(r.p_before, r.p_after))));
  const y = (p) => m.t + ih * (1 - p / pmax);
  const yc = (c) => m.t + ih * (1 - c);
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  // grid and axes
  for (let i = 0; i <= 4; i++) {
    const p = (pmax * i) / 4;
    el("line", { x1: m.l, x2: W - m.r, y1: y(p), y2: y(p), stroke: "#eee" }, svg);
    const t = el("text", { x: m.l - 6, y: y(p) + 4, "text-anchor": "end", "font-size": 11, fill: "#666" }, svg);
    t.textContent = pct(p);
    const t2 = el("text", { x: W - m.r + 6, y: yc(i / 4) + 4, "font-size": 11, fill: "#e8871e" }, svg);
    t2.textContent = (i / 4).toFixed(2);
  }
  const yl = el("text", { x: 12, y: m.t + ih / 2, "font-size": 11, fill: "#666",
    transform: `rotate(-90 12 ${m.t + ih / 2})`, "text-anchor": "middle" }, svg);
  yl.textContent = "probability";
  // bars
  rows.forEach((r, i) => {
    const x0 = m.l + i * band;
    const w = Math.max(1, band * 0.42);
    const b = el("rect", { x: x0 + band * 0.06, y: y(r.p_before), width: w, height: Math.max(0, y(0) - y(r.p_before)),
      fill: "#c9ccd3", class: "bar-before", "data-id": r.id, "data-p": r.p_before }, svg);
    const a = el("rect", { x: x0 + band * 0.06 + w, y: y(r.p_after), width: w,
      height: Math.max(0, y(0) - y(r.p_after)), fill: r.p_after > 0 ? "#2f6fdb" : "none",
      class: "bar-after", "data-id": r.id, "data-p": r.p_after }, svg);
    const tip = `#${r.rank} ${JSON.stringify(r.token)} (id ${r.id})\nmodel p ${r.p_before.toFixed(4)}\n` +
      `after temperature/penalties ${r.p_tempered.toFixed(4)}\nafter the knobs ${r.p_after.toFixed(4)}\n` +
      `cumulative ${r.cumulative.toFixed(4)}`;
    for (const e of [b, a]) el("title", {}, e).textContent = tip;
    if (chosenId !== null && r.id === chosenId) {
      el("rect", { x: x0 + 1, y: m.t, width: band - 2, height: ih, fill: "none", stroke: "#1d1d1f",
        "stroke-width": 1.5, "stroke-dasharray": "2 2" }, svg);
    }
    const lx = x0 + band / 2, ly = H - m.b + 8;
    const lab = el("text", { x: lx, y: ly, "font-size": 10, fill: r.allowed ? "#1f9d55" : "#333",
      "font-weight": r.allowed ? 700 : 400, "text-anchor": "end", transform: `rotate(-60 ${lx} ${ly})`,
      class: "xlabel" + (r.allowed ? " allowed" : "") }, svg);
    const s = showTok(r.token);
    lab.textContent = s.length > 12 ? s.slice(0, 11) + "\u2026" : s;
  });
  // cumulative mass line
  const pts = rows.map((r, i) => `${m.l + (i + 0.5) * band},${yc(r.cumulative)}`).join(" ");
  el("polyline", { points: pts, fill: "none", stroke: "#e8871e", "stroke-width": 2, class: "cum" }, svg);
  rows.forEach((r, i) => el("circle", { cx: m.l + (i + 0.5) * band, cy: yc(r.cumulative), r: 2, fill: "#e8871e" }, svg));
  // cut-offs: the number of tokens each truncation knob keeps on its own
  const cuts = [["top_k", "#d23c3c", "top-k", "6 3"], ["top_p", "#1f9d55", "top-p", "6 3"],
    ["min_p", "#8a4fd0", "min-p", "2 3"]];
  let labelRow = 0;
  for (const [name, color, label, dash] of cuts) {
    const c = d.cutoffs && d.cutoffs[name];
    if (!c) continue;
    const kept = Math.min(c.kept, n);
    const x = m.l + kept * band;
    el("line", { x1: x, x2: x, y1: m.t - 4, y2: m.t + ih, stroke: color, "stroke-width": 2,
      "stroke-dasharray": dash, class: "cut-" + name }, svg);
    // one row per cut-off label; labels near the right edge are drawn to the left of their line
    const right = x > W - m.r - 200;
    const t = el("text", { x: right ? x - 4 : x + 4, y: 12 + 13 * labelRow, "font-size": 11, fill: color,
      "text-anchor": right ? "end" : "start" }, svg);
    t.textContent = `${label} ${c.value} keeps ${c.kept}` + (c.kept > n ? ` (cut beyond rank ${n})` : "");
    labelRow += 1;
  }
  el("line", { x1: m.l, x2: W - m.r, y1: y(0), y2: y(0), stroke: "#999" }, svg);
  const c = $("chart");
  c.textContent = "";
  c.append(svg);
  c.dataset.signature = rows.map((r) => r.p_after.toFixed(5)).join(",");
  $("chart-info").textContent = `entropy ${d.entropy_before.toFixed(2)} \u2192 ${d.entropy_after.toFixed(2)} nats` +
    ` \u00b7 knobs keep ${d.kept} tokens (${pct(d.kept_mass)} of the mass)`;
}

// ---- stage by stage -----------------------------------------------------------------------------
const STAGE_COLORS = { model: "#9aa0aa", constraint: "#1f9d55" };

function renderStages(d, chosenId) {
  // one column per pipeline stage (p after it), one row per token; a removed token keeps its row, its
  // cell in the removing stage's column marked with a cross
  const table = $("stage-table");
  table.textContent = "";
  const stages = d.stages || [], rows = d.stage_rows || [];
  const head = table.insertRow();
  head.className = "stage-head";
  const th0 = document.createElement("th");
  th0.textContent = "token";
  head.append(th0);
  for (const st of stages) {
    const th = document.createElement("th");
    th.className = "stage-col";
    th.dataset.stage = st.stage;
    const name = document.createElement("div");
    name.textContent = st.stage.replace(/_/g, " ");
    const sub = document.createElement("div");
    sub.className = "sub";
    sub.textContent = st.stage === "model" ? `${st.kept} tokens`
      : `keeps ${st.kept}` + (st.mass_removed > 0 ? ` \u00b7 \u2212${pct(st.mass_removed)}` : "");
    th.title = `entropy after this stage: ${st.entropy.toFixed(3)} nats`;
    th.append(name, sub);
    head.append(th);
  }
  const thr = document.createElement("th");
  thr.textContent = "removed by";
  head.append(thr);
  const pmax = Math.max(1e-9, ...rows.map((r) => Math.max(...r.p)));
  for (const r of rows) {
    const tr = table.insertRow();
    tr.className = "srow" + (r.removed_by ? " removed removed-" + r.removed_by.replace(/[^a-z0-9]+/gi, "_") : " kept")
      + (r.allowed === true ? " allowed" : "") + (chosenId !== null && r.id === chosenId ? " chosen" : "");
    tr.dataset.id = r.id;
    tr.dataset.removedBy = r.removed_by || "";
    const tc = tr.insertCell();
    tc.className = "tokcell mono";
    tc.textContent = showTok(r.token);
    tc.title = `${JSON.stringify(r.token)} id ${r.id}, rank ${r.rank_model} by model p`;
    r.p.forEach((p, i) => {
      const c = tr.insertCell();
      const st = stages[i].stage;
      c.className = "pc";
      c.dataset.p = p;
      c.dataset.stage = st;
      if (r.removed_by === st) {
        c.classList.add("cut");
        c.textContent = "\u2715";
        c.title = `removed by ${st}`;
      } else if (p === 0 && r.removed_by && stages.findIndex((s) => s.stage === r.removed_by) < i) {
        c.classList.add("gone");
        c.textContent = "";
      } else {
        const bar = document.createElement("span");
        bar.className = "pbar";
        bar.style.width = Math.max(1, Math.round(48 * p / pmax)) + "px";
        bar.style.background = STAGE_COLORS[st] || "#2f6fdb";
        const num = document.createElement("span");
        num.className = "pnum";
        num.textContent = p >= 0.0001 ? pct(p) : p > 0 ? "<0.01%" : "0";
        c.append(bar, num);
      }
    });
    tr.insertCell().textContent = r.removed_by || "";
    tr.addEventListener("click", () => document.dispatchEvent(new CustomEvent("branch-token", { detail: r })));
  }
  const last = stages[stages.length - 1];
  $("stages-info").textContent = last ? `${stages.length - 1} stage${stages.length === 2 ? "" : "s"} ran \u00b7 `
    + `${last.kept} token${last.kept === 1 ? "" : "s"} left \u00b7 entropy ${stages[0].entropy.toFixed(2)} \u2192 `
    + `${last.entropy.toFixed(2)} nats` : "";
  renderConstraint(d);
}

function renderConstraint(d) {
  const box = $("constraint-box");
  const c = d.constraint;
  box.classList.toggle("hidden", !c);
  if (!c) return;
  $("constraint-info").textContent = `The ${c.kind} constraint allows ${c.allowed} of ${d.vocab_size} tokens here ` +
    `(${pct(c.allowed_mass)} of the model's p); the most probable of them:`;
  const chips = $("allowed-chips");
  chips.textContent = "";
  for (const t of c.top_allowed) {
    const s = document.createElement("span");
    s.className = "chip allowed-tok mono";
    s.textContent = showTok(t.token);
    s.title = `id ${t.id}, model p ${t.p_model.toExponential(2)}`;
    s.dataset.id = t.id;
    chips.append(s);
  }
}

// ---- tabs -----------------------------------------------------------------------------------------
const tabListeners = [];              // fn(name) when a tab is shown (views.js)

function showTab(name) {
  for (const t of document.querySelectorAll(".tab")) t.classList.toggle("sel", t.dataset.panel === name);
  for (const p of document.querySelectorAll(".panel")) p.classList.toggle("hidden", p.id !== "panel-" + name);
  for (const fn of tabListeners) fn(name);
}

function currentTab() {
  const t = document.querySelector(".tab.sel");
  return t ? t.dataset.panel : "pipeline";
}

// ---- output -----------------------------------------------------------------------------------
function tokenColor(p) { return `hsl(${Math.round(120 * p)}, 75%, 80%)`; }

function clearOutput() {
  state.tokens = [];
  state.view = null;
  const out = $("output");
  out.textContent = "";
  const echo = document.createElement("span");
  echo.className = "prompt-echo";
  echo.textContent = $("prompt").value;
  out.append(echo);
  $("details").classList.add("hidden");
}

function addToken(t) {
  const i = state.tokens.length;
  state.tokens.push(t);
  const span = document.createElement("span");
  span.className = "tok" + (t.text ? "" : " empty");
  span.textContent = t.text;
  span.dataset.index = i;
  span.dataset.id = t.id;
  const p = Math.exp(t.logprob);
  span.style.background = tokenColor(p);
  span.title = `${JSON.stringify(t.text)} id ${t.id} p=${p.toFixed(4)}`;
  span.addEventListener("click", () => selectToken(i));
  $("output").append(span);
}

function selectToken(i) {
  const t = state.tokens[i];
  if (!t) return;
  for (const s of document.querySelectorAll(".tok.sel")) s.classList.remove("sel");
  const span = document.querySelector(`.tok[data-index="${i}"]`);
  if (span) span.classList.add("sel");
  state.view = i;
  state.treeView = null;
  $("details").classList.remove("hidden");
  $("det-title").textContent = `Step ${i + 1}: ${JSON.stringify(t.text)} (id ${t.id}), model p = ${Math.exp(t.logprob).toFixed(4)}`;
  // alternatives: the model's top tokens at this step
  const alts = $("alts");
  alts.textContent = "";
  const head = alts.insertRow();
  for (const h of ["token", "p", ""]) { const th = document.createElement("th"); th.textContent = h; head.append(th); }
  const entries = Object.entries(t.top || {}).sort((a, b) => b[1] - a[1]);
  const chosenText = t.tokenStr !== undefined ? t.tokenStr : t.text;
  for (const [tok, lp] of entries) {
    const row = alts.insertRow();
    row.className = "alt" + (tok === chosenText ? " chosen" : "");
    const p = Math.exp(lp);
    row.insertCell().textContent = JSON.stringify(tok);
    const c2 = row.insertCell(); c2.className = "num"; c2.textContent = p.toFixed(4);
    const bar = document.createElement("span"); bar.className = "bar"; bar.style.width = Math.round(120 * p) + "px";
    row.insertCell().append(bar);
  }
  renderTrace(t.trace);
  scheduleDist(0);
}

function renderTrace(tr) {
  // tr.stages: one {stage, kept, mass_removed} per pipeline stage that ran, then the draw's summary
  // {entropy, token, rank, prob}. Unknown keys are shown as they come.
  const box = $("trace");
  box.textContent = "";
  if (!tr || !tr.stages) { box.textContent = "no trace for this step"; return; }
  const stages = tr.stages.filter((s) => "stage" in s);
  const summary = tr.stages.filter((s) => !("stage" in s));
  const fmt = (v) => typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(4))
    : (v === undefined || v === null ? "" : (typeof v === "string" ? v : JSON.stringify(v)));
  if (stages.length) {
    const table = document.createElement("table");
    table.className = "trace-step";
    const keys = [];
    for (const s of stages) for (const k of Object.keys(s)) if (!keys.includes(k)) keys.push(k);
    const head = table.insertRow();
    for (const k of keys) {
      const th = document.createElement("th");
      th.textContent = k.replace(/_/g, " ");
      head.append(th);
    }
    for (const s of stages) {
      const row = table.insertRow();
      for (const k of keys) {
        const cell = row.insertCell();
        if (typeof s[k] === "number") cell.className = "num";
        cell.textContent = fmt(s[k]);
      }
    }
    box.append(table);
  } else {
    const p = document.createElement("p");
    p.className = "hint";
    p.textContent = "no stage changed the distribution (every knob is off)";
    box.append(p);
  }
  for (const s of summary) {
    const p = document.createElement("p");
    p.className = "trace-summary mono";
    p.textContent = "drew " + Object.entries(s).map(([k, v]) => `${k} ${fmt(v)}`).join(", ");
    box.append(p);
  }
}

function setBusy(b) {
  state.busy = b;
  $("generate").disabled = b;
  $("step").disabled = b;
  $("stop").disabled = !b;
}

function requestBody(extra) {
  const body = { max_tokens: maxTokens(), logprobs: 10, explain: true, seed: state.seed, ...knobs(),
    ...completionConstraint(), ...extra };
  if ($("ignore_eos").checked) body.ignore_eos = true;
  return body;
}

async function generate() {
  if (state.busy) return;
  let ids;
  try { ids = await promptIds(); } catch (e) { setStatus(e.message, true); return; }
  clearOutput();
  state.seed = seedForRun();
  setBusy(true);
  setStatus(`generating (seed ${state.seed})\u2026`);
  const ctrl = new AbortController();
  state.genAbort = ctrl;
  let finish = null;
  try {
    const r = await fetch("/v1/completions", { method: "POST", headers: headers(), signal: ctrl.signal,
      body: JSON.stringify(requestBody({ prompt: ids, stream: true })) });
    if (!r.ok) {
      let msg = `${r.status}`;
      try { const d = await r.json(); msg = d.error.message; } catch (e) { /* not JSON */ }
      if (r.status === 401) $("keybox").classList.remove("hidden");
      throw new ApiError(msg, r.status);
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const evt = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of evt.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const payload = line.slice(6);
          if (payload === "[DONE]") continue;
          const obj = JSON.parse(payload);
          if (obj.error) throw new ApiError(obj.error.message, 500);
          for (const ch of obj.choices || []) {
            if (ch.token_ids && ch.token_ids.length) {
              const lp = ch.logprobs || {};
              addToken({ id: ch.token_ids[0], text: ch.text,
                tokenStr: lp.tokens ? lp.tokens[0] : undefined,
                logprob: lp.token_logprobs ? lp.token_logprobs[0] : 0,
                top: lp.top_logprobs ? lp.top_logprobs[0] : null, trace: ch.trace ? ch.trace[0] : null });
            }
            if (ch.finish_reason) finish = ch.finish_reason;
          }
        }
      }
    }
    setStatus(`${state.tokens.length} tokens, finish: ${finish}, seed ${state.seed}`);
  } catch (e) {
    if (e.name === "AbortError") setStatus(`stopped after ${state.tokens.length} tokens (seed ${state.seed})`);
    else setStatus(e.message, true);
  } finally {
    setBusy(false);
    state.genAbort = null;
    scheduleDist(0);
  }
}

async function step() {
  // One more token: ask for the output of length k+1 with the same seed. A request's randomness depends
  // only on its seed and its own token count, so these are exactly the tokens Generate would produce.
  if (state.busy) return;
  let ids;
  try { ids = await promptIds(); } catch (e) { setStatus(e.message, true); return; }
  if (state.seed === null || !state.tokens.length) state.seed = seedForRun();
  const k = state.tokens.length + 1;
  setBusy(true);
  try {
    const d = await api("/v1/completions", requestBody({ prompt: ids, max_tokens: k }));
    const ch = d.choices[0];
    const lp = ch.logprobs;
    const keepSeed = state.seed;
    clearOutput();
    state.seed = keepSeed;
    // per-token text: the UTF-8-safe pieces, from the cumulative decode of the token strings
    ch.token_ids.forEach((id, i) => addToken({ id, text: lp.tokens[i], tokenStr: lp.tokens[i],
      logprob: lp.token_logprobs[i], top: lp.top_logprobs[i], trace: ch.trace ? ch.trace[i] : null }));
    const done = ch.token_ids.length < k || ch.finish_reason === "stop";
    setStatus(`step ${ch.token_ids.length}${done ? `, finished (${ch.finish_reason})` : ""}, seed ${state.seed}`);
    if (state.tokens.length) selectToken(state.tokens.length - 1);
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    setBusy(false);
  }
}

function init() {
  buildControls();
  const saved = localStorage.getItem("logitlab_api_key");
  if (saved) $("apikey").value = saved;
  $("apikey").addEventListener("change", () => {
    localStorage.setItem("logitlab_api_key", $("apikey").value);
    loadModel();
    scheduleDist(0);
  });
  $("prompt").addEventListener("input", () => {
    state.view = null;
    state.treeView = null;
    document.dispatchEvent(new Event("prompt-changed"));  // the tree's paths belonged to the old prompt
    if (!state.tokens.length && !state.busy) clearOutput();  // keep the echo in step with the box
    scheduleDist(250);
  });
  $("chat").addEventListener("change", () => {
    state.view = null;
    state.treeView = null;
    document.dispatchEvent(new Event("prompt-changed"));
    scheduleDist(0);
  });
  $("generate").addEventListener("click", generate);
  $("step").addEventListener("click", step);
  $("stop").addEventListener("click", () => state.genAbort && state.genAbort.abort());
  $("clear").addEventListener("click", () => { clearOutput(); state.seed = null; setStatus(""); scheduleDist(0); });
  for (const t of document.querySelectorAll(".tab")) t.addEventListener("click", () => showTab(t.dataset.panel));
  $("c_kind").addEventListener("change", () => {
    const kind = $("c_kind").value;
    $("c_value").classList.toggle("hidden", !kind);
    $("c_value").placeholder = { regex: "[0-9]+", choice: "Paris\nLyon", json: '{"type": "object"}' }[kind] || "";
    scheduleDist(0);
  });
  $("c_value").addEventListener("input", () => scheduleDist(400));
  $("live").addEventListener("click", () => {
    state.view = null;
    state.treeView = null;
    for (const s of document.querySelectorAll(".tok.sel")) s.classList.remove("sel");
    scheduleDist(0);
  });
  clearOutput();
  loadModel();
  scheduleDist(0);
}

async function loadModel() {
  try {
    const d = await api("/v1/models");
    $("model").textContent = d.data.map((m) => m.id).join(", ");
  } catch (e) {
    setStatus(e.message, true);
  }
}

document.addEventListener("DOMContentLoaded", init);
