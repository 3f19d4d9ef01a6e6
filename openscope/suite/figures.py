"""The figures of a suite's evaluation, as a reader of Gemma Scope 2's report expects them.

Each takes the catalogue's evaluated entries (`l0`, `fvu`, `delta_loss` measured on held-out text) and
writes one PNG through `openscope.reports.figure`:

- `l0_vs_delta_loss.png`, `l0_vs_fvu.png`: the sparsity / quality trade-off, one panel per site kind
  (residual stream, attention output, MLP output, transcoder, transcoder with affine skip, CLT,
  crosscoder), each point a dictionary coloured by its depth;
- `depth.png`: delta loss and FVU against layer, one line per width and L0 target, per site kind;
- `width_ladder.png`: delta loss against width at each layer that has several widths (the sweep
  layers), one line per L0 target;
- `skip_vs_no_skip.png`: each transcoder (and CLT) against the same one with an affine skip, FVU and
  delta loss, with the diagonal where they would be equal.

A figure with nothing to show is not drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from openscope.errors import OpenscopeError
from openscope.reports import figure
from openscope.suite.folder import item_layer
from openscope.suite.presets import parse_name, width_label

METRICS = (("delta_loss", "delta LM loss (nats)"), ("fvu", "FVU"))
"""The quality metrics drawn, with their axis labels."""
_MAX_COLUMNS = 4
_PAIRS = {"skip_transcoder": "transcoder", "skip_clt": "clt"}


def panel(entry: dict[str, Any]) -> str:
    """The site kind a dictionary's points are drawn with: the SAE's site, or the coder kind."""
    kind = str(entry["kind"])
    if kind == "sae":
        return str(entry["site_kind"])
    if kind == "crosscoder":
        return f"crosscoder ({entry['site_kind']})"
    affine = {"skip_transcoder": "transcoder (affine skip)", "skip_clt": "clt (affine skip)"}
    return affine.get(kind, kind)


def series(entry: dict[str, Any]) -> str:
    """The width and L0 label of a dictionary (`16k l0_small`; a name that is not Gemma Scope 2's:
    `w512 L0 50`), one line across layers or widths."""
    try:
        name = parse_name(entry["name"])
    except OpenscopeError:
        return f"w{entry['width']} L0 {entry['target_l0']:g}"
    return f"{name.width_label} l0_{name.l0}"


def target_label(entry: dict[str, Any]) -> str:
    """The L0 target of a dictionary as its name gives it (`l0_medium`), else its value."""
    try:
        return f"l0_{parse_name(entry['name']).l0}"
    except OpenscopeError:
        return f"L0 {entry['target_l0']:g}"


def _finite(*values: Any) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values)


def _order(labels: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(labels))


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, _MAX_COLUMNS)
    return -(-n // cols), cols


def l0_tradeoff(entries: list[dict[str, Any]], metric: str, label: str, path: Path, n_layers: int) -> bool:
    """`metric` against L0, one panel per site kind, coloured by depth (multi-layer coders black)."""
    rows = [e for e in entries if _finite(e.get("l0"), e.get(metric))]
    if not rows:
        return False
    panels = _order([panel(e) for e in rows])
    nrows, ncols = _grid(len(panels))
    with figure(path, 4.0 * ncols, 3.2 * nrows) as fig:
        from matplotlib import colormaps  # (matplotlib is loaded by `figure` already)

        cmap = colormaps["viridis"]
        for k, name in enumerate(panels):
            ax = fig.add_subplot(nrows, ncols, k + 1)
            for e in (e for e in rows if panel(e) == name):
                layer = item_layer(e)
                color = cmap(layer / max(1, n_layers - 1)) if layer is not None else "black"
                ax.scatter(e["l0"], e[metric], color=color, s=18)
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("L0 (active latents per token)")
            ax.set_ylabel(label)
            l0s = [e["l0"] for e in rows if panel(e) == name]
            if min(l0s) > 0 and max(l0s) >= 4 * min(l0s):  # a sweep of targets: spread them evenly
                ax.set_xscale("log")
        fig.suptitle(f"{label} against L0 (colour: depth, light = late; black: multi-layer)", fontsize=10)
    return True


def depth(entries: list[dict[str, Any]], path: Path) -> bool:
    """Delta loss and FVU against layer, per site kind with several layers, one line per series."""
    rows = [e for e in entries if item_layer(e) is not None]
    panels = [
        p for p in _order([panel(e) for e in rows]) if len({item_layer(e) for e in rows if panel(e) == p}) > 1
    ]
    if not panels:
        return False
    with figure(path, 4.0 * len(panels), 3.0 * len(METRICS)) as fig:
        for col, name in enumerate(panels):
            mine = [e for e in rows if panel(e) == name]
            for row, (metric, label) in enumerate(METRICS):
                ax = fig.add_subplot(len(METRICS), len(panels), row * len(panels) + col + 1)
                for line in _order([series(e) for e in mine]):
                    points = sorted(
                        (item_layer(e), e[metric])
                        for e in mine
                        if series(e) == line and _finite(e.get(metric))
                    )
                    if points:
                        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=line)
                ax.set_title(name, fontsize=10)
                ax.set_xlabel("layer")
                ax.set_ylabel(label)
                if row == 0:
                    ax.legend(fontsize=6)
    return True


def width_ladder(entries: list[dict[str, Any]], path: Path) -> bool:
    """Delta loss against width at each (site kind, layer) with several widths, one line per target."""
    rows = [e for e in entries if item_layer(e) is not None and _finite(e.get("delta_loss"))]
    ladders = []
    for name in _order([panel(e) for e in rows]):
        for layer in sorted({item_layer(e) for e in rows if panel(e) == name}, key=lambda x: x or 0):
            rungs = [e for e in rows if panel(e) == name and item_layer(e) == layer]
            if len({e["width"] for e in rungs}) > 1:
                ladders.append((name, layer, rungs))
    if not ladders:
        return False
    nrows, ncols = _grid(len(ladders))
    with figure(path, 3.6 * ncols, 3.0 * nrows) as fig:
        for k, (name, layer, rungs) in enumerate(ladders):
            ax = fig.add_subplot(nrows, ncols, k + 1)
            for line in _order([target_label(e) for e in rungs]):
                points = sorted((e["width"], e["delta_loss"]) for e in rungs if target_label(e) == line)
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=line)
            widths = sorted({e["width"] for e in rungs})
            ax.set_xscale("log", base=2)
            ax.set_xticks(widths, [width_label(w) for w in widths], fontsize=7)
            ax.minorticks_off()
            ax.set_title(f"{name}, layer {layer}", fontsize=10)
            ax.set_xlabel("width")
            ax.set_ylabel("delta LM loss (nats)")
            ax.legend(fontsize=6)
    return True


def _pair_key(e: dict[str, Any]) -> tuple[Any, ...]:
    return (_PAIRS.get(e["kind"], e["kind"]), e["sites"], e["width"], e["target_l0"])


def skip_pairs(entries: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(without skip, with affine skip) for every transcoder or CLT trained both ways on the same
    sites, width and target."""
    plain = {_pair_key(e): e for e in entries if e["kind"] in _PAIRS.values()}
    return [(plain[_pair_key(e)], e) for e in entries if e["kind"] in _PAIRS and _pair_key(e) in plain]


