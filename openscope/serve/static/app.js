// openscope explorer front end: vanilla JS, no build step.
// Pages are routed by the URL hash so every view is a link you can share:
//   #/                      dictionaries and search (?by=token|text|logit&q=...&dict=...)
//   #/dict/NAME             a dictionary's feature table
//   #/feature/NAME/LATENT   one latent's dashboard
//   #/inspect               prompt inspector (?dict=...&text=...)
//   #/steer                 steering playground (?dict=...&latent=...)
//   #/graphs, #/graph/SLUG  attribution graphs (graph.js)
//   #/chat, #/chat/NAME     chat-behaviour reports (chat.js)
//   #/suite                 the catalogue of an `openscope suite run` folder (suite.js)
// All text from the server is put in the page with textContent (never innerHTML): token pieces
// are arbitrary strings.
"use strict";

const app = document.getElementById("app");
let serverInfo = null; // /api/info, fetched once
let dictCache = null; // /api/dictionaries, fetched once per page load

// ---- small helpers ---------------------------------------------------------------------------

/** Build an element: h("a", {href: "#/", class: "x"}, "text", child, ...). */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "style") el.style.cssText = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** Replace an element's children; arrays are flattened and null/false skipped, as in h(). */
function fill(el, ...children) {
  el.replaceChildren(...children.flat().filter((c) => c !== undefined && c !== null && c !== false)
    .map((c) => (c instanceof Node ? c : document.createTextNode(String(c)))));
}

const SVG = "http://www.w3.org/2000/svg";
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

/** Call the JSON API; a non-2xx answer throws an Error carrying the server's one-line detail. */
async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  };
  const resp = await fetch(path, opts);
  let data = null;
  try { data = await resp.json(); } catch (_) { /* not JSON: keep the status line */ }
  if (!resp.ok) {
    const detail = data && data.detail ? (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)) : resp.statusText;
    throw new Error(`${resp.status}: ${detail}`);
  }
  return data;
}

function qs(params) {
  const u = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") u.set(k, v);
  const t = u.toString();
  return t ? "?" + t : "";
}

const featureHref = (dict, latent) => `#/feature/${encodeURIComponent(dict)}/${latent}`;
const fmt = (x, d = 3) => (x === null || x === undefined ? "–" : Number(x).toPrecision(d));
function fmtFreq(f) {
  if (!f) return "0";
  const pct = f * 100;
  return (pct >= 0.01 ? pct.toPrecision(2) + "%" : pct.toExponential(1) + "%") + ` (1 in ${Math.round(1 / f).toLocaleString()})`;
}

/** A token piece made visible: newlines as ↵ plus a real line break, tabs as →. */
function showToken(t) {
  return t.replace(/\t/g, "→\t").replace(/\n/g, "↵\n");
}

/** Heat background for activation a relative to max m (orange, opacity ∝ a/m). */
function heat(a, m) {
  if (!(a > 0) || !(m > 0)) return "";
  const alpha = Math.min(1, a / m);
  return `background: rgba(255, 120, 0, ${(0.12 + 0.88 * alpha).toFixed(3)})`;
}

function errorBox(err) { return h("div", {class: "error", role: "alert"}, String(err.message || err)); }
function spinner(text) { return h("div", {class: "muted"}, h("span", {class: "spinner"}), " ", text); }

async function dictionaries() {
  if (!dictCache) dictCache = await api("/api/dictionaries");
  return dictCache;
}

function dictSelect(dicts, value, {id, all, loadedOnly} = {}) {
  const loaded = new Set(serverInfo ? serverInfo.loaded : []);
  const sel = h("select", {id});
  if (all) sel.append(h("option", {value: ""}, "all dictionaries"));
  for (const d of dicts) {
    if (loadedOnly && !loaded.has(d.name)) continue;
    sel.append(h("option", {value: d.name, selected: d.name === value}, `${d.name} (${d.site})`));
  }
  return sel;
}

// ---- tokens with heat --------------------------------------------------------------------------

/** Token spans coloured by activation; the max token outlined; hover shows the value. */
function tokenSpans(tokens, acts, max, maxIndex) {
  return tokens.map((t, i) => h("span", {
    class: "tok" + (i === maxIndex ? " max" : ""),
    style: heat(acts[i], max),
    title: `${JSON.stringify(t)}: ${fmt(acts[i])}`,
  }, showToken(t)));
}

