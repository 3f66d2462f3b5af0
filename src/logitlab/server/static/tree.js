// logitlab playground, Tree tab: rewind to any step and branch (a tree of continuations), and the beam
// search walk-through drawn as the same kind of tree. Uses playground.js's helpers ($, api, el, state ...).
//
// Client-side state only: a branch is a token-id path after the prompt with its own seed. Stepping a
// branch asks /v1/pipeline for the distribution after its path with `seed`: the server answers with the
// token a request with that seed draws there, so a branch sampled from the root with the seed box's seed
// is exactly the text Generate makes with it.
"use strict";

const tree = {
  branches: [],   // {name, ids, toks, lps (the model's log p of each token), seed, done}
  sel: null,      // the selected node: {path: [ids], branch: index or null}; null = nothing selected
  busy: false,
  beam: null,     // the last /v1/beam_tree answer
  made: 0,        // branches ever made (names and seeds of new ones)
};

const NODE_W = 74, NODE_H = 22, DX = 86;

function pathKey(ids) { return ids.join(","); }

function samePrefix(a, b, n) {
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return false;
  return true;
}

// ---- the tree of a set of paths, laid out as lanes -------------------------------------------------
function buildTrie(paths) {
  // paths: [{ids, toks, lps, tag}] -> root node {ids, depth, tok, lp, children, tags}
  const root = { ids: [], depth: 0, tok: null, lp: 0, children: [], tags: [] };
  const byKey = new Map([["", root]]);
  for (const p of paths) {
    let node = root;
    node.tags.push(p.tag);
    for (let d = 0; d < p.ids.length; d++) {
      const ids = p.ids.slice(0, d + 1);
      const key = pathKey(ids);
      let child = byKey.get(key);
      if (!child) {
        child = { ids, depth: d + 1, tok: p.toks[d], lp: p.lps ? p.lps[d] : null, cum: p.cums ? p.cums[d] : null,
          children: [], tags: [] };
        byKey.set(key, child);
        node.children.push(child);
      }
      child.tags.push(p.tag);
      node = child;
    }
  }
  return root;
}

function layout(root, dy) {
  // leaves take rows in depth-first order; a parent sits on its first child's row, so a branch that goes
  // straight on stays on one line and its forks open below it
  let row = 0;
  const nodes = [];
  (function walk(n) {
    nodes.push(n);
    if (!n.children.length) { n.row = row++; return; }
    n.children.forEach(walk);
    n.row = n.children[0].row;
  })(root);
  for (const n of nodes) { n.x = 10 + n.depth * DX; n.y = 10 + n.row * dy; }
  return { nodes, rows: row };
}

