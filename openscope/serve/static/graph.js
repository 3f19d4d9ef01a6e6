// openscope explorer: attribution graphs. Plain JS, no build step; loaded before app.js, whose helpers
// (h, s, fill, api, qs, fmt, showToken, errorBox, spinner, serverInfo) it calls at run time.
// Routes, hooked into app.js's route():
//   #/graphs                        saved graphs (GET /api/graphs) and a form to run a new one
//   #/graph/SLUG?threshold=&node=   one graph (GET /api/graphs/SLUG) drawn as SVG: columns are token
//                                   positions, rows layers (embeddings at the bottom, logits on top);
//                                   links' width and opacity grow with |weight|, colour = sign.
// A graph file is the circuit-tracer / Neuronpedia schema (openscope.attribution.schema): node
// `influence` is cumulative (small = important), so the threshold slider keeps nodes with
// influence <= threshold; tokens and logits are always shown.
// Everything lives in this closure: only `openscopeGraphs` is global (app.js defines many names).
"use strict";

const openscopeGraphs = (() => {
  const KIND = {
    "embedding": "token", "cross layer transcoder": "feature", "mlp reconstruction error": "error", "logit": "logit",
  };
  const KIND_LABEL = {token: "Token", feature: "Feature", error: "Error node", logit: "Logit"};
  const MAX_LINKS = 2500; // drawn at once, strongest first: SVG gets slow and unreadable beyond
  const STEP = 11; // px between nodes sharing a cell
  const graphHref = (slug) => `#/graph/${encodeURIComponent(slug)}`;
  const root = () => document.getElementById("app");
  const quote = (t) => JSON.stringify(t === undefined || t === null ? "" : t);

  function markNav() {
    document.querySelectorAll("nav a[data-nav]").forEach((a) => a.classList.toggle("active", a.dataset.nav === "graphs"));
  }

  // ---- #/graphs ------------------------------------------------------------------------------------

  async function list(params) {
    markNav();
    const el = root();
    fill(el, h("h1", {}, "Attribution graphs"), spinner("loading…"));
    const index = await api("/api/graphs");
    const out = h("div", {id: "graph-run-out"});
    let form;
    if (index.can_run) {
      const prompt = h("input", {type: "text", id: "graph-prompt", class: "grow", value: params.get("prompt") || "The capital of France is",
        maxlength: serverInfo ? serverInfo.max_prompt_chars : undefined, placeholder: `a short prompt (at most ${index.max_tokens} tokens)`});
      const threshold = h("input", {type: "number", id: "graph-node-threshold", min: 0.05, max: 1, step: 0.05, value: 0.8,
        title: "pruning: keep the nodes holding this fraction of the influence on the logits"});
      const button = h("button", {type: "submit", id: "graph-run"}, "Run graph");
      form = h("form", {class: "row", id: "graph-form", onsubmit: async (e) => {
        e.preventDefault();
        button.disabled = true;
        fill(out, spinner("attributing: one backward pass per node…"));
        try {
          const made = await api("/api/graphs", {prompt: prompt.value, node_threshold: Number(threshold.value)});
          location.hash = graphHref(made.slug);
        } catch (err) { fill(out, errorBox(err)); }
        finally { button.disabled = false; }
      }}, prompt, " node threshold ", threshold, button);
    } else {
      form = h("p", {class: "muted", id: "graph-run-unavailable"}, "New graphs cannot run on this server: ", index.run_hint);
    }
    const rows = index.graphs.map((g) => (g.error
      ? h("tr", {class: "graph-row broken"}, h("td", {class: "mono"}, g.slug), h("td", {colspan: 8, class: "error-cell"}, g.error))
      : h("tr", {class: "graph-row"},
        h("td", {}, h("a", {href: graphHref(g.slug), class: "mono"}, g.slug)),
        h("td", {class: "mono prompt"}, quote(g.prompt)),
        h("td", {class: "mono muted"}, g.model),
        h("td", {class: "num"}, g.n_nodes), h("td", {class: "num"}, g.n_features), h("td", {class: "num"}, g.n_links),
        h("td", {class: "num", title: "fraction of the influence on the logits flowing from tokens through features only"}, fmt(g.replacement_score, 2)),
        h("td", {class: "num", title: "influence-weighted fraction of the nodes' inputs that does not come from error nodes"}, fmt(g.completeness_score, 2)),
        h("td", {class: "muted created"}, g.created_ms ? new Date(g.created_ms).toLocaleString() : "–"))));
    fill(el,
      h("h1", {}, "Attribution graphs"),
      h("p", {class: "muted"}, "How the model computes its next token, through transcoder latents: nodes are tokens, active latents, error nodes and the top logits; a link is the direct effect of one node on another."),
      h("div", {class: "card"}, h("h2", {style: "margin-top:0"}, "Run a new graph"), form, out),
      h("h2", {}, `${index.graphs.length} saved graph${index.graphs.length === 1 ? "" : "s"}`, h("span", {class: "muted mono", style: "text-transform:none;letter-spacing:0"}, ` in ${index.folder}`)),
      index.graphs.length
        ? h("div", {class: "card"}, h("table", {class: "results", id: "graph-list"},
          h("thead", {}, h("tr", {}, ["graph", "prompt", "model", "nodes", "features", "links", "replacement", "completeness", "created"].map((c) => h("th", {}, c)))),
          h("tbody", {}, rows)))
        : h("p", {class: "muted", id: "no-graphs"}, "No graphs yet: run one above, or write them into this folder with `openscope attribute PROMPT --output FOLDER/NAME.json`."));
  }

  // ---- layout (pure) ------------------------------------------------------------------------------

  /** Positions of the given nodes. Column = token position; row 0 = embeddings, 1..nLayers = model
   *  layers, nLayers + 1 = logits. Nodes sharing a cell are spread in lines, most influential first;
   *  logits spread leftwards from the last column, most probable rightmost. */
  function layoutGraph(nodes, nTokens, nLayers, width) {
    const M = {left: 56, right: 24, top: 36, bottom: 58};
    const colW = Math.max(44, (width - M.left - M.right) / nTokens);
    const nRows = nLayers + 2;
    const rowH = Math.max(34, Math.min(72, 640 / nRows));
    const W = M.left + colW * nTokens + M.right, H = M.top + rowH * nRows + M.bottom;
    const colX = (c) => M.left + colW * (c + 0.5);
    const rowY = (r) => M.top + rowH * (nRows - 1 - r + 0.5);
    const rowOf = (n) => (n.kind === "token" ? 0 : n.kind === "logit" ? nRows - 1 : parseInt(n.layer, 10) + 1);
    const pos = new Map();
    const cells = new Map();
    const logits = [];
    for (const n of nodes) {
      if (n.kind === "logit") { logits.push(n); continue; }
      const key = `${rowOf(n)}:${n.ctx_idx}`;
      if (!cells.has(key)) cells.set(key, []);
      cells.get(key).push(n);
    }
    const rank = (n) => (n.influence === null || n.influence === undefined ? 2 : n.influence);
    for (const cell of cells.values()) {
      cell.sort((a, b) => rank(a) - rank(b));
      const r = rowOf(cell[0]), c = cell[0].ctx_idx;
      const perLine = Math.max(1, Math.floor((colW - 12) / STEP));
      const lines = Math.ceil(cell.length / perLine);
      const gap = lines > 1 ? Math.min(STEP, (rowH - 12) / (lines - 1)) : 0;
      cell.forEach((n, i) => {
        const line = Math.floor(i / perLine), inLine = Math.min(perLine, cell.length - line * perLine);
        pos.set(n.node_id, {x: colX(c) + ((i % perLine) - (inLine - 1) / 2) * STEP, y: rowY(r) + (line - (lines - 1) / 2) * gap});
      });
    }
    logits.sort((a, b) => b.token_prob - a.token_prob);
    const last = colX(nTokens - 1);
    const spacing = logits.length > 1 ? Math.min(64, (last - M.left - 16) / (logits.length - 1)) : 0;
    logits.forEach((n, i) => pos.set(n.node_id, {x: last - i * spacing, y: rowY(nRows - 1)}));
    return {pos, W, H, M, colW, rowH, nRows, colX, rowY};
  }

  // ---- #/graph/SLUG --------------------------------------------------------------------------------

  async function show(slug, params) {
    markNav();
    const el = root();
    fill(el, spinner(`loading graph ${slug}…`));
    const g = await api(`/api/graphs/${encodeURIComponent(slug)}`);
    const meta = g.metadata, info = meta.openscope || null;
    const nodes = g.nodes.map((n) => ({...n, kind: KIND[n.feature_type] || "feature"}));
    const byId = new Map(nodes.map((n) => [n.node_id, n]));
    const incoming = new Map(), outgoing = new Map();
    for (const l of g.links) {
      if (!incoming.has(l.target)) incoming.set(l.target, []);
      if (!outgoing.has(l.source)) outgoing.set(l.source, []);
      incoming.get(l.target).push(l);
      outgoing.get(l.source).push(l);
    }
    const tokens = meta.prompt_tokens && meta.prompt_tokens.length ? meta.prompt_tokens
      : Array.from({length: Math.max(0, ...nodes.map((n) => n.ctx_idx)) + 1}, (_, i) => `#${i}`);
    const logitNode = nodes.find((n) => n.kind === "logit");
    const nLayers = logitNode ? parseInt(logitNode.layer, 10) - 1
      : Math.max(0, ...nodes.filter((n) => n.kind === "feature" || n.kind === "error").map((n) => parseInt(n.layer, 10) + 1));
    const pageTemplate = (info && info.feature_page) || "#/feature/{dictionary}/{latent}";
    const featurePage = (n) => pageTemplate.replace("{dictionary}", encodeURIComponent(n.dictionary)).replace("{latent}", String(n.latent));
    const canLink = (n) => n.kind === "feature" && n.dictionary !== null && n.dictionary !== undefined && n.latent !== null && n.latent !== undefined;
    // Pruning keeps "just over" its fraction, so a saved node's influence may exceed node_threshold:
    // start at the largest one, so every saved node shows.
    const influences = nodes.filter((n) => n.kind === "feature" || n.kind === "error").map((n) => n.influence).filter((x) => typeof x === "number");
    const allShown = influences.length ? Math.min(1, Math.ceil(Math.max(...influences) * 100) / 100) : meta.node_threshold || 0.8;
    const state = {
      threshold: Number(params.get("threshold")) || allShown,
      selected: params.get("node") || null,
      edits: [], // node ids to zero or scale
    };

    const tokenAt = (p) => quote(tokens[p]);
    const label = (n) => ({
      token: `emb ${quote(n.token !== undefined && n.token !== null ? n.token : tokens[n.ctx_idx])}`,
      feature: `L${n.layer} #${n.latent !== null && n.latent !== undefined ? n.latent : n.feature} @${n.ctx_idx}`,
      error: `err L${n.layer} @${n.ctx_idx}`,
      logit: `logit ${quote(n.token)}`,
    })[n.kind];

    // Top logits of a feature, from its dashboard (the feature page's data), fetched once.
    const logitCache = new Map();
    function topLogits(n) {
      const key = `${n.dictionary}/${n.latent}`;
      if (!logitCache.has(key)) {
        logitCache.set(key, api("/api/feature" + qs({dictionary: n.dictionary, latent: n.latent}))
          .then((f) => ({tokens: f.top_logits.slice(0, 6)}), (err) => ({error: err.message})));
      }
      return logitCache.get(key);
    }
    const logitLine = (r) => (r.error ? `top logits: – (${r.error})` : `top logits: ${r.tokens.map((t) => quote(t.token)).join(" ") || "–"}`);

    function facts(n) {
      const rows = [];
      if (n.kind === "feature") {
        rows.push(`layer ${n.layer} · position ${n.ctx_idx} ${tokenAt(n.ctx_idx)}`);
        rows.push(`activation ${fmt(n.activation)} · influence ${fmt(n.influence, 2)}`);
        if (canLink(n)) rows.push(`${n.dictionary} #${n.latent}`);
      } else if (n.kind === "error") {
        rows.push(`reconstruction error of layer ${n.layer}'s transcoder at position ${n.ctx_idx} ${tokenAt(n.ctx_idx)}`);
        rows.push(`influence ${fmt(n.influence, 2)}`);
      } else if (n.kind === "token") {
        rows.push(`token ${quote(n.token !== undefined && n.token !== null ? n.token : tokens[n.ctx_idx])} at position ${n.ctx_idx}`);
        if (n.influence !== null && n.influence !== undefined) rows.push(`influence ${fmt(n.influence, 2)}`);
      } else {
        rows.push(`next token ${quote(n.token)} · p = ${fmt(n.token_prob)}`);
      }
      return rows;
    }

    // -- the page
    const slider = h("input", {type: "range", id: "graph-threshold", min: 0.05, max: 1, step: 0.01, value: state.threshold});
    const sliderValue = h("span", {class: "mono", id: "graph-threshold-value"});
    const count = h("span", {class: "muted", id: "graph-count"});
    const wrap = h("div", {class: "graph-wrap card"});
    const tooltip = h("div", {id: "graph-tooltip", class: "graph-tooltip", hidden: true});
    const panel = h("div", {class: "card graph-panel", id: "graph-node"}, h("p", {class: "muted"}, "Hover a node for its details; click one to see its links (and, for a feature, its dashboard)."));
    const editCard = h("div", {class: "card graph-panel", id: "graph-edit"});
    const metrics = info ? info.metrics : null;
    const dictNames = info ? info.dictionaries.map((d) => d.name).join(", ") : (meta.transcoder_list || []).join(", ");
    fill(el,
      h("div", {class: "muted"}, h("a", {href: "#/graphs"}, "◀ all graphs"), ` · ${slug}`),
      // Both tools write the prompt with its BOS text first ("<bos>The ..."): the title leaves it out.
      h("h1", {id: "graph-title", class: "mono"}, quote(meta.prompt.replace(/^<[^<>\s]+>/, ""))),
      h("div", {class: "stats"},
        stat(info ? info.model : meta.scan, info ? "model" : "transcoders"), stat(dictNames || "–", "dictionaries"),
        metrics && stat(fmt(metrics.replacement_score, 2), "replacement score"),
        metrics && stat(fmt(metrics.completeness_score, 2), "completeness score"),
        stat(`${g.nodes.length} / ${g.links.length}`, "nodes / links")),
      h("div", {class: "row graph-controls"},
        h("label", {for: "graph-threshold"}, "node threshold "), slider, sliderValue, count,
        h("span", {class: "graph-legend"},
          legendDot("token", "token"), legendDot("feature", "feature"), legendDot("error", "error"), legendDot("logit", "logit"),
          h("span", {class: "lg-line pos"}), " excites ", h("span", {class: "lg-line neg"}), " inhibits")),
      h("div", {class: "graph-cols"}, wrap, h("div", {}, panel, editCard)));
    wrap.append(tooltip);
    const width = Math.max(600, wrap.clientWidth - 30);
    let svg = null;
    let lines = new Map(); // node id -> its drawn links
    let shown = new Map(); // node id -> its drawn element

    function stat(v, name) { return h("div", {class: "stat"}, h("b", {class: "small"}, v), h("span", {}, name)); }
    function legendDot(kind, text) { return h("span", {class: "lg"}, h("span", {class: `lg-dot k-${kind}`}), text); }

    function visible(n) {
      return n.kind === "token" || n.kind === "logit" || n.influence === null || n.influence === undefined || n.influence <= state.threshold + 1e-9;
    }

    function nodeShape(n, p) {
      const attrs = {class: `gnode k-${n.kind}`, "data-id": n.node_id, tabindex: 0};
      let el;
      if (n.kind === "token") el = s("rect", {...attrs, x: p.x - 6, y: p.y - 6, width: 12, height: 12, rx: 2});
      else if (n.kind === "logit") el = s("rect", {...attrs, x: p.x - 7, y: p.y - 5, width: 14, height: 10, rx: 3});
      else if (n.kind === "error") el = s("rect", {...attrs, x: p.x - 4, y: p.y - 4, width: 8, height: 8, transform: `rotate(45 ${p.x} ${p.y})`});
      else el = s("circle", {...attrs, cx: p.x, cy: p.y, r: 4.5});
      el.addEventListener("mouseenter", () => hover(n, p));
      el.addEventListener("mouseleave", unhover);
      el.addEventListener("click", () => select(n.node_id));
      return el;
    }

    function render() {
      const drawn = nodes.filter(visible);
      const ids = new Set(drawn.map((n) => n.node_id));
      const links = g.links.filter((l) => ids.has(l.source) && ids.has(l.target))
        .sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, MAX_LINKS);
      const maxW = Math.max(1e-12, ...links.map((l) => Math.abs(l.weight)));
      const L = layoutGraph(drawn, tokens.length, nLayers, width);
      const next = s("svg", {id: "graph-svg", width: L.W, height: L.H, viewBox: `0 0 ${L.W} ${L.H}`, role: "img", "aria-label": "attribution graph"});
      const grid = s("g", {class: "grid"});
      for (let r = 0; r < L.nRows; r++) {
        const y = L.rowY(r);
        grid.append(s("line", {x1: L.M.left, x2: L.W - L.M.right, y1: y, y2: y, class: "row-line"}));
        grid.append(s("text", {x: L.M.left - 8, y: y + 4, "text-anchor": "end", class: "row-label"}, r === 0 ? "emb" : r === L.nRows - 1 ? "logits" : `L${r - 1}`));
      }
      tokens.forEach((t, c) => {
        const x = L.colX(c);
        if (c > 0) grid.append(s("line", {x1: x - L.colW / 2, x2: x - L.colW / 2, y1: L.M.top, y2: L.H - L.M.bottom, class: "col-line"}));
        const maxChars = Math.max(3, Math.floor(L.colW / 7.5));
        const text = showToken(t).replace(/\n/g, "");
        const cut = text.length > maxChars ? text.slice(0, maxChars - 1) + "…" : text;
        const lab = s("text", {x, y: L.H - L.M.bottom + 18, "text-anchor": "middle", class: "col-label"}, cut);
        lab.append(s("title", {}, `position ${c}: ${quote(t)}`));
        grid.append(lab);
        grid.append(s("text", {x, y: L.H - L.M.bottom + 34, "text-anchor": "middle", class: "col-index"}, String(c)));
      });
      next.append(grid);
      const linkLayer = s("g", {class: "links"});
      lines = new Map();
      for (const l of [...links].reverse()) { // weakest first, so strong links are drawn on top
        const a = L.pos.get(l.source), b = L.pos.get(l.target);
        const f = Math.abs(l.weight) / maxW;
        const line = s("line", {class: `glink ${l.weight >= 0 ? "pos" : "neg"}`, x1: a.x, y1: a.y, x2: b.x, y2: b.y,
          "stroke-width": (0.3 + 3.4 * f).toFixed(2), "stroke-opacity": (0.05 + 0.7 * Math.pow(f, 1.5)).toFixed(3)});
        for (const id of [l.source, l.target]) {
          if (!lines.has(id)) lines.set(id, []);
          lines.get(id).push(line);
        }
        linkLayer.append(line);
      }
      next.append(linkLayer);
      const nodeLayer = s("g", {class: "nodes"});
      shown = new Map();
      for (const n of drawn) {
        const p = L.pos.get(n.node_id);
        const el = nodeShape(n, p);
        shown.set(n.node_id, el);
        nodeLayer.append(el);
        if (n.kind === "logit") {
          const t = showToken(n.token || "").replace(/\n/g, "");
          nodeLayer.append(s("text", {x: p.x, y: p.y - 10, "text-anchor": "middle", class: "logit-label"}, t.length > 9 ? t.slice(0, 8) + "…" : t));
        }
      }
      next.append(nodeLayer);
      if (svg) svg.replaceWith(next); else wrap.prepend(next);
      svg = next;
      sliderValue.textContent = Number(state.threshold).toFixed(2);
      count.textContent = `${drawn.length} of ${nodes.length} nodes · ${links.length} links`;
      markSelection();
    }

    function markSelection() {
      for (const [id, el] of shown) {
        el.classList.toggle("sel", id === state.selected);
        el.classList.toggle("edit", state.edits.includes(id));
      }
    }

    function hover(n, p) {
      svg.classList.add("focus");
      for (const line of lines.get(n.node_id) || []) line.classList.add("hl");
      fill(tooltip, h("div", {class: "tt-head"}, `${KIND_LABEL[n.kind]} `, h("span", {class: "mono"}, n.node_id)),
        facts(n).map((t) => h("div", {}, t)));
      if (canLink(n)) {
        const row = h("div", {class: "tt-logits"}, "loading top logits…");
        tooltip.append(row);
        topLogits(n).then((r) => { row.textContent = logitLine(r); });
      }
      tooltip.hidden = false;
      const right = wrap.scrollLeft + wrap.clientWidth;
      const left = p.x + 14 + tooltip.offsetWidth > right ? p.x - 14 - tooltip.offsetWidth : p.x + 14;
      tooltip.style.left = `${Math.max(wrap.scrollLeft, left)}px`;
      tooltip.style.top = `${p.y + 12}px`;
    }

    function unhover() {
      svg.classList.remove("focus");
      svg.querySelectorAll(".glink.hl").forEach((l) => l.classList.remove("hl"));
      tooltip.hidden = true;
    }

    function edgeRows(links, other) {
      const top = [...links].sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 8);
      if (!top.length) return h("p", {class: "muted"}, "–");
      const m = Math.max(...top.map((l) => Math.abs(l.weight)), 1e-12);
      return top.map((l) => {
        const n = byId.get(other(l));
        return h("a", {class: "edge-row", href: "#", onclick: (e) => { e.preventDefault(); select(n.node_id); }},
          h("span", {class: `lg-dot k-${n.kind}`}), h("span", {class: "mono grow-text"}, label(n)),
          h("span", {class: `vbar ${l.weight >= 0 ? "pos" : "neg"}`, style: `width:${(50 * Math.abs(l.weight) / m).toFixed(0)}px`}),
          h("span", {class: "mono num"}, fmt(l.weight)));
      });
    }

    function select(id) {
      const n = byId.get(id);
      if (!n) return;
      state.selected = id;
      history.replaceState(null, "", graphHref(slug) + qs({threshold: state.threshold, node: id}));
      markSelection();
      const logitsRow = canLink(n) ? h("div", {class: "muted"}, "loading top logits…") : null;
      fill(panel,
        h("h2", {style: "margin-top:0"}, `${KIND_LABEL[n.kind]} `, h("code", {}, n.node_id)),
        facts(n).map((t) => h("div", {}, t)), logitsRow,
        canLink(n) && h("div", {class: "row", style: "margin-top:8px"},
          h("a", {href: featurePage(n), id: "graph-feature-link", class: "button-link"}, "Open feature page"),
          info && h("button", {type: "button", class: "plain", id: "graph-add-edit", disabled: state.edits.includes(id),
            onclick: () => { if (!state.edits.includes(id)) state.edits.push(id); renderEdits(); select(id); }}, "+ add to intervention")),
        h("h2", {}, `Inputs (${(incoming.get(id) || []).length})`), edgeRows(incoming.get(id) || [], (l) => l.source),
        h("h2", {}, `Outputs (${(outgoing.get(id) || []).length})`), edgeRows(outgoing.get(id) || [], (l) => l.target));
      if (logitsRow) topLogits(n).then((r) => { logitsRow.textContent = logitLine(r); });
    }

    // -- interventions: zero or scale the chosen feature nodes, compare the next-token predictions
    const factor = h("input", {type: "number", id: "graph-factor", step: "any", value: 2, title: "scale factor"});
    const interventionOut = h("div", {id: "graph-intervention-out"});

    async function runEdits(f) {
      fill(interventionOut, spinner("running the model with and without the edits…"));
      try {
        const r = await api(`/api/graphs/${encodeURIComponent(slug)}/intervene`,
          {edits: state.edits.map((id) => ({node_id: id, factor: f})), top_k: 8});
        fill(interventionOut, interventionTables(r));
      } catch (err) { fill(interventionOut, errorBox(err)); }
    }

    function renderEdits() {
      if (!info) { fill(editCard, h("h2", {style: "margin-top:0"}, "Intervention"), h("p", {class: "muted"}, "This graph was not made by openscope: its nodes name no dictionaries to edit.")); return; }
      const none = !state.edits.length;
      fill(editCard,
        h("h2", {style: "margin-top:0"}, "Intervention"),
        h("p", {class: "muted small"}, "Zero or scale the chosen feature nodes (latent × factor at its position) and compare the model's next-token predictions."),
        none ? h("p", {class: "muted", id: "graph-edits"}, "Click a feature node, then “+ add to intervention”.")
          : h("div", {id: "graph-edits"}, state.edits.map((id) => h("span", {class: "chip mono"}, label(byId.get(id)),
            h("button", {type: "button", class: "plain x", title: "remove", onclick: () => { state.edits = state.edits.filter((x) => x !== id); renderEdits(); markSelection(); }}, "✕")))),
        h("div", {class: "row", style: "margin-top:8px"},
          h("button", {type: "button", id: "graph-zero", disabled: none, onclick: () => runEdits(0)}, "Zero"),
          h("span", {}, "or scale ×"), factor,
          h("button", {type: "button", id: "graph-scale", class: "plain", disabled: none, onclick: () => runEdits(Number(factor.value))}, "Scale")),
        interventionOut);
      markSelection();
    }

    function interventionTables(r) {
      const row = (t) => [h("td", {class: "tokcell"}, quote(t.token)), h("td", {class: "num"}, fmt(t.probability))];
      const n = Math.max(r.top_before.length, r.top_after.length);
      return [
        h("h2", {}, "Top next tokens"),
        h("table", {class: "logits"}, h("thead", {}, h("tr", {}, h("th", {colspan: 2}, "before"), h("th", {colspan: 2}, "after"))),
          h("tbody", {}, Array.from({length: n}, (_, i) => h("tr", {}, r.top_before[i] ? row(r.top_before[i]) : [h("td"), h("td")], r.top_after[i] ? row(r.top_after[i]) : [h("td"), h("td")])))),
        r.graph_logits.length ? h("h2", {}, "The graph's logits") : null,
        r.graph_logits.length ? h("table", {class: "logits"}, h("thead", {}, h("tr", {}, h("th", {}, "token"), h("th", {}, "p before"), h("th", {}, "p after"), h("th", {}, "Δ logit"))),
          h("tbody", {}, r.graph_logits.map((c) => h("tr", {},
            h("td", {class: "tokcell"}, quote(c.token)), h("td", {class: "num"}, fmt(c.probability_before)), h("td", {class: "num"}, fmt(c.probability_after)),
            h("td", {class: `num ${c.logit_after >= c.logit_before ? "up" : "down"}`}, (c.logit_after >= c.logit_before ? "+" : "") + fmt(c.logit_after - c.logit_before)))))) : null,
      ];
    }

    let pending = false;
    slider.addEventListener("input", () => {
      state.threshold = Number(slider.value);
      if (pending) return;
      pending = true;
      requestAnimationFrame(() => {
        pending = false;
        render();
        history.replaceState(null, "", graphHref(slug) + qs({threshold: state.threshold, node: state.selected}));
      });
    });
    render();
    renderEdits();
    if (state.selected && byId.has(state.selected)) select(state.selected);
  }

  return {list, show, layoutGraph};
})();
