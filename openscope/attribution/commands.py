"""The `openscope attribute` and `openscope intervene` commands: typed configs and what they run.

Each config's field docstrings are the command's `--help` (see `openscope.cli.config_command`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import yaml

from openscope.attribution.attribute import AttributionGraph, attribute
from openscope.attribution.intervene import intervene, parse_edit
from openscope.attribution.io import graph_file, load_graph, save_graph
from openscope.attribution.schema import GenerationSettings, GraphFile, InterventionResult
from openscope.coders.dictionary import (
    Dictionary,
    dictionary_folders,
    load_dictionary,
    model_of,
    unique_names,
)
from openscope.coders.export.target import CIRCUIT_TRACER_CONFIG
from openscope.config import save_json
from openscope.errors import OpenscopeError
from openscope.files import absolute, check_file_output, json_with
from openscope.models.load import LoadedModel, load_model, resolve_device

log = logging.getLogger(__name__)


@dataclass
class AttributeConfig:
    """Which prompt to attribute, with which dictionaries, and where to write the graph."""

    prompt: str
    """The prompt (BOS is added). Its graph explains the model's next token after it."""
    dictionaries: list[Path] = field(default_factory=lambda: [Path("openscope-out/dictionaries")])
    """Transcoder folders (one per layer, mlp_in -> mlp_out) or a cross-layer transcoder folder, or folders to search for them; repeat the flag for several. Every layer's MLP must be covered once."""
    output: Path = Path("openscope-out/graphs/graph.json")
    """Graph JSON to write (circuit-tracer / Neuronpedia graph schema, plus openscope's metrics)."""
    overwrite: bool = False
    """Replace the graph file already at --output (only a graph file is ever replaced)."""
    model: str | None = None
    """Model (name, local directory or hub id). Default: the `model_name` in the dictionaries' config.json."""
    max_logits: int = 10
    """Most logit nodes: the top next tokens, until they cover --logit-probability."""
    logit_probability: float = 0.95
    """Cumulative probability the logit nodes should cover."""
    batch_size: int = 32
    """Attribution rows per backward pass (the prompt is run this many times side by side)."""
    max_feature_nodes: int | None = 8192
    """Attribute at most this many active latents, the most influential first (memory grows with its square)."""
    node_threshold: float = 0.8
    """Pruning: keep the fewest nodes holding this fraction of the influence on the logits."""
    edge_threshold: float = 0.98
    """Pruning: keep the fewest edges holding this fraction of the edge influence."""
    max_tokens: int = 64
    """Refuse prompts longer than this many tokens (BOS included)."""
    max_memory_gb: float | None = None
    """Refuse, before the backward passes, an attribution whose memory estimate (logged) exceeds this many GiB. Default: the machine's memory."""
    freeze_skip_at_bos: bool = False
    """Skip-transcoders: hold the skip term constant at BOS/EOS/pad (openscope's earlier convention). Default: it stays live there, as in circuit-tracer."""
    slug: str | None = None
    """Graph identifier written in the file. Default: the output file's stem."""
    device: str = "cpu"
    """Device: cpu (float32, the default), cuda, ... or auto."""
    cache_dir: Path | None = None
    """Where converted models are cached (default: $OPENSCOPE_CACHE or ~/.cache/openscope)."""


@dataclass
class InterveneConfig:
    """Which feature nodes of a graph to zero or scale, and how to show the effect."""

    graph: Path
    """A graph JSON written by `openscope attribute`, or by circuit-tracer (its transcoders: --dictionaries, or found through its scan when it is an openscope export)."""
    zero: list[str] = field(default_factory=list)
    """Feature nodes to zero: node ids (layer_latent_position, as in the graph) or layer:position:latent; repeat the flag for several."""
    scale: list[str] = field(default_factory=list)
    """Feature nodes to scale, as NODE=FACTOR (e.g. 3_120_5=2 or 3:5:120=0.5); repeat the flag for several."""
    top_k: int = 10
    """How many top next tokens to show before and after."""
    dictionaries: list[Path] = field(default_factory=list)
    """Dictionary folders (or folders to search). Default: the folders the graph records (a circuit-tracer graph: the openscope folders its exported transcoders came from)."""
    model: str | None = None
    """Model (name, local directory or hub id). Default: the model the graph records."""
    output: Path | None = None
    """Also write the result as JSON here."""
    overwrite: bool = False
    """Replace the result file already at --output (only one openscope wrote is ever replaced)."""
    device: str = "cpu"
    """Device: cpu, cuda, ... or auto."""
    cache_dir: Path | None = None
    """Where converted models are cached (default: $OPENSCOPE_CACHE or ~/.cache/openscope)."""


INTERVENTION_FILE = json_with(("prompt", "edits", "top_before", "top_after"))
"""Recognises an intervention result `openscope intervene --output` wrote."""


def is_graph_file(path: Path) -> bool:
    """Whether a file is an attribution graph (ours or circuit-tracer's): it may be replaced."""
    try:
        load_graph(path)
    except OpenscopeError:
        return False
    return True


class AttributeResult(NamedTuple):
    """What `run_attribute` made."""

    graph: AttributionGraph
    """The unpruned graph (adjacency and nodes)."""
    document: GraphFile
    """The pruned graph file as written."""
    path: Path
    """Where it was written."""


