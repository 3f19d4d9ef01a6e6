"""The training run's settings (`TrainConfig`, the `openscope train` options) and what a run returns
(`TrainResult`); shared by the single-layer trainer and the cross-layer transcoder trainer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

from openscope.config import parse_floats, parse_ints
from openscope.errors import OpenscopeError

N = TypeVar("N", int, float)


@dataclass
class TrainConfig:
    """What to train, on which activations, and how (defaults follow Gemma Scope)."""

    store: Path = Path("openscope-out/activations")
    """Activation store made by `openscope harvest` (ignored in live mode)."""
    roles: str = ""
    """Chat stores: train only on tokens of these roles, e.g. `model` or `model,user` (of template, system, user, model); empty: every token."""
    model: str = ""
    """Live mode: run this model (name, directory or hub id) instead of reading --store; one forward per batch feeds every dictionary."""
    source: str = "wiki"
    """Live mode: text source (as for harvest)."""
    context_len: int = 256
    """Live mode: tokens per packed context."""
    block_tokens: int = 65_536
    """Live mode: tokens per shuffling block (memory: block_tokens x total site width x 4 bytes)."""
    sites: str = "all"
    """Sites to train on: names or patterns (`all`: every site of the store). Transcoders: the `mlp_in` sites.
    CLTs: the consecutive layers to cover, e.g. `4-9.mlp_in` (`all`: every layer whose mlp_in and mlp_out the data holds)."""
    kind: str = "sae"
    """sae, transcoder (mlp_in -> mlp_out of the same layer), skip_transcoder (adds x @ A), clt (one
    cross-layer transcoder over the chosen layers: layer l's latents write to mlp_out of l and every later
    layer), skip_clt (a CLT with a skip x @ A per layer) or crosscoder (one weakly causal crosscoder over
    one site kind at the layers --sites names, e.g. `5,9,12,15.resid_post`: layer l's latents read l's
    site and reconstruct it and the later chosen ones; --width counts latents per layer, as for a CLT)."""
    activation: str = "jumprelu"
    """jumprelu (Gemma Scope), topk, batchtopk or relu (L1 baseline)."""
    width: int | str = 4096
    """Latents per dictionary (a CLT: per layer). A comma list, e.g. `4096,16384`, trains one dictionary
    per width and --target-l0 on each site, all from the same batches (SAEs and transcoders)."""
    k: int | None = None
    """Active latents per token for topk/batchtopk."""
    sparsity: str = "auto"
    """quadratic_l0 (Gemma Scope 2), l0 (Gemma Scope 1), l1, none; auto picks by activation."""
    target_l0: float | str = 50.0
    """Target L0 of the quadratic L0 loss. A comma list, e.g. `10,50,150`, trains one dictionary per
    target and --width on each site, all from the same batches (SAEs and transcoders)."""
    sparsity_coeff: float = 1.0
    """λ of the sparsity loss after warm-up (quadratic L0: 1 holds L0 near its target; weaker values
    let reconstruction pull L0 above it)."""
    init_data_dependent: bool = True
    """Start from the first batch: b_dec = its mean target (the residual stream's large constant
    part), JumpReLU θ where L0 = target_l0, encoder scaled to the best reconstruction size. Off:
    Gemma Scope's init (zero biases, θ = init_threshold or 0.001, W_enc = W_decᵀ)."""
    init_threshold: float | None = None
    """JumpReLU initial θ (normalised units); unset: 0.001, or calibrated with the data-dependent
    init (Gemma Scope's 0.001 suits billions of tokens: Adam moves log θ by ~lr per step)."""
    init_threshold_per_latent: bool = True
    """With the data-dependent init, JumpReLU θ per latent: each latent fires on target_l0/width of the
    first batch (none starts dead). Off: one θ for every latent, at which the batch's L0 is the target
    (measured on Gemma 3 270M, width 4096, L0 50: 20% of the latents then never fire on held-out text)."""
    sparsity_warmup_steps: int = 10_000
    """Steps of linear λ warm-up (Gemma Scope), capped at a fifth of the run's steps."""
    freq_coeff: float = 0.1
    """Weight of the penalty on latents firing on more than max_fire_rate of tokens (jumprelu)."""
    max_fire_rate: float = 0.1
    """Fire rate above which a latent is penalised."""
    revive: str = "none"
    """Dead latents of a jumprelu/relu dictionary: `none`; `resample` (every --resample-every steps, each
    latent dead for the dead window restarts as a detector of a poorly reconstructed token, Adam state
    reset; SAEs, transcoders and CLTs); `aux` (the AuxK loss of topk: dead latents' pre-activations learn
    the residual error; single-layer dictionaries); `preact` (jumprelu: Anthropic's pre-activation loss,
    --preact-coeff·Σ_dead max(0, θ − z), raises dead latents' pre-activations and lowers their θ until
    they fire; SAEs, transcoders and CLTs). Measured best on Gemma 3 270M: `preact` with --dead-tokens
    100000 --freq-coeff 1 --max-fire-rate 0.08 (dead latents 30% → 1.5% at 4M tokens, same delta loss)."""
    preact_coeff: float = 1e-4
    """--revive preact: λ_p of the pre-activation loss (normalised units)."""
    resample_every: int = 250
    """--revive resample: steps between resamplings."""
    dead_tokens: int = 1_000_000
    """A latent that has not fired for this many training tokens counts as dead (the dead fraction, and
    what --revive revives); capped at the run's --tokens."""
    matryoshka: str = ""
    """Matryoshka training (empty: off; a CLT: per layer). Fixed groups: nested prefix sizes, e.g.
    `128,512,2048` (the full width is added), the same every step. Random prefixes: `random:N`, N
    lengths drawn afresh every step, log-uniform over 1..width (every octave of sizes equally often, so
    small prefixes are common), plus the full width, each loss weighted 1/(N+1); the draw is a pure
    function of --seed and the step, so a resumed run equals an uninterrupted one."""
    init_from: Path | None = None
    """SAE/transcoder: start from the dictionaries saved under this folder (one per site, same kind and
    width) instead of a fresh init: fine-tune a base-model dictionary on new data, e.g. chat tokens.
    CLT: start from single-layer transcoders found under this folder (one per layer, e.g. an earlier
    `--kind transcoder` run): their first --width latents (a Matryoshka prefix) give each layer's encoder,
    threshold and own-layer decoder; later-layer decoder blocks start at zero."""
    init_greedy: bool = False
    """CLT with --init-from: choose each layer's latents greedily (Gemma Scope 2 App. B) instead of the
    first --width: layers in order, each transcoder's latents in Matryoshka (index) order, skipping
    latents marked used; for each chosen latent, the unused latent of a later layer whose encoder
    column has the largest dot product with its decoder row is marked used (it would re-read what the
    chosen one writes forward). The target L0 starts at the chosen latents' summed L0 (measured on the
    first training batch, kept in the checkpoint) and decays linearly to --target-l0 over the
    sparsity warm-up (as capped for the run)."""
    finetune: str = ""
    """`kl`: end-to-end fine-tuning of the --init-from dictionaries through the live --model (Gemma Scope 2
    §2.4): minimise (MSE + α·β·KL)/(1 + β), α = MSE/(KL + 1e-8) held constant per step, the KL between
    the clean next-token distribution and the one with the reconstruction spliced in (BOS/pad excluded);
    batches are whole contexts. Empty: plain training."""
    beta: float | None = None
    """β of --finetune kl: how much the KL counts against the MSE (0: plain training; unset: 1)."""
    lr: float = 7e-5
    """Adam learning rate (β = (0, 0.999))."""
    threshold_lr_scale: float = 50.0
    """JumpReLU: learning rate of log θ relative to --lr. Adam moves log θ by ~lr per step, so at 1×
    θ cannot keep up with the encoder (whose weights are ~0.01) and L0 drifts off its target."""
    lr_warmup_steps: int = 1000
    """Steps of linear learning-rate warm-up (Gemma Scope), capped at a tenth of the run's steps."""
    lr_decay: float = 0.2
    """Fraction of the run at its end over which the learning rate decays linearly to zero (lets
    the thresholds, and so L0, settle; 0: constant to the end)."""
    batch_size: int = 4096
    """Tokens per step."""
    tokens: int = 2_000_000
    """Training tokens per dictionary (the store is repeated in new shuffles if smaller)."""
    seed: int = 0
    """Seed of initialisation and batch order."""
    output: Path = Path("openscope-out/dictionaries")
    """Folder for the dictionaries (one sub-folder each), metrics.jsonl and the checkpoint."""
    checkpoint_every: int = 200
    """Steps between checkpoints."""
    resume: bool = False
    """Continue from the checkpoint in the output folder (or of an interrupted --overwrite run)."""
    overwrite: bool = False
    """Replace the training run already in the output folder (its dictionaries, metrics and checkpoint); the old run stays whole until the new one is saved. Only a folder openscope trained into is ever replaced."""
    incomplete_store: bool = False
    """Train on a store whose harvest has not finished (its finished shards only)."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, ..."""
    batches_ahead: int | None = None
    """Batches a background thread assembles from the store ahead of the training step, in page-locked
    memory so that their copy to the GPU does not block (never changes which rows come in which batch).
    None: 2 on CUDA, 0 on the CPU, where the thread would take cores from the step. Store runs only: a live
    model's forward stays in the step's thread (its hooks are the model's)."""
    precision: str = "auto"
    """float32; tf32 (CUDA: float32 with TF32 products); bf16 (the dictionaries' products in bfloat16 under
    autocast, float32 master weights, Adam state, losses and statistics); auto: bf16 on CUDA, else float32."""
    data_parallel: int = 0
    """Under torchrun: data-parallel replicas per dictionary (each trains on its share of every batch,
    gradients averaged); the processes form world/N dictionary groups that share the dictionaries out.
    0: auto, world / gcd(world, dictionaries) (a CLT: every process; dictionaries only shared out when
    the world divides their number)."""
    log_every: int = 20
    """Steps between metric lines in metrics.jsonl."""
    log: str = ""
    """Also send the metrics rows to `wandb` (Weights & Biases; WANDB_MODE=offline needs no network)
    and/or `tensorboard` (event files), a comma list, under the output folder's logs/ (optional extras:
    pip install 'openscope[wandb]'). metrics.jsonl is always written."""
    eval_every: int = 0
    """Steps between held-out evaluations: every dictionary's L0 and FVU on the store's last contexts,
    which are then held out of training (0: off; store runs only)."""
    eval_tokens: int = 8192
    """Rows held out of training for --eval-every (the store's last contexts; at most a fifth of them)."""

    def __post_init__(self) -> None:
        if self.batches_ahead is not None and self.batches_ahead < 0:
            raise OpenscopeError(f"--batches-ahead must be 0 or more, got {self.batches_ahead}")
        if self.batches_ahead and (self.model or self.finetune):
            raise OpenscopeError(
                "--batches-ahead reads a store ahead; a live model (--model, --finetune) runs in the step's thread"
            )
        # The command line gives text. One number is kept as a number, so a one-dictionary run's saved
        # settings, checkpoint identity and folders are what they were before lists were allowed.
        self.width = _one_or_list(self.width, int)
        self.target_l0 = _one_or_list(self.target_l0, float)
        if self.dead_tokens < 1:
            raise OpenscopeError(f"--dead-tokens must be positive, got {self.dead_tokens}")
        if self.revive not in ("none", "aux", "resample", "preact"):
            raise OpenscopeError(f"--revive {self.revive!r} is not one of none, aux, resample, preact")
        if not self.preact_coeff >= 0:
            raise OpenscopeError(f"--preact-coeff must be >= 0, got {self.preact_coeff}")


