"""`openscope demo`: the whole loop on the embedded defaults, from a bare install to the explorer.

Five stages, each the pipeline's own function (nothing here re-implements one):

1. harvest (`openscope.activations.harvest`): the model's middle-layer residual stream on
   Wikipedia lead paragraphs (`wiki[:9000]`) into an activation store;
2. train (`openscope.train`): a JumpReLU SAE with the quadratic L0 loss, with the settings the
   README's training recipe gives for a short CPU run (data-dependent start, lr 5e-4);
3. eval (`openscope.eval`): L0, FVU, delta LM loss, KL and loss recovered on held-out articles
   (`wiki[9000:]`), on a small token budget (every batch costs three full forwards);
4. features (`openscope.features`): every latent's dashboard from the harvested store (its shards
   keep the token ids, so examples show text) into a SQLite index;
5. serve (`openscope.serve`): the explorer on http://127.0.0.1:PORT/ until Ctrl-C.

The model is loaded once, when the first stage that needs it runs, and shared by the others.

Resumable: `<output>/demo.json` records each stage's settings when it starts and marks it done when
it ends. A rerun skips every finished stage whose settings and inputs are unchanged without
touching its files (so a second `openscope demo` goes straight to the explorer), and an
interrupted stage continues where the stage itself can: harvest and features from their last
shard or checkpoint, train from its checkpoint; eval, the cheapest, starts over. Harvest and
train are the expensive stages and keep state of their own, so a rerun that changes their
settings is refused (choose another --output) rather than mixing two runs in one folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from openscope.activations.harvest import HarvestConfig, harvest
from openscope.activations.store import MANIFEST, ActivationStore, sha256_file
from openscope.config import save_json, to_jsonable
from openscope.errors import OpenscopeError
from openscope.eval import EvalConfig, evaluate
from openscope.features import FeaturesConfig, compute_features
from openscope.features.db import FeatureDB
from openscope.files import absolute, staged_path
from openscope.models.load import (
    DEFAULT_MODEL,
    KNOWN_MODELS,
    LoadedModel,
    is_cached,
    load_model,
    resolve_device,
)
from openscope.reports import REPORT_JSON, REPORT_MD
from openscope.serve.config import ServeConfig
from openscope.train import TrainConfig, train
from openscope.train.loop import CHECKPOINT

log = logging.getLogger(__name__)

STATE = "demo.json"
"""The demo's record of its stages, in the output folder."""
HOST = "127.0.0.1"
"""The explorer listens on this machine only."""
STAGES = ("harvest", "train", "eval", "features", "serve")


@dataclass
class DemoConfig:
    """Run the main job end to end on the embedded defaults: load Gemma 3 270M, harvest real text,
    train a JumpReLU SAE on a middle layer, evaluate it on held-out text, build its feature
    dashboards and open the explorer. Rerun it to skip what is finished (or resume what is not)."""

    output: Path = Path("openscope-out/demo")
    """Folder for everything the demo makes: activations/, dictionaries/, eval/, features.db, demo.json."""
    model: str = DEFAULT_MODEL
    """Model: a known name (see `openscope models`), a local Hugging Face directory, or a hub id."""
    sites: str = "mid.resid_post"
    """Site(s) to harvest and train on: `mid.resid_post` is the middle layer's residual stream (see `openscope sites`)."""
    source: str = "wiki[:9000]"
    """Training text: wiki, shakespeare, python, or a path; `wiki[:9000]` keeps the last 1000 articles for evaluation."""
    eval_source: str = "wiki[9000:]"
    """Held-out text for the evaluation (not seen in training)."""
    harvest_tokens: int = 200_000
    """Tokens of training text to harvest (about 900 tokens/s for a middle layer on 2 CPU cores)."""
    train_tokens: int = 1_000_000
    """Training tokens (the store is repeated in new shuffles; about 8k tokens/s at width 4096 on 2 cores)."""
    batch_size: int = 4096
    """Tokens per training step (the store must hold at least this many)."""
    width: int = 4096
    """Latents of the SAE."""
    target_l0: float = 50.0
    """Target L0 (active latents per token) of the quadratic L0 loss."""
    lr: float = 5e-4
    """Learning rate: 5e-4 suits a short run (the README's training recipe); Gemma Scope's 7e-5 needs billions of tokens."""
    eval_tokens: int = 2048
    """Held-out tokens to evaluate on (each batch runs three full forwards: about 20-40 tokens/s on 2 cores)."""
    feature_tokens: int = 200_000
    """Harvested tokens to build the dashboards from (about 7k tokens/s at width 4096)."""
    port: int = 8000
    """Port of the explorer (http://127.0.0.1:PORT/)."""
    serve: bool = True
    """Open the explorer at the end and serve until Ctrl-C (--no-serve: stop after the dashboards)."""
    device: str = "auto"
    """Device: auto (cuda if available), cpu, cuda, ..."""
    cache_dir: Path | None = None
    """Where converted models are cached (default: $OPENSCOPE_CACHE or ~/.cache/openscope)."""


