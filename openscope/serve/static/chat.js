// openscope explorer: chat-behaviour reports (`openscope chat contrast|ablate|jailbreak|sweep|cot` and the
// other chat analyses). Plain JS, no build step; loaded before app.js, whose helpers (h, s, fill, api, qs,
// fmt, errorBox, spinner, featureHref) it calls at run time.
// Routes, hooked into app.js's route():
//   #/chat          every report under the server's chat-reports folder (GET /api/chat/reports)
//   #/chat/NAME     one report (GET /api/chat/report): its tables, curves drawn as SVG, its plots
// The steering page calls openscopeChat.appendSweeps(app) to show the measured sweeps next to the playground.
// Everything lives in this closure: only `openscopeChat` is global.
"use strict";

const openscopeChat = (() => {
  const reportHref = (name) => `#/chat/${encodeURIComponent(name)}`;
  const figureSrc = (name, file) => "/api/chat/figure" + qs({name, file});
  const root = () => document.getElementById("app");
  const COLORS = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#6b7280"];

  function markNav() {
    document.querySelectorAll("nav a[data-nav]").forEach((a) => a.classList.toggle("active", a.dataset.nav === "chat"));
  }

  function table(header, rows, id) {
    return h("table", {class: "logits", id},
      h("thead", {}, h("tr", {}, header.map((c) => h("th", {}, c)))),
      h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c))))));
  }

  /** A small SVG line chart: xs shared, series [{name, ys, color}]; nulls break the line. */
  function lineChart(xs, series, {width = 360, height = 200, xlabel = "", ylabel = "", ymin, ymax} = {}) {
    const pad = {l: 46, r: 10, t: 10, b: 32};
    const ys = series.flatMap((se) => se.ys).filter((y) => y !== null && isFinite(y));
    let lo = ymin !== undefined ? ymin : Math.min(...ys);
    let hi = ymax !== undefined ? ymax : Math.max(...ys);
    if (!(hi > lo)) { lo -= 1; hi += 1; }
    const x0 = Math.min(...xs), x1 = Math.max(...xs);
    const X = (x) => pad.l + (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5) * (width - pad.l - pad.r);
    const Y = (y) => height - pad.b - ((y - lo) / (hi - lo)) * (height - pad.t - pad.b);
    const svg = s("svg", {width, height, viewBox: `0 0 ${width} ${height}`, class: "chat-chart"});
    svg.append(s("line", {x1: pad.l, y1: height - pad.b, x2: width - pad.r, y2: height - pad.b, stroke: "#999"}));
    svg.append(s("line", {x1: pad.l, y1: pad.t, x2: pad.l, y2: height - pad.b, stroke: "#999"}));
    for (const v of [lo, (lo + hi) / 2, hi]) {
      svg.append(s("text", {x: pad.l - 4, y: Y(v) + 3, "text-anchor": "end", "font-size": 9}, fmt(v, 3)));
    }
    for (const x of xs) svg.append(s("text", {x: X(x), y: height - pad.b + 11, "text-anchor": "middle", "font-size": 9}, Number.isInteger(x) ? String(x) : fmt(x, 3)));
    svg.append(s("text", {x: (pad.l + width - pad.r) / 2, y: height - 4, "text-anchor": "middle", "font-size": 10}, xlabel));
    svg.append(s("text", {x: 10, y: (pad.t + height - pad.b) / 2, "font-size": 10, transform: `rotate(-90 10 ${(pad.t + height - pad.b) / 2})`, "text-anchor": "middle"}, ylabel));
    series.forEach((se, k) => {
      const color = se.color || COLORS[k % COLORS.length];
      let d = "";
      let pen = false;
      se.ys.forEach((y, i) => {
        if (y === null || !isFinite(y)) { pen = false; return; }
        d += `${pen ? "L" : "M"}${X(xs[i]).toFixed(1)},${Y(y).toFixed(1)}`;
        pen = true;
        svg.append(s("circle", {cx: X(xs[i]), cy: Y(y), r: 2.5, fill: color}, s("title", {}, `${se.name}: ${fmt(y, 4)} at ${fmt(xs[i], 3)}`)));
      });
      svg.append(s("path", {d, fill: "none", stroke: color, "stroke-width": 1.5, "stroke-dasharray": se.dash || ""}));
    });
    const legend = h("div", {class: "muted", style: "font-size:11px"},
      series.map((se, k) => h("span", {style: `margin-right:10px;color:${se.color || COLORS[k % COLORS.length]}`}, "— " + se.name)));
    return h("div", {class: "chat-chart-wrap"}, svg, legend);
  }

  function sweepCharts(r) {
    const xs = r.points.map((p) => p.strength);
    return h("div", {class: "cols"},
      lineChart(xs, [{name: `efficacy (${r.measure})`, ys: r.points.map((p) => p.efficacy)}], {xlabel: "strength", ylabel: "efficacy"}),
      lineChart(xs, [
        {name: "loss under the unsteered model", ys: r.points.map((p) => p.loss), color: COLORS[1]},
      ], {xlabel: "strength", ylabel: "loss"}),
      lineChart(xs, [{name: "repetition rate", ys: r.points.map((p) => p.repetition), color: COLORS[2]}], {xlabel: "strength", ylabel: "repetition", ymin: 0, ymax: 1}));
  }

  // ---- one report, by kind ---------------------------------------------------------------------------

  const latentRows = (dict, rows) => rows.map((x) => [
    h("a", {href: featureHref(dict, x.latent)}, String(x.latent)), fmt(x.d, 3), fmt(x.q, 2), fmt(x.mean_pos, 3), fmt(x.mean_neg, 3), fmt(x.cosine, 3)]);

  const KINDS = {
    contrast(r) {
      return [
        h("p", {}, `${r.n_positive} positive vs ${r.n_negative} negative prompts; best site `, h("b", {}, r.best_site)),
        lineChart(r.sites.map((x) => x.layer), [
          {name: "held-out AUROC", ys: r.sites.map((x) => x.auroc)},
          {name: "95% CI low", ys: r.sites.map((x) => x.auroc_low), dash: "3,3", color: "#9ca3af"},
          {name: "95% CI high", ys: r.sites.map((x) => x.auroc_high), dash: "3,3", color: "#9ca3af"},
        ], {xlabel: "layer", ylabel: "AUROC", ymin: 0.4, ymax: 1, width: 480}),
        table(["site", "AUROC", "95% CI", "Cohen's d", "|r|"], r.sites.map((x) => [x.site, fmt(x.auroc), `${fmt(x.auroc_low)}–${fmt(x.auroc_high)}`, fmt(x.separation_d), fmt(x.direction_norm)]), "contrast-sites"),
        ...r.dictionaries.flatMap((t) => [
          h("h2", {}, `${t.name} (${t.site_in}): ${t.n_significant} of ${t.width} latents differ`),
          ...[["Largest effects", t.top_effects], ["More active on the positive set", t.top_positive || []], ["Aligned with the direction", t.top_aligned]].map(([title, rows]) =>
            h("div", {}, h("h3", {}, title), table(["latent", "d", "q", "mean pos", "mean neg", "cos(r)"], latentRows(t.name, rows)))),
        ]),
      ];
    },
    ablate(r) {
      return [
        table(["condition", "prompts", "KL", "P(watch) clean", "P(watch) edited", "top-1 unchanged"],
          r.conditions.map((c) => [c.name, c.prompts, fmt(c.kl, 3), fmt(c.watch_clean, 3), fmt(c.watch_edited, 3), fmt(c.top1_same, 2)]), "ablate-conditions"),
        ...r.conditions.flatMap((c) => c.samples.map((smp) => h("div", {class: "card", style: "margin-top:8px"},
          h("div", {class: "muted"}, `${c.name} — ${smp.prompt}`),
          h("div", {class: "gen"}, h("b", {}, "clean: "), smp.clean), h("div", {class: "gen"}, h("b", {}, "edited: "), smp.edited)))),
      ];
    },
    jailbreak(r) {
      return [
        h("p", {}, `Plain requests sit at ${fmt(r.plain_position)} on the harmless (0) – harmful (1) axis at ${r.site}; shift < 0: toward harmless.`),
        table(["rank", "template", "shift", "± se", "position", "switched-on latents"], r.templates.map((t, i) => [
          String(i + 1), t.name, fmt(t.shift), fmt(t.shift_se, 2), fmt(t.position),
          t.switched_on.map((x) => `${x.latent} (${Math.round(100 * x.fires_wrapped)}% vs ${Math.round(100 * x.fires_plain)}%)`).join(", ")]), "jailbreak-templates"),
      ];
    },
    sweep(r) {
      return [
        h("p", {}, `Target: ${r.target}; efficacy measure: ${r.measure}.`),
        sweepCharts(r),
        table(["strength", "efficacy", "loss", "repetition", "first continuation"], r.points.map((p) => [fmt(p.strength), fmt(p.efficacy, 4), fmt(p.loss, 3), fmt(p.repetition, 2), (p.texts[0] || "").slice(0, 120)]), "sweep-points"),
      ];
    },
    cot(r) {
      return [
        h("p", {}, `${r.n_questions} questions; chance ${fmt(r.chance, 2)}; best layer ${r.best_layer}.`),
        lineChart(r.layers, [
          {name: "readable before first mention", ys: r.before_mention},
          {name: "control answer", ys: r.before_mention_control, color: "#9ca3af"},
          {name: "readable at the answer position", ys: r.at_answer, color: COLORS[1]},
          {name: "chance", ys: r.layers.map(() => r.chance), dash: "2,3", color: "#dc2626"},
        ], {xlabel: "layer", ylabel: "share of questions", ymin: 0, ymax: 1, width: 480}),
        r.latents.length ? table(["latent", "mean contribution", "fires"], r.latents.map((x) => [String(x.latent), fmt(x.mean_contribution), fmt(x.fires, 2)]), "cot-latents") : null,
      ];
    },
  };

  async function show(name) {
    markNav();
    const app = root();
    fill(app, h("h1", {}, h("a", {href: "#/chat"}, "Chat reports"), " / ", h("span", {class: "mono"}, name)), spinner("loading…"));
    try {
      const r = await api("/api/chat/report" + qs({name}));
      const body = KINDS[r.kind] ? KINDS[r.kind](r) : [h("pre", {}, JSON.stringify(r, null, 1).slice(0, 20000))];
      app.lastChild.replaceWith(h("div", {id: "chat-report", "data-kind": r.kind},
        h("p", {class: "muted"}, `${r.kind} · ${r.model || "?"}`),
        r.notes && r.notes.length ? h("div", {class: "card", id: "chat-notes"}, h("b", {}, "Notes"), h("ul", {}, r.notes.map((n) => h("li", {}, n)))) : null,
        ...body,
        ...(r.figures || []).map((f) => h("div", {class: "card", style: "margin-top:12px"}, h("img", {src: figureSrc(name, f), alt: f, style: "max-width:100%"})))));
    } catch (err) { app.lastChild.replaceWith(errorBox(err)); }
  }

  async function list() {
    markNav();
    const app = root();
    fill(app, h("h1", {}, "Chat reports"), spinner("loading…"));
    try {
      const rows = await api("/api/chat/reports");
      app.lastChild.replaceWith(rows.length
        ? table(["report", "kind", "model", "notes"], rows.map((r) => [h("a", {href: reportHref(r.name)}, r.name), r.kind, r.model || "–", r.error || (r.notes[0] || "").slice(0, 140)]), "chat-reports")
        : h("p", {class: "muted"}, "No chat reports yet: run openscope chat contrast (or sweep, jailbreak, cot, ablate) with --output under the server's --chat-reports folder."));
    } catch (err) { app.lastChild.replaceWith(errorBox(err)); }
  }

  /** The steering page's card: every measured sweep's efficacy and coherence curves. */
  async function sweepCard() {
    const card = h("div", {class: "card", id: "sweeps", style: "margin-top:12px"}, h("h2", {style: "margin-top:0"}, "Measured sweeps"));
    try {
      const rows = (await api("/api/chat/reports")).filter((r) => r.kind === "sweep");
      if (!rows.length) return null;
      for (const row of rows) {
        const r = await api("/api/chat/report" + qs({name: row.name}));
        card.append(h("h3", {}, h("a", {href: reportHref(row.name)}, row.name), h("span", {class: "muted"}, ` — ${r.target}`)), sweepCharts(r));
      }
    } catch (err) { card.append(errorBox(err)); }
    return card;
  }

  /** Append the sweeps card to the steering page (if there are sweeps and the page is still shown). */
  async function appendSweeps(app) {
    const card = await sweepCard();
    if (card && location.hash.startsWith("#/steer")) app.append(card);
  }

  return {list, show, sweepCard, appendSweeps};
})();