def _one_or_list(value: N | str, number: Callable[[str], N]) -> N | str:
    """One number in `value`'s text as that number; a list as its text without spaces; else unchanged
    (`widths` and `target_l0s` say what is wrong with it)."""
    if not isinstance(value, str):
        return value
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if len(parts) == 1:
        try:
            return number(parts[0])
        except ValueError:
            return value
    return ",".join(parts) if parts else value


def _distinct_positive(values: tuple[N, ...], flag: str) -> tuple[N, ...]:
    if not values:
        raise OpenscopeError(f"{flag} needs a value")
    bad = [v for v in values if not v > 0]
    if bad:
        raise OpenscopeError(f"{flag} must be positive, got {bad[0]}")
    twice = [v for i, v in enumerate(values) if v in values[:i]]
    if twice:
        raise OpenscopeError(f"{flag} lists {twice[0]} twice")
    return values


def widths(cfg: TrainConfig) -> tuple[int, ...]:
    """The run's widths (--width: one, or a comma list), in the order given; a one-line error unless
    each is a positive integer, none repeated."""
    values = parse_ints(cfg.width, "--width") if isinstance(cfg.width, str) else (cfg.width,)
    return _distinct_positive(values, "--width")


def target_l0s(cfg: TrainConfig) -> tuple[float, ...]:
    """The run's target L0s (--target-l0: one, or a comma list), in the order given; a one-line error
    unless each is a positive number, none repeated."""
    values = (
        parse_floats(cfg.target_l0, "--target-l0") if isinstance(cfg.target_l0, str) else (cfg.target_l0,)
    )
    return _distinct_positive(values, "--target-l0")