class DemoResult(NamedTuple):
    """What a demo run made, where it is, and how long each stage took."""

    output: Path
    """The demo's folder."""
    store: Path
    """The activation store."""
    dictionaries: list[Path]
    """The trained dictionary folders (one per site)."""
    eval_dir: Path
    """The evaluation report's folder (report.json, report.md, plots)."""
    db: Path
    """The feature database."""
    report: dict[str, Any]
    """report.json of the evaluation."""
    train_final: dict[str, dict[str, float]]
    """The trainer's last L0, FVU and dead fraction per site."""
    indexed: list[dict[str, Any]]
    """Per dictionary in the feature database: name, width, tokens indexed, latents alive."""
    seconds: dict[str, float]
    """Wall time per stage run (and `model` for loading it), 0 for a stage skipped."""
    skipped: list[str]
    """Stages skipped because they were finished with the same settings."""
    loaded: LoadedModel | None
    """The model, if a stage loaded it (the explorer reuses it)."""


Say = Callable[[str], None]


# ---- the record of finished stages ----------------------------------------------------------------


def _settings(cfg: Any, drop: set[str], **inputs: Any) -> dict[str, Any]:
    """A stage's settings as JSON: the config without fields that do not change its output
    (device, paths inside the demo folder), plus digests of its inputs."""
    out = {k: v for k, v in to_jsonable(cfg).items() if k not in drop}
    return {**out, **to_jsonable(inputs)}


def _first_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} there, {new.get(key)!r} now"
    return "none"


class _State:
    """demo.json: per stage, the settings it ran with and whether it finished."""

    def __init__(self, root: Path) -> None:
        self.path = root / STATE
        self.stages: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                self.stages = dict(json.loads(self.path.read_text())["stages"])
            except (ValueError, KeyError, TypeError):
                raise OpenscopeError(
                    f"{self.path} is unreadable; delete it (finished stages are still checked and resumed)"
                ) from None

    def done(self, stage: str, settings: dict[str, Any]) -> bool:
        rec = self.stages.get(stage)
        return bool(rec and rec.get("done") and rec.get("settings") == settings)

    def check_same(self, stage: str, settings: dict[str, Any], root: Path) -> None:
        """Refuse to continue a stateful stage (harvest, train) under other settings."""
        rec = self.stages.get(stage)
        if rec is not None and rec.get("settings") != settings:
            raise OpenscopeError(
                f"{root} holds a demo whose {stage} stage ran with other settings "
                f"({_first_difference(rec.get('settings') or {}, settings)}); "
                f"choose another --output or delete {root}"
            )

    def start(self, stage: str, settings: dict[str, Any]) -> None:
        self.stages[stage] = {"settings": settings, "done": False}
        self._save()

    def finish(self, stage: str, seconds: float, **facts: Any) -> None:
        self.stages[stage].update(done=True, seconds=round(seconds, 1), **facts)
        self._save()

    def _save(self) -> None:
        save_json(self.path, {"stages": self.stages})