function drawTree(container, root, opts) {
  // opts: {dy, nodeClass(n), label(n), sub(n) (second line), leafNote(n), selectedKey, onClick(n)}
  const dy = opts.dy;
  const { nodes, rows } = layout(root, dy);
  const depth = Math.max(0, ...nodes.map((n) => n.depth));
  const W = 20 + (depth + 1) * DX + 260, H = 20 + Math.max(1, rows) * dy;
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img" });
  for (const n of nodes) {
    for (const c of n.children) {
      const x1 = n.x + NODE_W, y1 = n.y + NODE_H / 2, x2 = c.x, y2 = c.y + NODE_H / 2;
      const mx = (x1 + x2) / 2;
      el("path", { d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`, fill: "none", stroke: "#b9bcc4",
        "stroke-width": 1.3, class: "edge" }, svg);
    }
  }
  for (const n of nodes) {
    const g = el("g", { class: "node " + (opts.nodeClass(n) || ""), "data-depth": n.depth,
      "data-path": pathKey(n.ids), transform: `translate(${n.x},${n.y})` }, svg);
    const selected = opts.selectedKey !== null && opts.selectedKey === pathKey(n.ids);
    if (selected) g.classList.add("selected");
    el("rect", { width: NODE_W, height: NODE_H + (opts.sub ? 12 : 0), rx: 4, fill: opts.fill(n),
      stroke: selected ? "#1d1d1f" : "#c9ccd3", "stroke-width": selected ? 2.2 : 1 }, g);
    const t = el("text", { x: 5, y: 15, "font-size": 11, "font-family": "ui-monospace, monospace", fill: "#1d1d1f" }, g);
    const label = opts.label(n);
    t.textContent = label.length > 10 ? label.slice(0, 9) + "\u2026" : label;
    if (opts.sub) {
      const s = el("text", { x: 5, y: 29, "font-size": 9.5, fill: "#555" }, g);
      s.textContent = opts.sub(n);
    }
    el("title", {}, g).textContent = opts.title(n);
    const note = !n.children.length && opts.leafNote ? opts.leafNote(n) : "";
    if (note) {
      const lt = el("text", { x: NODE_W + 8, y: 15, "font-size": 11, fill: "#333", class: "leaf-note" }, g);
      lt.textContent = note;
    }
    g.addEventListener("click", () => opts.onClick(n));
  }
  container.textContent = "";
  container.append(svg);
  return nodes.length;
}

// ---- your branches ---------------------------------------------------------------------------------
function cumLogprob(b, n) { return b.lps.slice(0, n === undefined ? b.lps.length : n).reduce((a, x) => a + x, 0); }

function renderBranches() {
  const paths = tree.branches.map((b, i) => ({ ids: b.ids, toks: b.toks, lps: b.lps, tag: i }));
  const root = buildTrie(paths);
  const leafBranch = (n) => tree.branches.findIndex((b) => b.ids.length === n.depth && samePrefix(b.ids, n.ids, n.depth));
  const count = drawTree($("tree"), root, {
    dy: 30,
    nodeClass: (n) => (n.depth === 0 ? "root" : "tnode"),
    fill: (n) => (n.depth === 0 ? "#eef0f4" : tokenColor(Math.exp(n.lp))),
    label: (n) => (n.depth === 0 ? "prompt" : showTok(n.tok)),
    title: (n) => n.depth === 0 ? "the prompt: click to see (and branch on) the first token"
      : `step ${n.depth}: ${JSON.stringify(n.tok)} (id ${n.ids[n.depth - 1]}), model p ${Math.exp(n.lp).toFixed(4)}`,
    leafNote: (n) => {
      const i = leafBranch(n);
      if (i < 0) return "";
      const b = tree.branches[i];
      return `${b.name} \u00b7 \u03a3 log p ${cumLogprob(b).toFixed(2)} \u00b7 seed ${b.seed}${b.done ? " \u00b7 end" : ""}`;
    },
    selectedKey: tree.sel ? pathKey(tree.sel.path) : null,
    onClick: (n) => selectNode(n.ids),
  });
  $("tree").dataset.nodes = count;
  const table = $("branches");
  table.textContent = "";
  const head = table.insertRow();
  for (const h of ["branch", "tokens", "\u03a3 log p", "seed", "text"]) {
    const th = document.createElement("th");
    th.textContent = h;
    head.append(th);
  }
  tree.branches.forEach((b, i) => {
    const tr = table.insertRow();
    tr.className = "branch-row";
    tr.dataset.ids = b.ids.join(",");
    tr.dataset.logprob = cumLogprob(b);
    tr.insertCell().textContent = b.name;
    const c1 = tr.insertCell(); c1.className = "num"; c1.textContent = b.ids.length;
    const c2 = tr.insertCell(); c2.className = "num"; c2.textContent = cumLogprob(b).toFixed(3);
    const c3 = tr.insertCell(); c3.className = "num"; c3.textContent = b.seed;
    const c4 = tr.insertCell(); c4.className = "mono branch-text"; c4.textContent = b.toks.join("").replace(/\n/g, "\u21b5");
    tr.addEventListener("click", () => selectNode(tree.branches[i].ids));
  });
  $("tree-info").textContent = tree.branches.length
    ? `${tree.branches.length} branch${tree.branches.length === 1 ? "" : "es"}, ${count - 1} nodes` : "no branches yet";
}

function branchSeed() {
  // branch k (from 0) samples with seed + k: branch 1 is the seed box's own
  const v = $("seed").value.trim();
  const base = v !== "" && Number.isFinite(Number(v)) ? Math.max(0, Math.floor(Number(v))) : null;
  if (tree.base === undefined || tree.base === null || (base !== null && base !== tree.base)) {
    tree.base = base !== null ? base : Math.floor(Math.random() * 2147483647);
  }
  return tree.base + tree.made;
}

function addBranch(ids, toks, lps) {
  const key = pathKey(ids);
  const same = tree.branches.findIndex((b) => pathKey(b.ids) === key);
  if (same >= 0) return same;
  const b = { name: `b${tree.made + 1}`, ids: ids.slice(), toks: toks.slice(), lps: lps.slice(), seed: branchSeed(),
    done: false };
  tree.made += 1;
  tree.branches.push(b);
  return tree.branches.length - 1;
}

function nodeInfo(path) {
  // the texts and model logprobs of a path's tokens, from any branch through it
  const b = tree.branches.find((x) => x.ids.length >= path.length && samePrefix(x.ids, path, path.length));
  return b ? { toks: b.toks.slice(0, path.length), lps: b.lps.slice(0, path.length) } : null;
}

function selectNode(path) {
  // rewind to this node: the Pipeline tab and the alternatives show the step that chose its token
  // (for the root: the first token); Sample continues after it
  tree.sel = { path: path.slice() };
  const d = path.length;
  const info = nodeInfo(path);
  const tokText = d && info ? JSON.stringify(info.toks[d - 1]) : "";
  state.view = null;
  for (const s of document.querySelectorAll(".tok.sel")) s.classList.remove("sel");
  state.treeView = {
    generated: d ? path.slice(0, d - 1) : [],
    chosen: d ? path[d - 1] : null,
    title: d ? `Tree: step ${d}, ${tokText}` : "Tree: the first token",
  };
  renderBranches();
  scheduleDist(0);
}

function renderAlternatives(d) {
  const table = $("tree-alts");
  table.textContent = "";
  if (!tree.sel || !state.treeView) { $("tree-alts-title").textContent = "Alternatives (select a node)"; return; }
  const depth = tree.sel.path.length;
  $("tree-alts-title").textContent = depth ? `Alternatives at step ${depth} (click one to branch there)`
    : "First token (click one to branch)";
  const head = table.insertRow();
  for (const h of ["token", "model p", "p after knobs", ""]) {
    const th = document.createElement("th");
    th.textContent = h;
    head.append(th);
  }
  const rows = d.tokens.slice(0, 12);
  const chosen = state.treeView.chosen;
  if (chosen !== null && !rows.some((r) => r.id === chosen)) {
    // the token chosen here, wherever it ranks (from the 50 rows, else from the tree: its model p)
    const info = nodeInfo(tree.sel.path);
    rows.push(d.tokens.find((r) => r.id === chosen) || { id: chosen, token: info ? info.toks[depth - 1] : "?",
      p_before: info ? Math.exp(info.lps[depth - 1]) : NaN, p_after: NaN });
  }
  for (const r of rows) {
    const tr = table.insertRow();
    tr.className = "alt-row" + (r.id === state.treeView.chosen ? " chosen" : "");
    tr.dataset.id = r.id;
    tr.insertCell().textContent = JSON.stringify(r.token);
    const c1 = tr.insertCell(); c1.className = "num"; c1.textContent = r.p_before.toFixed(4);
    const c2 = tr.insertCell(); c2.className = "num"; c2.textContent = Number.isNaN(r.p_after) ? "" : r.p_after.toFixed(4);
    const btn = document.createElement("button");
    btn.className = "linkish branch-btn";
    btn.textContent = "branch";
    tr.insertCell().append(btn);
    tr.addEventListener("click", () => branchAt(r));
  }
}

function branchAt(r) {
  // a new branch: the selected step's context + this token instead of the one chosen there
  if (!tree.sel || !state.treeView) return;
  const base = state.treeView.generated;
  const info = nodeInfo(base) || { toks: [], lps: [] };
  const i = addBranch([...base, r.id], [...info.toks, r.token], [...info.lps, Math.log(r.p_before)]);
  selectNode(tree.branches[i].ids);
}

async function sampleMore(k) {
  // continue after the selected node (the root if none): extend the branch ending there, or start one
  if (tree.busy) return;
  const path = tree.sel ? tree.sel.path : [];
  let i = tree.branches.findIndex((b) => pathKey(b.ids) === pathKey(path));
  if (i < 0) {
    const info = nodeInfo(path) || { toks: [], lps: [] };
    i = addBranch(path, info.toks, info.lps);
  }
  const b = tree.branches[i];
  tree.busy = true;
  for (const id of ["tree-sample1", "tree-sample5"]) $(id).disabled = true;
  try {
    const ids = await promptIds();
    for (let n = 0; n < k && !b.done; n++) {
      const d = await api("/v1/pipeline", { prompt: ids, generated: b.ids, seed: b.seed, top: 1, stage_top: 0,
        ...knobs(), ...constraintFields() });
      const s = d.sampled;
      if (!s) { b.done = true; setStatus(`${b.name}: no token is left after the knobs`, true); break; }
      b.ids.push(s.id);
      b.toks.push(s.token);
      b.lps.push(s.logprob);
      if (s.eos && !$("ignore_eos").checked) b.done = true;
    }
    selectNode(b.ids);
  } catch (e) {
    setStatus(e.message, true);
    renderBranches();
  } finally {
    tree.busy = false;
    for (const id of ["tree-sample1", "tree-sample5"]) $(id).disabled = false;
  }
}

function branchFromOutput() {
  if (!state.tokens.length) { setStatus("generate something first", true); return; }
  const i = addBranch(state.tokens.map((t) => t.id), state.tokens.map((t) => t.tokenStr !== undefined ? t.tokenStr : t.text),
    state.tokens.map((t) => t.logprob));  // Generate asks for raw logprobs: the model's own
  tree.branches[i].seed = state.seed;
  selectNode(tree.branches[i].ids);
}

function clearTree() {
  tree.branches = [];
  tree.sel = null;
  tree.made = 0;
  tree.base = null;
  if (state.treeView) { state.treeView = null; scheduleDist(0); }
  renderBranches();
  renderAlternatives(null);
}

// ---- the beam search walk-through -----------------------------------------------------------------
async function runBeam() {
  const body = { width: Math.round(Number($("beam-width").value)), max_tokens: Math.round(Number($("beam-tokens").value)),
    length_penalty: Number($("beam-lp").value) };
  $("beam-run").disabled = true;
  $("beam-info").textContent = "searching\u2026";
  try {
    const d = await api("/v1/beam_tree", { prompt: await promptIds(), ...body });
    tree.beam = d;
    renderBeam();
  } catch (e) {
    $("beam-info").textContent = e.message;
  } finally {
    $("beam-run").disabled = false;
  }
}

function renderBeam() {
  const d = tree.beam;
  const text = (id) => d.token_texts[String(id)];
  const info = new Map();  // path -> {cum, tokenProb, inBeam, finished, best}
  const mark = (ids, extra) => {
    const k = pathKey(ids);
    info.set(k, { ...(info.get(k) || {}), ...extra });
  };
  for (const s of d.steps) {
    for (const c of s.candidates) mark(c.ids, { cum: c.logprob, tokenProb: c.token_prob, step: s.step });
    for (const b of s.beams) mark(b.ids, { cum: b.logprob, inBeam: true });
    for (const f of s.finished) mark(f.ids, { cum: f.logprob, finished: true, score: f.score });
  }
  d.hypotheses.forEach((h, i) => mark(h.ids, { cum: h.logprob, best: i + 1, score: h.score }));
  const paths = [...info.keys()].filter((k) => k).map((k) => {
    const ids = k.split(",").map(Number);
    return { ids, toks: ids.map(text), tag: k };
  });
  const root = buildTrie(paths);
  const count = drawTree($("beam-tree"), root, {
    dy: 40,
    nodeClass: (n) => {
      if (n.depth === 0) return "root";
      const m = info.get(pathKey(n.ids)) || {};
      return "bnode" + (m.inBeam ? " in-beam" : "") + (m.finished ? " finished" : "") + (m.best ? " best" : "")
        + (!m.inBeam && !m.finished && !m.best ? " pruned" : "");
    },
    fill: (n) => {
      if (n.depth === 0) return "#eef0f4";
      const m = info.get(pathKey(n.ids)) || {};
      return m.best ? "#ffd27a" : m.finished ? "#cfe9d6" : m.inBeam ? "#cfe0fb" : "#f3f3f1";
    },
    label: (n) => (n.depth === 0 ? "prompt" : showTok(text(n.ids[n.depth - 1]))),
    sub: (n) => {
      const m = info.get(pathKey(n.ids));
      return n.depth === 0 || !m ? "" : `\u03a3 ${m.cum.toFixed(2)}`;
    },
    title: (n) => {
      const m = info.get(pathKey(n.ids));
      if (n.depth === 0 || !m) return "the prompt";
      return `${JSON.stringify(text(n.ids[n.depth - 1]))}: token p ${m.tokenProb !== undefined ? m.tokenProb.toFixed(4) : "?"}`
        + `, sum of log p ${m.cum.toFixed(3)}` + (m.score !== undefined ? `, score ${m.score.toFixed(3)}` : "")
        + (m.inBeam ? ", kept in the beam" : m.finished ? ", finished" : ", pruned") + "\nclick: open it as a branch";
    },
    leafNote: (n) => {
      const m = info.get(pathKey(n.ids)) || {};
      return m.best ? `#${m.best} score ${m.score.toFixed(3)}` : m.finished ? `end, score ${m.score.toFixed(3)}` : "";
    },
    selectedKey: null,
    onClick: (n) => {
      if (!n.depth) return;
      const i = addBranch(n.ids, n.ids.map(text), []);
      const b = tree.branches[i];
      if (b.lps.length !== b.ids.length) b.lps = beamLogprobs(n.ids, info);
      selectNode(b.ids);
    },
  });
  $("beam-tree").dataset.nodes = count;
  $("beam-info").textContent = `width ${d.width}, ${d.steps.length} steps, ${d.forwards} forwards, ${count - 1} nodes`;
  const table = $("beam-hyps");
  table.textContent = "";
  const head = table.insertRow();
  for (const h of ["#", "text", "\u03a3 log p", "score", "finish"]) {
    const th = document.createElement("th");
    th.textContent = h;
    head.append(th);
  }
  d.hypotheses.forEach((h, i) => {
    const tr = table.insertRow();
    tr.className = "hyp-row";
    tr.dataset.ids = h.ids.join(",");
    tr.dataset.logprob = h.logprob;
    tr.insertCell().textContent = i + 1;
    const t = tr.insertCell(); t.className = "mono"; t.textContent = JSON.stringify(h.text);
    const c1 = tr.insertCell(); c1.className = "num"; c1.textContent = h.logprob.toFixed(3);
    const c2 = tr.insertCell(); c2.className = "num"; c2.textContent = h.score.toFixed(3);
    tr.insertCell().textContent = h.finish_reason;
  });
}

function beamLogprobs(ids, info) {
  // each token's log p from the walk-through's running sums (the beam's log p are the model's own)
  const out = [];
  let prev = 0;
  for (let d = 1; d <= ids.length; d++) {
    const m = info.get(pathKey(ids.slice(0, d)));
    const cum = m ? m.cum : prev;
    out.push(cum - prev);
    prev = cum;
  }
  return out;
}

// ---- wiring -----------------------------------------------------------------------------------------
distListeners.push((d) => {
  if (!state.treeView && tree.sel) { tree.sel = null; renderBranches(); }
  renderAlternatives(d);
});

document.addEventListener("DOMContentLoaded", () => {
  $("tree-sample1").addEventListener("click", () => sampleMore(1));
  $("tree-sample5").addEventListener("click", () => sampleMore(5));
  $("tree-from-output").addEventListener("click", branchFromOutput);
  $("tree-clear").addEventListener("click", clearTree);
  $("beam-run").addEventListener("click", runBeam);
  document.addEventListener("prompt-changed", () => {
    tree.branches = [];
    tree.sel = null;
    tree.made = 0;
    tree.beam = null;
    $("beam-tree").textContent = "";
    $("beam-hyps").textContent = "";
    renderBranches();
  });
  document.addEventListener("branch-token", (e) => {  // a row of the Pipeline tab's stage table
    if (!tree.sel) selectNodeSilently(viewContext());
    branchAt({ id: e.detail.id, token: e.detail.token, p_before: e.detail.p[0] });
    showTab("tree");
  });
  renderBranches();
});

function selectNodeSilently(ctx) {
  // the Pipeline tab's step (an output token or the next one) as the tree's selection, so a click on a
  // stage-table row branches at that step
  const path = ctx.chosen === null ? ctx.generated.slice() : [...ctx.generated, ctx.chosen];
  tree.sel = { path };
  state.treeView = { generated: ctx.generated.slice(), chosen: ctx.chosen, title: "" };
  if (ctx.generated.length && !nodeInfo(ctx.generated)) {  // the step is in the output: the output joins the tree
    const i = addBranch(state.tokens.map((t) => t.id), state.tokens.map((t) => t.tokenStr !== undefined ? t.tokenStr
      : t.text), state.tokens.map((t) => t.logprob));
    tree.branches[i].seed = state.seed;
  }
}