def load_attribution_dictionaries(
    paths: list[Path], device: str, loaded: LoadedModel | None = None
) -> list[Dictionary]:
    """Every dictionary folder named by paths (each a dictionary folder or a tree to search)."""
    return unique_names([load_dictionary(f, loaded, device=device) for f in dictionary_folders(paths)])


def attribute_document(
    cfg: AttributeConfig,
    loaded: LoadedModel,
    dictionaries: list[Dictionary],
    model: str,
    progress: bool = True,
) -> tuple[AttributionGraph, GraphFile]:
    """Attribute cfg.prompt with loaded dictionaries and prune it into a graph file (not written);
    the CLI and the explorer's "run graph" share it."""
    graph = attribute(
        loaded,
        dictionaries,
        cfg.prompt,
        max_logits=cfg.max_logits,
        logit_probability=cfg.logit_probability,
        batch_size=cfg.batch_size,
        max_feature_nodes=cfg.max_feature_nodes,
        max_tokens=cfg.max_tokens,
        freeze_skip_at_bos=cfg.freeze_skip_at_bos,
        max_memory_gb=cfg.max_memory_gb,
        progress=progress,
    )
    document = graph_file(
        graph,
        model=model,
        tokenizer=loaded.tokenizer,
        node_threshold=cfg.node_threshold,
        edge_threshold=cfg.edge_threshold,
        slug=cfg.slug or cfg.output.stem,
        generation=GenerationSettings(
            max_n_logits=cfg.max_logits,
            desired_logit_prob=cfg.logit_probability,
            batch_size=cfg.batch_size,
            max_feature_nodes=cfg.max_feature_nodes,
            freeze_skip_at_bos=cfg.freeze_skip_at_bos,
        ),
    )
    return graph, document


def run_attribute(
    cfg: AttributeConfig, loaded: LoadedModel | None = None, progress: bool = True
) -> AttributeResult:
    """Attribute cfg.prompt, prune, and write the graph file."""
    device = resolve_device(cfg.device)
    output = check_file_output(cfg.output, "a graph file", is_graph_file, overwrite=cfg.overwrite)
    dictionaries = load_attribution_dictionaries(cfg.dictionaries, device)
    model = cfg.model or (loaded.name if loaded is not None else model_of(dictionaries))
    if loaded is None:
        loaded = load_model(model, device=device, cache_dir=cfg.cache_dir)
    graph, document = attribute_document(cfg, loaded, dictionaries, model, progress)
    save_graph(document, output)
    return AttributeResult(graph, document, cfg.output)


def exported_sources(scan: str) -> list[Path]:
    """The openscope folders a circuit-tracer graph's transcoders came from, when its `scan` is a folder
    `openscope export --to circuit-tracer` wrote (its config.yaml lists them); else []."""
    config = Path(scan) / CIRCUIT_TRACER_CONFIG
    try:
        data = yaml.safe_load(config.read_text()) if Path(scan).is_absolute() and config.is_file() else None
    except (OSError, yaml.YAMLError):
        return []
    sources = data.get("openscope", {}).get("sources") if isinstance(data, dict) else None
    if not isinstance(sources, list) or not all(isinstance(x, str) for x in sources):
        return []
    folders = [Path(x) for x in sources]
    return folders if all(f.is_dir() for f in folders) else []


def run_intervene(cfg: InterveneConfig, loaded: LoadedModel | None = None) -> InterventionResult:
    """Load a graph, its model and dictionaries, and apply cfg's edits (`intervene`)."""
    document = load_graph(cfg.graph)
    if cfg.output is not None:
        check_file_output(cfg.output, "an intervention result", INTERVENTION_FILE, overwrite=cfg.overwrite)
    edits = [parse_edit(s, 0.0) for s in cfg.zero] + [parse_edit(s) for s in cfg.scale]
    info = document.metadata.openscope
    device = resolve_device(cfg.device)
    if cfg.dictionaries:
        dictionaries = load_attribution_dictionaries(cfg.dictionaries, device)
    elif info is None:
        sources = exported_sources(document.metadata.scan)
        if not sources:
            raise OpenscopeError(
                f"{cfg.graph} was not written by openscope and its scan {document.metadata.scan!r} is no "
                "openscope export; pass the transcoders with --dictionaries"
            )
        dictionaries = load_attribution_dictionaries(sources, device)
    else:
        if any(d.folder is None for d in info.dictionaries):
            raise OpenscopeError(f"{cfg.graph} does not record its dictionary folders; pass --dictionaries")
        dictionaries = [load_dictionary(Path(d.folder), device=device) for d in info.dictionaries if d.folder]
        dictionaries = [d._replace(name=g.name) for d, g in zip(dictionaries, info.dictionaries, strict=True)]
    if loaded is None:
        model = cfg.model or (info.model if info is not None else model_of(dictionaries))
        loaded = load_model(model, device=device, cache_dir=cfg.cache_dir)
    result = intervene(loaded, document, {d.name: d for d in dictionaries}, edits, cfg.top_k)
    if cfg.output is not None:
        absolute(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        save_json(absolute(cfg.output), result.model_dump(mode="json"))
    return result