function exampleRow(ex, max) {
  return h("div", {class: "example"},
    h("span", {class: "act", title: "activation at the outlined token"}, fmt(ex.max_activation)),
    h("div", {class: "tokens"}, tokenSpans(ex.tokens, ex.activations, max, ex.max_index)));
}

// ---- histogram (inline SVG) ----------------------------------------------------------------------

function histogramSvg(hist) {
  const W = 340, H = 150, L = 34, B = 26, T = 8, R = 8;
  const counts = hist.counts || [], edges = hist.edges || [];
  if (!counts.length || edges.length !== counts.length + 1) return h("p", {class: "muted"}, "no activations recorded");
  const logx = hist.log_x && edges[0] > 0;
  const tx = logx ? Math.log10 : (v) => v;
  const x0 = tx(edges[0]), x1 = tx(edges[edges.length - 1]);
  const sx = (v) => L + ((tx(v) - x0) / (x1 - x0 || 1)) * (W - L - R);
  const maxC = Math.max(...counts, 1);
  const sy = (c) => H - B - (c / maxC) * (H - B - T);
  const svg = s("svg", {class: "hist", viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img", "aria-label": "activation histogram"});
  counts.forEach((c, i) => {
    const xa = sx(edges[i]), xb = sx(edges[i + 1]);
    const r = s("rect", {class: "b", x: xa, y: sy(c), width: Math.max(1, xb - xa - 0.5), height: H - B - sy(c)});
    r.append(s("title", {}, `${fmt(edges[i])} – ${fmt(edges[i + 1])}: ${c} tokens`));
    svg.append(r);
  });
  svg.append(s("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#9aa3ad"}));
  svg.append(s("line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#9aa3ad"}));
  const ticks = 4;
  for (let k = 0; k <= ticks; k++) {
    const v = logx ? Math.pow(10, x0 + (k / ticks) * (x1 - x0)) : x0 + (k / ticks) * (x1 - x0);
    const anchor = k === 0 ? "start" : k === ticks ? "end" : "middle"; // end labels stay inside the plot
    svg.append(s("text", {x: sx(v), y: H - B + 13, "text-anchor": anchor}, fmt(v, 2)));
  }
  svg.append(s("text", {x: (L + W) / 2, y: H - 2, "text-anchor": "middle"}, logx ? "activation (log scale)" : "activation"));
  svg.append(s("text", {x: L - 4, y: T + 8, "text-anchor": "end"}, String(maxC)));
  svg.append(s("text", {x: L - 4, y: H - B, "text-anchor": "end"}, "0"));
  return svg;
}

// ---- pages ---------------------------------------------------------------------------------------

function featureTable(rows, {showDict = true, showScore = false} = {}) {
  if (!rows.length) return h("p", {class: "muted", id: "no-results"}, "nothing found");
  const maxF = Math.max(...rows.map((r) => r.frequency), 1e-12);
  return h("table", {class: "results"},
    h("thead", {}, h("tr", {},
      showDict && h("th", {}, "dictionary"), h("th", {}, "latent"), showScore && h("th", {}, "score"),
      h("th", {}, "frequency"), h("th", {}, "max act"), h("th", {}, "top token"), h("th", {}, "top logit"))),
    h("tbody", {}, rows.map((r) => h("tr", {class: "result-row"},
      showDict && h("td", {class: "mono"}, r.dictionary),
      h("td", {}, h("a", {class: "latent-link", href: featureHref(r.dictionary, r.latent)}, `#${r.latent}`)),
      showScore && h("td", {class: "num"}, fmt(r.score)),
      h("td", {}, h("span", {class: "freq"}, h("span", {style: `width:${(100 * r.frequency / maxF).toFixed(1)}%`})),
        h("span", {class: "mono muted"}, fmtFreq(r.frequency))),
      h("td", {class: "num"}, fmt(r.max_activation)),
      h("td", {class: "mono"}, JSON.stringify(r.top_token)),
      h("td", {class: "mono"}, JSON.stringify(r.top_logit))))));
}