def _digests(folders: list[Path]) -> dict[str, str]:
    """sha256 of each dictionary's weights: eval and features are redone when the weights change."""
    return {f.name: sha256_file(f / "params.safetensors") for f in folders}


# ---- helpers --------------------------------------------------------------------------------------


class _Model:
    """Loads the model on first use and keeps it for the other stages; counts the time it took."""

    def __init__(self, cfg: DemoConfig, say: Say) -> None:
        self.cfg, self.say = cfg, say
        self.loaded: LoadedModel | None = None
        self.seconds = 0.0

    def get(self) -> LoadedModel:
        if self.loaded is None:
            cfg = self.cfg
            first = cfg.model in KNOWN_MODELS and not is_cached(cfg.model, cfg.cache_dir)
            self.say(
                f"loading {cfg.model}"
                + (
                    " (first use: converting its GGUF weights to safetensors, about a minute and a half, once)"
                    if first
                    else ""
                )
            )
            start = time.perf_counter()
            self.loaded = load_model(cfg.model, "float32", resolve_device(cfg.device), cfg.cache_dir)
            self.seconds += time.perf_counter() - start
            self.say(f"      model loaded in {_duration(self.seconds)}")
        return self.loaded


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 60 else f"{int(seconds // 60)}m{seconds % 60:02.0f}s"