def dictionaries_per_site(cfg: TrainConfig) -> int:
    """How many dictionaries the run trains on each site: one per (width, target L0)."""
    return len(widths(cfg)) * len(target_l0s(cfg))


def number_text(value: float) -> str:
    """A width or target L0 as it appears in names: `50`, `12.5` (never two values the same text)."""
    text = f"{value:g}"
    return text if float(text) == value else repr(float(value))


def result_key(site: str, width: int, target_l0: float, cfg: TrainConfig) -> str:
    """The key of one dictionary in `TrainResult` and run.json's `final`: its input site when the run
    trains one dictionary per site, else `<site>_w<width>_l0_<target>` (e.g. `6.resid_post_w4096_l0_50`)."""
    if dictionaries_per_site(cfg) == 1:
        return site
    return f"{site}_w{width}_l0_{number_text(target_l0)}"


class TrainResult(NamedTuple):
    """What a training run produced."""

    folders: dict[str, Path]
    """Dictionary folder per input site (several widths or targets per site: per `result_key`)."""
    steps: int
    """Optimisation steps taken in total."""
    final: dict[str, dict[str, float]]
    """Last measured L0, FVU and dead fraction per dictionary (keyed as `folders`; a CLT: per layer)."""
    seconds: float
    """Wall time of this run."""
    failed: dict[str, str] | None = None
    """Dictionaries that failed (keyed as `folders`) with the one-line reason, when the run isolates
    failures (`train(..., isolate_failures=True)`: the others train on and are saved); None otherwise."""
