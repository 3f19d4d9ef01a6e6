"""The settings of `openscope features`: which dictionaries, from which tokens, with which statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from openscope.features.index import DEFAULT_DB


@dataclass
class FeaturesConfig:
    """Which dictionaries to index, from which tokens, with which settings, into which database."""

    dictionaries: list[Path] = field(default_factory=lambda: [Path("openscope-out/dictionaries")])
    """Dictionary folders, or folders to search for them; repeat the flag for several."""
    output: Path = DEFAULT_DB
    """The SQLite feature database (created if missing; other dictionaries in it are kept)."""
    store: Path | None = None
    """Read activations from this store (it must hold the dictionaries' input sites). Default: run the model live on --source."""
    source: str = "wiki[9000:]"
    """Text for live mode: wiki, shakespeare, python, or a path; slice documents, e.g. `wiki[9000:]`."""
    text_field: str = "text"
    """Field (jsonl) or column (parquet, saved dataset) holding the text."""
    roles: str = ""
    """Chat data (sharegpt, chat:PATH, or a store harvested from one): index only tokens of these roles, e.g. `model` (of template, system, user, model); empty: every token. Per-role statistics are kept whenever the data has roles."""
    model: str | None = None
    """Model (name, local directory or hub id). Default: the store's model, else the dictionaries' model_name."""
    tokens: int = 1_000_000
    """Token budget: tokens (BOS/EOS/pad excluded) encoded per dictionary, rounded up to whole batches."""
    context_len: int = 128
    """Tokens per packed context in live mode (a store keeps its own)."""
    batch_tokens: int = 4096
    """Tokens per batch (rounded to whole contexts)."""
    top_k: int = 24
    """Top activating examples kept per latent."""
    window: int = 16
    """Tokens shown on each side of an example's max token."""
    quantile_buckets: int = 4
    """Activation quantile groups of sampled examples."""
    quantile_examples: int = 4
    """Sampled examples per quantile group."""
    hist_min: float = 1e-3
    """Lowest histogram edge (smaller nonzero activations count in the first bin)."""
    hist_max: float = 1e5
    """Highest histogram edge (larger activations count in the last bin)."""
    bins_per_decade: int = 16
    """Log-spaced histogram bins per factor of ten."""
    logits: int = 10
    """Top and bottom logit tokens kept per latent."""
    neighbours: int = 10
    """Nearest latents by decoder cosine kept per latent."""
    seed: int = 0
    """Seed of the quantile sampling (a rerun with the same seed gives the same examples)."""
    checkpoint_every: int = 50
    """Commit the streaming state every this many batches (the most an interruption loses)."""
    force: bool = False
    """Recompute dictionaries whose dashboards are already complete."""
    export: Path | None = None
    """Also write each feature's JSON (FeatureDetail) to <export>/<dictionary>/<latent>.json (with --neuronpedia: Neuronpedia's import batches there)."""
    export_latents: str = ""
    """Latents to export, e.g. `0-99,512` (default: all)."""
    overwrite: bool = False
    """Replace earlier --export files of these dictionaries (only folders of feature JSON openscope wrote)."""
    neuronpedia: bool = False
    """--export writes Neuronpedia's dashboard import batches (SAEDashboard's batch-N.json files and skipped_indexes.json: activations with bins, logit tables, histograms, frac_nonzero, neuron alignment) instead of one FeatureDetail JSON per latent."""
    device: str = "auto"
    """Device: auto (cuda if available), cpu, cuda, ..."""
    cache_dir: Path | None = None
    """Where converted models are cached (default: $OPENSCOPE_CACHE or ~/.cache/openscope)."""
