"""What an evaluation is asked for and what it returns: `EvalConfig` and the report types.

`evaluate` (in `openscope.eval.evaluate`) fills them in; `openscope.eval.report` writes them out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from openscope.eval import metrics as m
from openscope.eval.absorption import AbsorptionReport
from openscope.eval.probing import ProbingReport


@dataclass
class EvalConfig:
    """Which dictionaries to evaluate, on which model and text, and where to write the report."""

    dictionaries: list[Path] = field(default_factory=lambda: [Path("openscope-out/dictionaries")])
    """Dictionary folders (openscope, Gemma Scope 1 or 2), or folders to search for them; repeat the flag for several."""
    model: str | None = None
    """Model (name, local directory or hub id). Default: the `model_name` in the dictionaries' config.json."""
    source: str = "wiki"
    """Text: wiki, shakespeare, python, or a path (as for harvest); slice documents, e.g. `wiki[9000:]`, to evaluate on text the dictionaries were not trained on."""
    text_field: str = "text"
    """Field (jsonl) or column (parquet, saved dataset) holding the text."""
    roles: str = ""
    """Chat sources: measure only tokens of these roles, e.g. `model` (of template, system, user, model): reconstruction on those tokens, next-token loss where the predicted token has one of them. Dictionaries are still spliced at every token. Empty: every token."""
    tokens: int = 32_768
    """Token budget: contexts are evaluated until this many context positions are covered."""
    context_len: int = 256
    """Tokens per packed context (the first is always BOS)."""
    batch_size: int = 4
    """Contexts per forward. Memory grows with batch_size x context_len x vocabulary (Gemma: 262k) x 4 bytes per logits tensor; two are alive at once."""
    all_at_once: bool = False
    """Also splice every dictionary at once (the whole replacement) and report the joint delta loss, KL and loss recovered."""
    loss_recovered: bool = True
    """Measure loss recovered: one extra forward per distinct output site per batch, with that site zero-ablated (--no-loss-recovered skips it)."""
    histogram_bins: int = 50
    """Bins of the latent firing-frequency histograms (log10 frequency)."""
    output: Path = Path("openscope-out/eval")
    """Folder for report.json, report.md, frequencies.safetensors and the PNG plots."""
    overwrite: bool = False
    """Replace the report already in --output (only a report openscope wrote is ever replaced)."""
    device: str = "auto"
    """Device: auto (cuda if available), cpu, cuda, ..."""
    cache_dir: Path | None = None
    """Where converted models are cached (default: $OPENSCOPE_CACHE or ~/.cache/openscope)."""
    format: str = "openscope"
    """Result files: openscope (report.json, report.md, plots), or saebench: those and, per dictionary and eval type, a file in SAEBench's JSON layout and field names under saebench/<eval type>/ (core; sparse_probing and absorption_first_letter when run), comparable with published SAEBench results."""
    probing: bool = False
    """Sparse probing (SAEBench's sparse_probing) on real labelled text: per class, the k latents (k = 1, 2, 5, 10, 20) with the largest class-mean difference get a logistic probe; held-out accuracy beside a dense probe on the raw activations. Single-layer dictionaries only."""
    probing_tasks: str = "topics,language,code,shakespeare"
    """Labelled sets for --probing, comma-separated: topics (12 Wikipedia topics), language (English/Spanish/French), code (Python stdlib vs prose), shakespeare (vs modern prose), or .jsonl files of {"text", "label"}."""
    probing_texts: int = 200
    """Texts per class for --probing (a seeded draw; 80% train, 20% held out)."""
    probing_context_len: int = 128
    """Tokens read of each labelled text (BOS included), mean-pooled without BOS."""
    absorption: bool = False
    """Feature absorption (SAEBench's absorption_first_letter): the first-letter task on single-token words; absorption rate and fraction fully absorbed per letter. Single-layer SAEs only."""
    absorption_words: int = 3000
    """Single-token words drawn for --absorption (80% train the probes, 20% are scored)."""
    seed: int = 42
    """Seed of --probing's and --absorption's text draws, splits and prompts."""
    prefixes: str = "auto"
    """Matryoshka prefix-quality curve: also measure each dictionary with only its first p latents (per layer for a CLT; later latents zeroed before decoding) on the same batches: FVU, L0, delta loss and KL per prefix, in the report and prefix_quality.png. auto: the prefixes its training recorded (`--matryoshka`; random prefixes: width/1024, /256, /64, /16, /4), none for a dictionary trained without; none: off; or sizes, e.g. `128,512` (each costs one spliced forward per batch)."""
    catalogue: Path | None = None
    """An `openscope suite run` folder: evaluate every finished dictionary of its catalogue instead of --dictionaries (on --source, by default the plan's held-out slice: `wiki[:9000]` -> `wiki[9000:]`), draw the Gemma Scope 2 report's figures (delta loss and FVU against L0 per site kind, across depth, width ladders, skip vs no skip) into --output (default: DIR/eval) and write the held-out numbers into its catalogue.json."""


