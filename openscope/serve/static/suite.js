// openscope explorer: the Suite page, the catalogue of an `openscope suite run` folder. Plain JS, no build
// step; loaded before app.js, whose helpers (h, fill, api, qs, fmt, errorBox, spinner) it calls at run time.
// Route, hooked into app.js's route():
//   #/suite?family=...&status=...   a grid of layer x site kind, each cell holding that place's dictionaries
//                                   by width and L0 target (coloured by status, linked to their dashboards
//                                   at #/dict/NAME when the feature database has them); then every item
//                                   with its metrics; then the figures of `openscope eval --catalogue`.
// Everything lives in this closure: only `openscopeSuite` is global.
"use strict";

const openscopeSuite = (() => {
  const MULTI = ["clt", "skip_clt", "crosscoder"];
  const STATUSES = ["done", "running", "pending", "failed"];
  const root = () => document.getElementById("app");

  function markNav() {
    document.querySelectorAll("nav a[data-nav]").forEach((a) => a.classList.toggle("active", a.dataset.nav === "suite"));
  }

  /** 16384 -> 16k, 262080 -> 262k, 1048576 -> 1m, 512 -> 512 (Gemma Scope 2's labels). */
  function widthLabel(w) {
    if (w >= 1e6) return `${Math.floor(w / 1e6)}m`;
    if (w >= 1000) return `${Math.floor(w / 1000)}k`;
    return String(w);
  }

  /** The grid column of an item: the SAE's site kind, or the coder kind. */
  function column(e) {
    if (e.kind === "sae") return e.site_kind;
    if (e.kind === "skip_transcoder") return "transcoder (affine)";
    if (e.kind === "skip_clt") return "clt (affine)";
    if (e.kind === "crosscoder") return `crosscoder (${e.site_kind})`;
    return e.kind;
  }

  /** The grid row of an item: its layer, or "multi-layer" for a CLT or crosscoder. */
  const row = (e) => (MULTI.includes(e.kind) || e.layers.length !== 1 ? "multi-layer" : String(e.layers[0]));

  function title(e) {
    const lines = [e.name, `${e.kind} on ${e.sites}, width ${e.width}, target L0 ${e.target_l0}`, `status: ${e.status}`];
    if (e.l0 !== null) lines.push(`L0 ${fmt(e.l0)} · FVU ${fmt(e.fvu)} · delta loss ${fmt(e.delta_loss)} (${e.measured_on})`);
    if (e.reason) lines.push(`reason: ${e.reason}`);
    lines.push(e.dictionary ? "click: its dashboards" : "no dashboards in this server's database");
    return lines.join("\n");
  }

  function chip(e) {
    const text = `${widthLabel(e.width)} · L0 ${Number(e.target_l0)}`;
    const attrs = {class: `suite-chip st-${e.status}`, title: title(e), "data-name": e.name};
    return e.dictionary ? h("a", {...attrs, href: `#/dict/${encodeURIComponent(e.dictionary)}`}, text) : h("span", attrs, text);
  }

  function grid(items) {
    const cols = [...new Set(items.map(column))];
    const rows = [...new Set(items.map(row))].sort((a, b) => (a === "multi-layer") - (b === "multi-layer") || Number(a) - Number(b));
    const cell = (r, c) => items.filter((e) => row(e) === r && column(e) === c)
      .sort((a, b) => a.width - b.width || a.target_l0 - b.target_l0).map(chip);
    return h("div", {class: "card suite-grid-wrap"}, h("table", {id: "suite-grid", class: "suite-grid"},
      h("thead", {}, h("tr", {}, h("th", {}, "layer"), cols.map((c) => h("th", {}, c)))),
      h("tbody", {}, rows.map((r) => h("tr", {}, h("th", {}, r), cols.map((c) => h("td", {}, cell(r, c))))))));
  }

  function itemsTable(items) {
    const head = ["dictionary", "kind", "sites", "width", "target L0", "L0", "FVU", "delta loss", "dead", "status", "time"];
    return h("table", {id: "suite-items"},
      h("thead", {}, h("tr", {}, head.map((c) => h("th", {}, c)))),
      h("tbody", {}, items.map((e) => h("tr", {"data-status": e.status},
        h("td", {class: "mono"}, e.dictionary ? h("a", {href: `#/dict/${encodeURIComponent(e.dictionary)}`}, e.name) : e.name),
        h("td", {}, e.kind), h("td", {class: "mono"}, e.sites), h("td", {class: "num"}, widthLabel(e.width)),
        h("td", {class: "num"}, String(Number(e.target_l0))), h("td", {class: "num"}, fmt(e.l0)), h("td", {class: "num"}, fmt(e.fvu)),
        h("td", {class: "num"}, fmt(e.delta_loss)), h("td", {class: "num"}, e.dead_fraction === null ? "–" : `${(100 * e.dead_fraction).toFixed(1)}%`),
        h("td", {}, h("span", {class: `badge st-${e.status}`, title: e.reason || ""}, e.status), e.reason ? h("div", {class: "muted reason"}, e.reason) : null),
        h("td", {class: "num"}, e.seconds === null ? "–" : `${Math.round(e.seconds)} s`)))));
  }

  function filters(all, params) {
    const family = h("select", {id: "suite-family"}, h("option", {value: ""}, "every family"),
      [...new Set(all.items.map((e) => e.family))].map((f) => h("option", {value: f, selected: params.get("family") === f}, f)));
    const status = h("select", {id: "suite-status"}, h("option", {value: ""}, "any status"),
      STATUSES.map((s) => h("option", {value: s, selected: params.get("status") === s}, s)));
    const go = () => { location.hash = "#/suite" + qs({family: family.value, status: status.value}); };
    family.addEventListener("change", go);
    status.addEventListener("change", go);
    return h("div", {class: "row", style: "margin:10px 0"}, family, status);
  }

  async function show(params) {
    markNav();
    const app = root();
    fill(app, h("h1", {}, "Suite"), spinner("loading the catalogue…"));
    let all;
    try {
      all = await api("/api/suite");
    } catch (err) {
      app.lastChild.replaceWith(errorBox(err));
      return;
    }
    const filtered = params.get("family") || params.get("status")
      ? await api("/api/suite" + qs({family: params.get("family"), status: params.get("status")})) : all;
    const counts = STATUSES.filter((s) => all.counts[s]).map((s) => h("span", {class: `badge st-${s}`}, `${all.counts[s]} ${s}`));
    const ev = all.evaluation;
    fill(app,
      h("h1", {}, "Suite ", h("span", {class: "muted mono", style: "font-size:14px"}, all.folder)),
      h("p", {class: "muted"}, `${all.items.length} dictionaries of ${all.model} (${all.n_layers} layers) trained on ${all.source}`,
        all.preset ? ` · preset ${all.preset}` : "", " ", counts),
      h("p", {class: "muted"}, ev
        ? `Numbers measured on ${ev.n_tokens} tokens of ${ev.source}${ev.held_out ? " (held out)" : ""}; unevaluated items show their last training step.`
        : "Numbers from the last training step; run openscope eval --catalogue on the folder for held-out L0, FVU and delta loss."),
      filters(all, params),
      h("h2", {}, "By layer and site"), grid(filtered.items),
      h("h2", {}, "Dictionaries"), itemsTable(filtered.items),
      all.figures.length ? h("h2", {}, "Evaluation") : null,
      all.figures.map((f) => h("div", {class: "card", style: "margin-top:12px"},
        h("img", {src: "/api/suite/figure" + qs({file: f}), alt: f, style: "max-width:100%"}))));
  }

  return {show};
})();