async function pageHome(params) {
  const dicts = await dictionaries();
  const by = params.get("by") || "token";
  const q = params.get("q") || "";
  const dict = params.get("dict") || "";
  const input = h("input", {type: "text", id: "search-input", class: "grow", value: q,
    placeholder: "a token ( Paris), a word among top logits, or a text to run"});
  const mode = h("select", {id: "search-mode"},
    h("option", {value: "token", selected: by === "token"}, "by token (top examples)"),
    h("option", {value: "logit", selected: by === "logit"}, "by word in top logits"),
    h("option", {value: "text", selected: by === "text"}, "which latents fire on this text"),
    h("option", {value: "explanation", selected: by === "explanation"}, "words in explanations (autointerp)"));
  const dsel = dictSelect(dicts, dict, {id: "search-dict", all: true});
  const form = h("form", {class: "row", id: "search-form", onsubmit: (e) => {
    e.preventDefault();
    location.hash = "#/" + qs({by: mode.value, q: input.value, dict: dsel.value});
  }}, mode, input, dsel, h("button", {type: "submit", id: "search-go"}, "Search"));
  const results = h("div", {id: "search-results"});
  const loaded = new Set(serverInfo ? serverInfo.loaded : []);
  fill(app, 
    h("h1", {}, "Features"),
    h("p", {class: "muted"}, serverInfo && serverInfo.model ? `model ${serverInfo.model}` : "dashboards only (no model loaded)"),
    h("div", {class: "card"}, form, results),
    h("h2", {}, "Dictionaries"),
    h("div", {class: "grid", id: "dictionaries"}, dicts.map((d) => h("a", {class: "card dict-card", href: `#/dict/${encodeURIComponent(d.name)}`},
      h("div", {class: "name"}, d.name),
      h("div", {class: "muted mono"}, d.site === d.site_out ? d.site : `${d.site} → ${d.site_out}`),
      h("div", {}, h("span", {class: "badge"}, d.kind), h("span", {class: "badge"}, `${d.width.toLocaleString()} latents`),
        d.complete ? h("span", {class: "badge ok"}, "dashboards") : h("span", {class: "badge warn"}, "no dashboards"),
        loaded.has(d.name) && h("span", {class: "badge ok"}, "loaded")),
      h("div", {class: "bar", title: `${d.alive} of ${d.width} latents fired`}, h("span", {style: `width:${(100 * d.alive / Math.max(d.width, 1)).toFixed(1)}%`})),
      h("div", {class: "muted", style: "font-size:12px"}, `${d.alive.toLocaleString()} alive · ${d.n_tokens.toLocaleString()} tokens`)))),
  );
  if (!q) return;
  fill(results, spinner("searching…"));
  try {
    let rows;
    if (by === "text") rows = await api("/api/search/text", {text: q, dictionary: dict || null, limit: 50});
    else rows = await api(`/api/search/${by}` + qs({q, dictionary: dict, limit: 50}));
    fill(results, h("h2", {}, `${rows.length} latents`), featureTable(rows, {showScore: true}));
  } catch (err) { fill(results, errorBox(err)); }
}

async function pageDictionary(name, params) {
  const order = params.get("order") || "frequency";
  const offset = Math.max(0, parseInt(params.get("offset") || "0", 10) || 0);
  const limit = 50;
  const dicts = await dictionaries();
  const d = dicts.find((x) => x.name === name);
  const go = (o, off) => { location.hash = `#/dict/${encodeURIComponent(name)}` + qs({order: o, offset: off}); };
  const osel = h("select", {id: "order", onchange: () => go(osel.value, 0)},
    ["frequency", "max_activation", "mean_activation", "latent"].map((o) => h("option", {value: o, selected: o === order}, o)));
  fill(app, h("h1", {class: "mono"}, name), d ? h("p", {class: "muted"}, `${d.site} → ${d.site_out} · ${d.kind} · ${d.width} latents`) : null, spinner("loading…"));
  try {
    const rows = await api("/api/features" + qs({dictionary: name, order, offset, limit}));
    app.lastChild.replaceWith(h("div", {class: "card"},
      h("div", {class: "row"}, "order by ", osel,
        h("button", {class: "plain", disabled: offset === 0, onclick: () => go(order, Math.max(0, offset - limit))}, "◀ prev"),
        h("span", {class: "muted"}, `${offset}–${offset + rows.length}`),
        h("button", {class: "plain", disabled: rows.length < limit, onclick: () => go(order, offset + limit)}, "next ▶")),
      featureTable(rows, {showDict: false})));
    const roles = await api("/api/roles" + qs({dictionary: name}));
    if (roles.length) app.insertBefore(roleLinks(name, roles), app.lastChild);
  } catch (err) { app.lastChild.replaceWith(errorBox(err)); }
}