class LMMetrics(NamedTuple):
    """Next-token metrics of one splice (a dictionary alone, or all at once) against the clean model."""

    ce_clean: float
    """Clean cross-entropy (nats per token) over the counted positions."""
    ce_spliced: float
    """Cross-entropy with the reconstruction(s) spliced in."""
    delta_loss: float
    """ce_spliced − ce_clean: the main quality metric (lower is better)."""
    kl: float
    """Mean KL(clean ‖ spliced) of the next-token distributions (nats)."""
    ce_zero: float | None
    """Cross-entropy with the output site(s) zero-ablated (None when not measured)."""
    loss_recovered: float | None
    """(ce_zero − ce_spliced) / (ce_zero − ce_clean); None when not measured."""
    kl_zero: float | None = None
    """Mean KL(clean ‖ zero-ablated) of the next-token distributions (None when not measured)."""


class PrefixMetrics(NamedTuple):
    """One point of a Matryoshka dictionary's prefix-quality curve: the dictionary with only its first
    `size` latents (per layer for a CLT)."""

    size: int
    """Latents kept (per layer for a CLT); the dictionary's width is the whole dictionary."""
    l0: float
    """Mean active latents per token among those kept."""
    fvu: float
    """Fraction of variance unexplained by the prefix's reconstruction."""
    delta_loss: float
    """CE with the prefix's reconstruction spliced in minus clean CE (nats)."""
    kl: float
    """Mean KL(clean ‖ spliced) of the next-token distributions (nats)."""
    loss_recovered: float | None
    """Loss recovered (None when not measured)."""


class DictionaryReport(NamedTuple):
    """Everything measured for one dictionary."""

    name: str
    """The dictionary's label."""
    site_in: str
    """Site it reads, e.g. `6.mlp_in`."""
    site_out: str
    """Site it reconstructs / replaces, e.g. `6.mlp_out`."""
    kind: str
    """sae, transcoder, skip_transcoder, clt or crosscoder."""
    n_layers: int
    """Layers the dictionary spans (a CLT or crosscoder: site_in/site_out are its first layer's; else 1)."""
    width: int
    """Number of latents (a CLT or crosscoder: over all its layers)."""
    folder: str | None
    """Folder it was loaded from, if any."""
    recon: m.ReconstructionMetrics
    """Reconstruction metrics on clean activations (L0, FVU, MSE, dead, dense, frequencies)."""
    histogram: m.Histogram
    """Histogram of log10 latent firing frequencies."""
    lm: LMMetrics
    """Next-token metrics with this dictionary alone spliced in (a CLT or crosscoder: all its layers at once)."""
    layers: tuple[m.ReconstructionMetrics, ...] = ()
    """A CLT or crosscoder: the reconstruction metrics of each of its layers (`model_layers`): L0 of that
    layer's latents, FVU/MSE of that layer's output site. Empty for a single-layer dictionary."""
    model_layers: tuple[int, ...] = ()
    """A CLT or crosscoder: the model layer of each of its layers (a crosscoder's need not be
    consecutive); empty: consecutive from site_in's layer."""
    saebench: dict[str, dict[str, float]] | None = None
    """SAEBench's core metrics under its names, by its categories (`openscope.eval.saebench`)."""
    probing: ProbingReport | None = None
    """Sparse probing (with --probing; None otherwise or for a multi-layer dictionary)."""
    absorption: AbsorptionReport | None = None
    """Feature absorption (with --absorption; None otherwise or for a dictionary that is not an SAE)."""
    prefixes: tuple[PrefixMetrics, ...] = ()
    """The prefix-quality curve (--prefixes), by increasing size, ending at the whole dictionary;
    empty when no prefix was measured."""


class EvalReport(NamedTuple):
    """The result of `evaluate`."""

    model: str
    """The model the dictionaries were spliced into."""
    source: str
    """The text source."""
    n_contexts: int
    """Contexts evaluated."""
    n_tokens: int
    """Kept tokens (BOS/EOS/pad excluded) the reconstruction metrics are measured on."""
    n_ce_positions: int
    """Positions the next-token metrics are averaged over (input and target both kept)."""
    dictionaries: list[DictionaryReport]
    """Per-dictionary results, in the order given."""
    joint: LMMetrics | None
    """Every dictionary spliced at once (all_at_once), else None."""
    seconds: float
    """Wall time of the evaluation loop."""
    tokens_per_s: float
    """Context tokens per second through the loop (all forwards included)."""
    files: list[Path]
    """Files written (report.json, report.md, frequencies.safetensors, PNGs)."""