def skip_vs_no_skip(entries: list[dict[str, Any]], path: Path) -> bool:
    """Each transcoder (or CLT) with its affine-skip twin: FVU and delta loss, against the diagonal."""
    pairs = skip_pairs(entries)
    if not pairs:
        return False
    with figure(path, 4.0 * len(METRICS), 3.6) as fig:
        for k, (metric, label) in enumerate(METRICS):
            ax = fig.add_subplot(1, len(METRICS), k + 1)
            points = [(a[metric], b[metric]) for a, b in pairs if _finite(a.get(metric), b.get(metric))]
            if points:
                ax.scatter([p[0] for p in points], [p[1] for p in points], s=18)
                lo, hi = min(min(p) for p in points), max(max(p) for p in points)
                ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1)
            ax.set_xlabel(f"{label}, no skip")
            ax.set_ylabel(f"{label}, affine skip")
            ax.set_title(f"{label}: below the diagonal, the skip helps", fontsize=9)
    return True


def draw_figures(entries: list[dict[str, Any]], folder: Path, n_layers: int) -> list[str]:
    """Every figure that has something to show, into folder; their file names."""
    drawn = []
    for metric, label in METRICS:
        name = f"l0_vs_{metric}.png"
        if l0_tradeoff(entries, metric, label, folder / name, n_layers):
            drawn.append(name)
    for name, draw in (
        ("depth.png", depth),
        ("width_ladder.png", width_ladder),
        ("skip_vs_no_skip.png", skip_vs_no_skip),
    ):
        if draw(entries, folder / name):
            drawn.append(name)
    return drawn