// ---- chat roles (dictionaries indexed on chat data) ---------------------------------------------------

const ROLE_COLOURS = {template: "#8a94a0", system: "#a855f7", user: "#0ea5e9", model: "#22a06b"};
const rolesHref = (dict, role) => `#/roles/${encodeURIComponent(dict)}` + qs({role});

function roleLinks(name, roles) {
  return h("p", {id: "role-links"}, "Latents most specific to: ",
    roles.flatMap((r, i) => [i ? " · " : "", h("a", {href: rolesHref(name, r.role)}, r.role),
      h("span", {class: "muted"}, ` (${r.n_tokens.toLocaleString()} tokens)`)]));
}

/** The feature page's card: per role, firing frequency, mean activation and specificity (1 = only there). */
function roleCard(f) {
  if (!f.roles || !f.roles.length) return null;
  return h("div", {class: "card", style: "margin-top:12px", id: "roles"},
    h("h2", {style: "margin-top:0"}, "Chat roles"),
    h("table", {class: "logits"}, h("thead", {}, h("tr", {}, h("th", {}, "role"), h("th", {}, "frequency"), h("th", {}, "mean act"), h("th", {}, "specificity"))),
      h("tbody", {}, f.roles.map((r) => h("tr", {class: "role-row"},
        h("td", {}, h("a", {href: rolesHref(f.dictionary, r.role), style: `color:${ROLE_COLOURS[r.role] || "inherit"}`}, r.role)),
        h("td", {class: "num", title: `${r.n_fired} of ${r.n_tokens} tokens`}, fmt(r.frequency)),
        h("td", {class: "num"}, fmt(r.mean_activation)),
        h("td", {title: `frequency elsewhere ${fmt(r.frequency_elsewhere)}`, style: "white-space:nowrap"},
          h("span", {class: "vbar", style: `width:${(60 * r.specificity).toFixed(0)}px;margin-right:6px;background:${ROLE_COLOURS[r.role] || "#888"}`}), fmt(r.specificity, 2)))))),
    h("p", {class: "muted", style: "font-size:12px"}, "specificity = frequency in the role / (that + frequency on other tokens); 0.5 = indifferent"));
}

async function pageRoles(name, params) {
  const roles = await api("/api/roles" + qs({dictionary: name}));
  const role = params.get("role") || (roles.find((r) => r.role === "model") || roles[0] || {}).role;
  fill(app, h("h1", {class: "mono"}, h("a", {href: `#/dict/${encodeURIComponent(name)}`}, name)),
    roles.length ? roleLinks(name, roles) : h("p", {class: "muted"}, "this dictionary was not indexed on chat data (run openscope features --source sharegpt)"),
    spinner("loading…"));
  if (!roles.length) { app.lastChild.remove(); return; }
  try {
    const rows = await api("/api/roles/specific" + qs({dictionary: name, role, limit: 50}));
    app.lastChild.replaceWith(h("div", {class: "card", id: "role-specific"},
      h("h2", {style: "margin-top:0"}, `Most specific to ${role} tokens (score: specificity)`),
      featureTable(rows, {showDict: false, showScore: true})));
  } catch (err) { app.lastChild.replaceWith(errorBox(err)); }
}

function logitTable(rows, cls) {
  const m = Math.max(...rows.map((r) => Math.abs(r.value)), 1e-12);
  return h("table", {class: "logits"}, h("tbody", {}, rows.map((r) => h("tr", {},
    h("td", {class: "tokcell"}, JSON.stringify(r.token)),
    h("td", {style: "width:90px"}, h("span", {class: `vbar ${cls}`, style: `width:${(80 * Math.abs(r.value) / m).toFixed(0)}px`})),
    h("td", {class: "num"}, fmt(r.value))))));
}