def _count(n: float) -> str:
    """200000 -> 200k, 1000000 -> 1M (headers are one line)."""
    for unit, size in (("M", 1_000_000), ("k", 1000)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def check_port(port: int, host: str = HOST) -> None:
    """OpenscopeError if nothing can listen on host:port; checked before the stages too, so a busy port
    is found out before ten minutes of work rather than after."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as exc:
            raise OpenscopeError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}); pass --port N or --no-serve"
            ) from None


def _validate(cfg: DemoConfig) -> None:
    for name in ("harvest_tokens", "train_tokens", "batch_size", "width", "eval_tokens", "feature_tokens"):
        if getattr(cfg, name) < 1:
            raise OpenscopeError(f"--{name.replace('_', '-')} must be positive")
    if cfg.target_l0 <= 0 or cfg.lr <= 0:
        raise OpenscopeError("--target-l0 and --lr must be positive")
    if not 0 < cfg.port < 65536:
        raise OpenscopeError(f"--port must be between 1 and 65535, got {cfg.port}")


# ---- the stages ---------------------------------------------------------------------------------------


class _Stages:
    """The demo's stages 1-4, each run or skipped by the record in demo.json (module docstring)."""

    def __init__(self, cfg: DemoConfig, progress: bool, say: Say) -> None:
        self.cfg, self.progress, self.say = cfg, progress, say
        self.root = Path(cfg.output)
        self.root.mkdir(parents=True, exist_ok=True)
        self.state = _State(self.root)
        self.model = _Model(cfg, say)
        self.seconds: dict[str, float] = {}
        self.skipped: list[str] = []
        self.n = len(STAGES)

    def timed(self, stage: str, run: Callable[[], Any]) -> Any:
        loading = self.model.seconds
        start = time.perf_counter()
        out = run()
        # The model's load is reported on its own line, not charged to the stage that happened to need it first.
        self.seconds[stage] = time.perf_counter() - start - (self.model.seconds - loading)
        self.say(f"      {stage} done in {_duration(self.seconds[stage])}")
        return out

    def skip(self, stage: str, header: str) -> None:
        self.say(header)
        self.skipped.append(stage)

    def harvest(self) -> tuple[Path, ActivationStore, str]:
        """1. The store (its folder, the store, a digest of its shards that names the data seen)."""
        cfg, state, root, n = self.cfg, self.state, self.root, self.n
        store_dir = root / "activations"
        hcfg = HarvestConfig(
            model=cfg.model,
            sites=cfg.sites,
            source=cfg.source,
            tokens=cfg.harvest_tokens,
            output=store_dir,
            device=cfg.device,
            cache_dir=cfg.cache_dir,
        )
        h_settings = _settings(hcfg, {"output", "device", "cache_dir", "extra"})
        state.check_same("harvest", h_settings, root)
        if state.done("harvest", h_settings) and _store_complete(store_dir):
            self.skip("harvest", f"[1/{n}] harvest: finished already ({store_dir}), skipped")
        else:
            self.say(
                f"[1/{n}] harvest: {_count(cfg.harvest_tokens)} tokens of {cfg.source} through {cfg.model} "
                f"at {cfg.sites} -> {store_dir}"
            )
            state.start("harvest", h_settings)
            res = self.timed("harvest", lambda: harvest(hcfg, self.model.get(), progress=self.progress))
            state.finish("harvest", self.seconds["harvest"], rows=res.n_rows)
        store = ActivationStore(store_dir, verify=False)
        if store.n_rows < cfg.batch_size:
            raise OpenscopeError(
                f"the store holds {store.n_rows} tokens, fewer than one training batch ({cfg.batch_size}); "
                "raise --harvest-tokens or lower --batch-size"
            )
        # The shards' manifest entries (checksums, rows, token digests) identify the data train and features saw.
        shards = hashlib.sha256(json.dumps(store.shards, sort_keys=True).encode()).hexdigest()
        return store_dir, store, shards

    def train(self, store_dir: Path, shards: str) -> tuple[list[Path], dict[str, Any]]:
        """2. The trained dictionary folders and the trainer's final numbers."""
        cfg, state, root, n = self.cfg, self.state, self.root, self.n
        dict_dir = root / "dictionaries"
        tcfg = TrainConfig(
            store=store_dir,
            activation="jumprelu",
            sparsity="quadratic_l0",
            width=cfg.width,
            target_l0=cfg.target_l0,
            lr=cfg.lr,
            batch_size=cfg.batch_size,
            tokens=cfg.train_tokens,
            output=dict_dir,
            device=cfg.device,
        )
        drop = {"store", "output", "device", "resume", "overwrite", "incomplete_store", "checkpoint_every"}
        drop.add("batches_ahead")  # how batches are read, never which: folders from before it stay valid
        t_settings = _settings(tcfg, drop | {"log_every"}, store=shards)
        state.check_same("train", t_settings, root)
        folders = [root / f for f in state.stages.get("train", {}).get("folders", [])]
        if (
            state.done("train", t_settings)
            and folders
            and all((f / "params.safetensors").is_file() for f in folders)
        ):
            self.skip("train", f"[2/{n}] train: finished already ({dict_dir}), skipped")
        else:
            self.say(
                f"[2/{n}] train: JumpReLU SAE, {cfg.width} latents, target L0 {cfg.target_l0:g}, "
                f"{_count(cfg.train_tokens)} tokens, lr {cfg.lr:g} -> {dict_dir}"
            )
            state.start("train", t_settings)
            # An interrupted run continues from its checkpoint (the trainer checks it is the same run); one
            # cut short before its first checkpoint, or while saving, is replaced (the demo's own folder).
            resume = any((f / CHECKPOINT).is_file() for f in (dict_dir, staged_path(absolute(dict_dir))))
            tcfg = replace(tcfg, resume=resume, overwrite=True)
            tres = self.timed("train", lambda: train(tcfg, progress=self.progress))
            folders = list(tres.folders.values())
            state.finish("train", self.seconds["train"], folders=[str(f.relative_to(root)) for f in folders])
        return folders, json.loads((dict_dir / "run.json").read_text()).get("final", {})

    def eval(self, folders: list[Path], digests: dict[str, str]) -> tuple[Path, dict[str, Any]]:
        """3. The evaluation report's folder and its report.json."""
        cfg, state, n = self.cfg, self.state, self.n
        eval_dir = self.root / "eval"
        ecfg = EvalConfig(
            dictionaries=folders,
            model=cfg.model,
            source=cfg.eval_source,
            tokens=cfg.eval_tokens,
            output=eval_dir,
            device=cfg.device,
            cache_dir=cfg.cache_dir,
            overwrite=True,  # the demo's own report folder: a stage that did not finish is redone
        )
        e_settings = _settings(
            ecfg, {"dictionaries", "output", "device", "cache_dir", "overwrite"}, weights=digests
        )
        if state.done("eval", e_settings) and (eval_dir / REPORT_JSON).is_file():
            self.skip("eval", f"[3/{n}] eval: finished already ({eval_dir / REPORT_MD}), skipped")
        else:
            self.say(
                f"[3/{n}] eval: {_count(cfg.eval_tokens)} held-out tokens of {cfg.eval_source} "
                f"(L0, FVU, delta loss, KL, loss recovered) -> {eval_dir}"
            )
            state.start("eval", e_settings)
            self.timed("eval", lambda: evaluate(ecfg, self.model.get(), progress=self.progress))
            state.finish("eval", self.seconds["eval"])
        return eval_dir, json.loads((eval_dir / REPORT_JSON).read_text())

    def features(
        self,
        folders: list[Path],
        digests: dict[str, str],
        store_dir: Path,
        store: ActivationStore,
        shards: str,
    ) -> tuple[Path, list[dict[str, Any]]]:
        """4. The feature database and, per dictionary in it, its name, width, tokens and latents alive."""
        cfg, state, n = self.cfg, self.state, self.n
        db = self.root / "features.db"
        fcfg = FeaturesConfig(
            dictionaries=folders,
            output=db,
            store=store_dir,
            model=cfg.model,
            # The store is all there is: a budget beyond it would only warn that the data ran out.
            tokens=min(cfg.feature_tokens, store.n_rows),
            device=cfg.device,
            cache_dir=cfg.cache_dir,
        )
        drop = {"dictionaries", "output", "store", "device", "cache_dir", "overwrite"}
        f_settings = _settings(fcfg, drop, weights=digests, store=shards)
        if state.done("features", f_settings) and _indexed(db, [f.name for f in folders]):
            self.skip("features", f"[4/{n}] features: finished already ({db}), skipped")
        else:
            self.say(
                f"[4/{n}] features: dashboards of every latent over {_count(fcfg.tokens)} harvested tokens -> {db}"
            )
            state.start("features", f_settings)
            self.timed("features", lambda: compute_features(fcfg, self.model.get(), progress=self.progress))
            state.finish("features", self.seconds["features"])
        with FeatureDB(db) as fdb:
            indexed = [
                {"name": i.name, "width": i.width, "n_tokens": i.n_tokens, "alive": i.alive}
                for i in fdb.dictionaries()
            ]
        return db, indexed


def run_demo(cfg: DemoConfig, progress: bool = True, say: Say = log.info) -> DemoResult:
    """Stages 1-4 (harvest, train, eval, features), skipping those already finished; `say` gets
    the one-line headers (the CLI prints them; the default logs them)."""
    _validate(cfg)
    if cfg.serve:
        check_port(cfg.port)
    stages = _Stages(cfg, progress, say)
    store_dir, store, shards = stages.harvest()
    folders, train_final = stages.train(store_dir, shards)
    digests = _digests(folders)
    eval_dir, report = stages.eval(folders, digests)
    db, indexed = stages.features(folders, digests, store_dir, store, shards)
    stages.seconds["model"] = stages.model.seconds
    return DemoResult(
        stages.root,
        store_dir,
        folders,
        eval_dir,
        db,
        report,
        train_final,
        indexed,
        stages.seconds,
        stages.skipped,
        stages.model.loaded,
    )


def _store_complete(root: Path) -> bool:
    try:
        return bool(json.loads((root / MANIFEST).read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def _indexed(db: Path, names: list[str]) -> bool:
    """Whether the database holds finished dashboards of every named dictionary."""
    if not db.is_file():
        return False
    with FeatureDB(db) as fdb:
        complete = {i.name for i in fdb.dictionaries() if i.complete}
    return set(names) <= complete


def url(cfg: DemoConfig) -> str:
    """The explorer's address."""
    return f"http://{HOST}:{cfg.port}/"


def summary(cfg: DemoConfig, result: DemoResult) -> list[str]:
    """The final summary: quality of each dictionary, where the files are, how to explore them."""
    ran = {k: v for k, v in result.seconds.items() if k != "model" and v > 0}
    total = sum(ran.values()) + result.seconds.get("model", 0.0)
    parts = [f"{k} {_duration(v)}" for k, v in ran.items()]
    if result.seconds.get("model"):
        parts.insert(0, f"model load {_duration(result.seconds['model'])}")
    lines = [
        f"demo finished in {_duration(total)}"
        + (f" ({', '.join(parts)})" if parts else "")
        + (f"; skipped (done already): {', '.join(result.skipped)}" if result.skipped else "")
    ]
    alive = {i["name"]: i for i in result.indexed}
    for d in result.report.get("dictionaries", []):
        line = f"  {d['name']} ({d['site_in']}): L0 {d['l0']:.1f}, FVU {d['fvu']:.3f}"
        if d.get("delta_loss") is not None:
            line += f", delta loss {d['delta_loss']:.3f} nats, KL {d['kl']:.3f}"
        if d.get("loss_recovered") is not None:
            line += f", loss recovered {d['loss_recovered']:.1%}"
        if d["name"] in alive:
            info = alive[d["name"]]
            line += f"; {info['alive']} of {info['width']} latents fired on {_count(info['n_tokens'])} tokens"
        lines.append(line)
    lines += [
        f"  activations   {result.store}",
        *(f"  dictionary    {f}" for f in result.dictionaries),
        f"  evaluation    {result.eval_dir / REPORT_MD} (and report.json, plots)",
        f"  dashboards    {result.db}",
    ]
    if cfg.serve:
        first = result.dictionaries[0].name if result.dictionaries else ""
        lines.append(f"  explorer      {url(cfg)}#/dict/{first}")
    else:
        lines.append(
            f"  explore with  openscope serve --db {result.db}   (or rerun openscope demo: it skips to the explorer)"
        )
    return lines


def explorer(cfg: DemoConfig, result: DemoResult, loaded: LoadedModel | None = None) -> Any:
    """Stage 5, set up: the explorer app on the demo's database and dictionaries, as a uvicorn server
    not yet started (`.run()` serves until Ctrl-C; tests run it in a thread and set `should_exit`)."""
    import uvicorn  # the web server loads only when serving

    from openscope.serve.app import create_app  # FastAPI loads only when serving

    check_port(cfg.port)
    loaded = loaded or result.loaded or _Model(cfg, log.info).get()
    serve_cfg = ServeConfig(
        db=result.db,
        dictionaries=result.dictionaries,
        host=HOST,
        port=cfg.port,
        device=cfg.device,
        cache_dir=cfg.cache_dir,
    )
    app = create_app(serve_cfg, loaded=loaded)
    return uvicorn.Server(uvicorn.Config(app, host=HOST, port=cfg.port, log_level="info"))


def demo(cfg: DemoConfig, progress: bool = True, say: Say = log.info) -> DemoResult:
    """The whole loop: stages 1-4, the summary, then (unless --no-serve) the explorer until Ctrl-C."""
    result = run_demo(cfg, progress=progress, say=say)
    for line in summary(cfg, result):
        say(line)
    if not cfg.serve:
        return result
    say(f"[5/{len(STAGES)}] serve: the explorer at {url(cfg)} (API docs: {url(cfg)}docs; Ctrl-C stops)")
    # A rerun that skipped every stage has not loaded the model yet: the inspector and steering need it.
    loaded = result.loaded or _Model(cfg, say).get()
    server = explorer(cfg, result, loaded)
    # uvicorn re-raises the Ctrl-C it handled; stopping the explorer is the normal end of the demo.
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    say("explorer stopped")
    return result