async function pageFeature(name, latent) {
  fill(app, spinner(`loading ${name} #${latent}…`));
  let f;
  try { f = await api("/api/feature" + qs({dictionary: name, latent})); } catch (err) { fill(app, errorBox(err)); return; }
  const dicts = await dictionaries();
  const width = (dicts.find((d) => d.name === name) || {}).width || Infinity;
  const exportHref = (format) => "/api/feature/export" + qs({dictionary: name, latent, format});
  const maxAct = f.max_activation || Math.max(1e-12, ...f.top_examples.map((e) => e.max_activation));
  const loaded = serverInfo && serverInfo.loaded.includes(name);
  const stat = (v, label) => h("div", {class: "stat"}, h("b", {}, v), h("span", {}, label));
  const nav = (l) => (l >= 0 && l < width ? h("a", {href: featureHref(name, l)}, l < latent ? `◀ #${l}` : `#${l} ▶`) : null);
  fill(app, 
    h("div", {class: "feature-head"},
      h("div", {},
        h("div", {class: "muted mono"}, h("a", {href: `#/dict/${encodeURIComponent(name)}`}, name), ` · ${f.site}${f.site_out && f.site_out !== f.site ? " → " + f.site_out : ""} · ${f.model}`),
        h("h1", {id: "feature-title"}, `Latent #${f.latent}`),
        h("div", {class: "stats"},
          stat(fmtFreq(f.frequency), "frequency"), stat(fmt(f.max_activation), "max activation"),
          stat(fmt(f.mean_activation), "mean activation"), stat(f.n_fired.toLocaleString(), `fired / ${f.n_tokens.toLocaleString()} tokens`))),
      h("div", {class: "actions"},
        nav(latent - 1), nav(latent + 1),
        loaded && h("a", {href: "#/steer" + qs({dict: name, latent}), id: "steer-link"}, "Steer with it"),
        loaded && h("a", {href: "#/inspect" + qs({dict: name})}, "Inspect text"),
        h("a", {href: exportHref("neuronpedia"), id: "export-link", download: ""}, "⤓ Neuronpedia JSON"),
        h("a", {href: exportHref("openscope"), download: ""}, "⤓ openscope JSON"))),
    h("div", {class: "cols"},
      h("div", {},
        h("div", {class: "card"}, h("h2", {style: "margin-top:0"}, "Activation histogram"), h("div", {id: "histogram"}, histogramSvg(f.histogram))),
        roleCard(f),
        h("div", {class: "card", style: "margin-top:12px"},
          h("h2", {style: "margin-top:0"}, "Promotes (top logits)"), f.top_logits.length ? logitTable(f.top_logits, "pos") : h("p", {class: "muted"}, "–"),
          h("h2", {}, "Suppresses (bottom logits)"), f.bottom_logits.length ? logitTable(f.bottom_logits, "neg") : h("p", {class: "muted"}, "–")),
        h("div", {class: "card latent-list", style: "margin-top:12px", id: "neighbours"},
          h("h2", {style: "margin-top:0"}, "Neighbours (decoder cosine)"),
          f.neighbours.length ? f.neighbours.map((n) => h("a", {href: featureHref(name, n.latent)}, h("span", {}, `#${n.latent}`),
            h("span", {}, h("span", {class: "vbar pos", style: `width:${(60 * Math.max(0, n.cosine)).toFixed(0)}px;margin-right:6px`}), fmt(n.cosine)))) : h("p", {class: "muted"}, "–"))),
      h("div", {},
        h("div", {class: "card", id: "top-examples"}, h("h2", {style: "margin-top:0"}, `Top activations (${f.top_examples.length})`),
          f.top_examples.length ? f.top_examples.map((e) => exampleRow(e, maxAct)) : h("p", {class: "muted"}, "this latent never fired on the indexed text")),
        f.quantiles.length ? h("div", {class: "card", style: "margin-top:12px", id: "quantiles"}, h("h2", {style: "margin-top:0"}, "Across the range (quantiles)"),
          [...f.quantiles].reverse().map((g, i) => h("details", {open: i < 2}, h("summary", {}, g.label || `quantile ${g.index}`),
            g.examples.map((e) => exampleRow(e, maxAct))))) : null)));
  showExplanation(name, latent);
}

/** The latent's `openscope autointerp` explanation and scores above its dashboard, when it has one. */
async function showExplanation(name, latent) {
  let a = null;
  try { a = await api("/api/autointerp" + qs({dictionary: name, latent})); } catch (_) { return; }
  const cols = app.querySelector(".cols");
  if (!a || !cols) return;
  const score = (v, label, n) => (v === null ? null : h("span", {class: "badge"}, `${label} ${fmt(v)} (${n})`));
  cols.before(h("div", {class: "card", id: "autointerp", style: "margin-bottom:12px"},
    h("h2", {style: "margin-top:0"}, "Explanation (autointerp)"),
    h("p", {id: "explanation"}, a.explanation || h("span", {class: "muted"}, `unexplained: ${a.reason}`)),
    h("div", {class: "muted", style: "font-size:12px"}, score(a.detection, "detection", `${a.n_detection} texts`),
      score(a.fuzzing, "fuzzing", `${a.n_fuzzing} tokens`), ` 0.5 is chance · explainer ${a.explainer}, scorer ${a.scorer}`,
      a.explanation && a.reason ? ` · ${a.reason}` : null)));
}

function initialText(params, fallback) { return params.get("text") || fallback; }

async function pageInspect(params) {
  const dicts = await dictionaries();
  const loadedNames = serverInfo ? serverInfo.loaded : [];
  if (!loadedNames.length) { fill(app, h("h1", {}, "Prompt inspector"), errorBox(new Error("no dictionary is loaded on this server: start it with --dictionaries"))); return; }
  const dsel = dictSelect(dicts, params.get("dict") || loadedNames[0], {id: "inspect-dict", loadedOnly: true});
  const text = h("textarea", {id: "inspect-text", maxlength: serverInfo.max_prompt_chars}, initialText(params, "The capital of France is Paris."));
  const k = h("input", {type: "number", id: "inspect-k", min: 1, max: serverInfo.max_top_k, value: params.get("k") || 5});
  const out = h("div", {id: "inspect-out"});
  const button = h("button", {type: "submit", id: "inspect-go"}, "Inspect");
  const form = h("form", {onsubmit: async (e) => {
    e.preventDefault();
    history.replaceState(null, "", "#/inspect" + qs({dict: dsel.value, text: text.value, k: k.value}));
    button.disabled = true; fill(out, spinner("running the model…"));
    try { renderInspection(out, await api("/api/inspect", {text: text.value, dictionary: dsel.value, k: parseInt(k.value, 10)})); }
    catch (err) { fill(out, errorBox(err)); }
    finally { button.disabled = false; }
  }}, text, h("div", {class: "row", style: "margin-top:8px"}, "dictionary ", dsel, " latents per token ", k, button));
  fill(app, h("h1", {}, "Prompt inspector"),
    h("p", {class: "muted"}, "Each token is coloured by its strongest latent. Click a token to see its latents; hover a latent to colour the text by it; click one to open its dashboard."),
    h("div", {class: "card"}, form), out);
  if (params.get("text")) form.requestSubmit();
}

function renderInspection(out, result) {
  const top = (t) => (t.latents.length ? t.latents[0].activation : 0);
  const maxAll = Math.max(1e-12, ...result.tokens.map(top));
  const best = new Map(); // latent -> max activation over the text
  for (const t of result.tokens) for (const la of t.latents) best.set(la.latent, Math.max(best.get(la.latent) || 0, la.activation));
  const spans = result.tokens.map((t) => h("span", {class: "tok click", style: heat(top(t), maxAll),
    title: t.latents.length ? `#${t.latents[0].latent}: ${fmt(top(t))}` : "no latent fired"}, showToken(t.token)));
  const panel = h("div", {class: "card latent-list", id: "token-latents"}, h("p", {class: "muted"}, "click a token"));
  const colourBy = (latent) => {
    const m = latent === null ? maxAll : best.get(latent) || 1e-12;
    result.tokens.forEach((t, i) => {
      const a = latent === null ? top(t) : (t.latents.find((la) => la.latent === latent) || {activation: 0}).activation;
      spans[i].style.cssText = heat(a, m);
    });
  };
  const latentLink = (latent, act) => h("a", {class: "latent-link", href: featureHref(result.dictionary, latent),
    onmouseenter: () => colourBy(latent), onmouseleave: () => colourBy(null)}, h("span", {}, `#${latent}`),
    h("span", {}, h("span", {class: "vbar act", style: `width:${(90 * act / maxAll).toFixed(0)}px;margin-right:6px`}), fmt(act)));
  spans.forEach((span, i) => span.addEventListener("click", () => {
    spans.forEach((x) => x.classList.remove("sel"));
    span.classList.add("sel");
    const t = result.tokens[i];
    fill(panel, h("h2", {style: "margin-top:0"}, "token ", h("code", {}, JSON.stringify(t.token)), ` at position ${t.position}`),
      t.latents.length ? t.latents.map((la) => latentLink(la.latent, la.activation)) : h("p", {class: "muted"}, "no latent fired here"));
  }));
  const ranked = [...best.entries()].sort((a, b) => b[1] - a[1]).slice(0, 30);
  fill(out, h("div", {class: "inspect-cols"},
    h("div", {},
      h("div", {class: "card"}, h("div", {class: "row muted", style: "font-size:12px;margin-bottom:6px"}, `${result.dictionary} · activation `, h("span", {class: "legend"}), ` 0 … ${fmt(maxAll)}`),
        h("div", {class: "tokens", id: "inspect-tokens"}, spans)),
      h("div", {class: "card latent-list", style: "margin-top:12px", id: "text-latents"}, h("h2", {style: "margin-top:0"}, "Latents on this text (max activation)"),
        ranked.length ? ranked.map(([l, a]) => latentLink(l, a)) : h("p", {class: "muted"}, "no latent fired"))),
    panel));
}

function interventionRow(dicts, iv, onRemove) {
  const dsel = dictSelect(dicts, iv.dictionary, {loadedOnly: true});
  dsel.classList.add("iv-dict");
  const latent = h("input", {type: "number", class: "iv-latent", min: 0, value: iv.latent, title: "latent"});
  const mode = h("select", {class: "iv-mode"}, h("option", {value: "add", selected: iv.mode === "add"}, "add"), h("option", {value: "clamp", selected: iv.mode === "clamp"}, "clamp"));
  const value = h("input", {type: "number", class: "iv-value", step: "any", value: iv.value, title: "strength (add) or activation (clamp)"});
  const row = h("div", {class: "iv"}, dsel, latent, mode, value, h("button", {type: "button", class: "plain", title: "remove", onclick: () => onRemove(row)}, "✕"));
  row.read = () => ({dictionary: dsel.value, latent: parseInt(latent.value, 10), mode: mode.value, value: value.value === "" ? NaN : Number(value.value)});
  return row;
}

/** Text pieces of a continuation: the shared prefix with the other one, then where it differs. */
function genText(prompt, text, other) {
  let i = 0;
  while (i < text.length && i < other.length && text[i] === other[i]) i++;
  return [h("span", {class: "prompt"}, prompt), text.slice(0, i), i < text.length ? h("span", {class: "diff", title: "differs from the other continuation"}, text.slice(i)) : null];
}

async function pageSteer(params) {
  const dicts = await dictionaries();
  const loadedNames = serverInfo ? serverInfo.loaded : [];
  if (!loadedNames.length) { fill(app, h("h1", {}, "Steering"), errorBox(new Error("no dictionary is loaded on this server: start it with --dictionaries"))); await openscopeChat.appendSweeps(app); return; }
  const rows = h("div", {id: "interventions"});
  const remove = (row) => row.remove();
  const add = (iv) => rows.append(interventionRow(dicts, iv, remove));
  add({dictionary: params.get("dict") || loadedNames[0], latent: params.get("latent") || 0, mode: "add", value: params.get("value") || 8});
  const prompt = h("textarea", {id: "steer-prompt", maxlength: serverInfo.max_prompt_chars}, params.get("prompt") || "The capital of France is");
  const maxNew = h("input", {type: "number", id: "steer-max", min: 1, max: serverInfo.max_new_tokens, value: Math.min(24, serverInfo.max_new_tokens)});
  const temp = h("input", {type: "number", id: "steer-temp", min: 0, step: "0.1", value: 0});
  const seed = h("input", {type: "number", id: "steer-seed", value: 0});
  const out = h("div", {id: "steer-out"});
  const button = h("button", {type: "submit", id: "steer-go"}, "Generate");
  const form = h("form", {onsubmit: async (e) => {
    e.preventDefault();
    const request = {prompt: prompt.value, interventions: [...rows.children].map((r) => r.read()),
      max_new_tokens: parseInt(maxNew.value, 10), temperature: Number(temp.value), seed: parseInt(seed.value, 10) || 0};
    button.disabled = true; fill(out, spinner("generating twice (unsteered and steered)…"));
    try {
      const r = await api("/api/steer", request);
      const ivText = r.interventions.map((iv) => `${iv.mode} ${iv.dictionary} #${iv.latent} ${iv.mode === "add" ? "×" : "="} ${iv.value}`).join(", ") || "no intervention";
      fill(out, h("div", {class: "side"},
        h("div", {class: "card"}, h("h2", {style: "margin-top:0"}, "Unsteered"), h("div", {class: "gen", id: "unsteered"}, genText(r.prompt, r.unsteered, r.steered))),
        h("div", {class: "card"}, h("h2", {style: "margin-top:0"}, "Steered"), h("div", {class: "muted", style: "font-size:12px"}, ivText),
          h("div", {class: "gen", id: "steered"}, genText(r.prompt, r.steered, r.unsteered)))));
    } catch (err) { fill(out, errorBox(err)); }
    finally { button.disabled = false; }
  }},
  prompt,
  h("h2", {}, "Latents (add: strength × decoder direction; clamp: set the activation)"),
  h("div", {class: "iv muted", style: "font-size:12px"}, h("span", {}, "dictionary"), h("span", {}, "latent"), h("span", {}, "mode"), h("span", {}, "strength / value"), h("span", {})),
  rows,
  h("div", {class: "row"}, h("button", {type: "button", class: "plain", id: "steer-add", onclick: () => add({dictionary: loadedNames[0], latent: 0, mode: "add", value: 8})}, "+ latent"),
    " new tokens ", maxNew, " temperature ", temp, " seed ", seed, button));
  fill(app, h("h1", {}, "Steering playground"),
    h("p", {class: "muted"}, "The same prompt is continued twice: without and with the edits. Where the texts part, the rest is highlighted."),
    h("div", {class: "card"}, form), out);
  await openscopeChat.appendSweeps(app); // chat.js: efficacy/coherence curves of `openscope chat sweep`
}

// ---- routing -------------------------------------------------------------------------------------

async function route() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const page = parts[0] || "home";
  document.querySelectorAll("nav a[data-nav]").forEach((a) => {
    const nav = a.getAttribute("data-nav");
    a.classList.toggle("active", nav === page || (nav === "home" && (page === "feature" || page === "dict")));
  });
  try {
    if (!serverInfo) {
      serverInfo = await api("/api/info");
      document.getElementById("server-info").textContent = `${serverInfo.model || "no model"} · ${serverInfo.loaded.length} loaded · ${serverInfo.db}`;
    }
    if (page === "feature" && parts.length >= 3) await pageFeature(parts.slice(1, -1).join("/"), parseInt(parts[parts.length - 1], 10));
    else if (page === "dict" && parts.length >= 2) await pageDictionary(parts.slice(1).join("/"), params);
    else if (page === "inspect") await pageInspect(params);
    else if (page === "steer") await pageSteer(params);
    else if (page === "graphs") await openscopeGraphs.list(params); // graph.js
    else if (page === "graph" && parts.length >= 2) await openscopeGraphs.show(parts.slice(1).join("/"), params);
    else if (page === "roles" && parts.length >= 2) await pageRoles(parts.slice(1).join("/"), params);
    else if (page === "chat" && parts.length >= 2) await openscopeChat.show(parts.slice(1).join("/")); // chat.js
    else if (page === "chat") await openscopeChat.list();
    else if (page === "suite") await openscopeSuite.show(params); // suite.js
    else await pageHome(params);
    document.title = `openscope · ${page}`;
  } catch (err) {
    fill(app, errorBox(err));
  }
  window.scrollTo(0, 0);
}

window.addEventListener("hashchange", route);
route();
