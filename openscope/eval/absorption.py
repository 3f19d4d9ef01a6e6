"""Feature absorption (Chanin et al.; SAEBench's `absorption_first_letter`): the first-letter task.

Words are the tokenizer's single tokens made only of letters (a leading space allowed). Each word gets an
in-context prompt of `ICL_EXAMPLES` other words of its split, one per line as `{word} has the first
letter: W`, then `{word} has the first letter:`; the dictionary's input site is read at the word's token.
The words are split into train and test (80/20, seeded). Then, as SAEBench does:

1. A ground-truth probe per letter: a balanced logistic probe on the raw activations (`probing.fit_logistic`);
   letters whose probe reaches F1 > `MIN_PROBE_F1` on the test words are evaluated.
2. The latents that should carry the letter: for k = 1 … `MAX_K`, the k latents with the largest
   mean(letter) − mean(other letters) on the training words get a k-sparse logistic probe; k grows while its
   test F1 rises by more than `F1_JUMP` over the last kept k (feature splitting), and the last kept k
   latents are the letter's main latents. (SAEBench ranks latents by an L1-penalised probe's weights; here
   by the class-mean difference, as sparse probing does.)
3. For each test word of the letter on which the probe fires: with p the unit probe direction, x the
   activation and f the latents, the probe projection is x·p and latent j contributes f_j (d_j·p) (d_j its
   decoder vector in raw units). The absorption fraction is the part of x·p carried by up to
   `MAX_ABSORBERS` other latents aligned with p (cos ≥ 0.1), not by the main latents; full absorption is a
   word on which no main latent fires and the single top-projecting latent (cos ≥ 0.025) carries at least
   40% of x·p (`absorption_fraction`, `is_full_absorption`).

Per letter: mean absorption fraction and full-absorption rate over the probe's true positives and the
number of split latents; then their mean and standard deviation over the evaluated letters.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import string
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from openscope.coders.dictionary import Dictionary
from openscope.errors import OpenscopeError
from openscope.eval.probing import fit_logistic, top_k_mean_diff
from openscope.models.hooks import run_to_sites
from openscope.models.load import LoadedModel
from openscope.models.tokens import encode, pad_batch

log = logging.getLogger(__name__)

LETTERS = string.ascii_lowercase
TEMPLATE = "{word} has the first letter:"
"""SAEBench's prompt template."""
ICL_EXAMPLES = 10
"""In-context examples per prompt."""
MAX_K = 10
"""Largest k of the k-sparse probes."""
F1_JUMP = 0.03
"""A k-sparse probe's F1 must rise by more than this for its k-th latent to count as a split latent."""
MIN_PROBE_F1 = 0.6
"""A letter is evaluated when its ground-truth probe's test F1 exceeds this."""
MIN_LETTERS = 20
"""SAEBench evaluates a dictionary only when at least this many letters pass `MIN_PROBE_F1`."""
FULL_COS = 0.025
"""Full absorption: the top-projecting latent's decoder must have at least this cosine with the probe."""
FRACTION_COS = 0.1
"""Absorption fraction: an absorbing latent's decoder must have at least this cosine with the probe."""
PROPORTION = 0.4
"""The absorbing latent(s) must carry at least this share of the probe projection."""
MAX_ABSORBERS = 3
"""At most this many latents together absorb a word (absorption fraction)."""
TOP_LATENTS = 10
"""Latents by projection looked at for full absorption (SAEBench's topk_feats)."""
EPS = 1e-8


# ---- words and prompts -----------------------------------------------------------------------------


def alpha_words(tokenizer: Any) -> list[tuple[int, str]]:
    """(token id, text) of every token whose text is ASCII letters only (one leading space allowed)."""
    out = []
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        core = text[1:] if text.startswith(" ") else text
        if core and core.isascii() and core.isalpha():
            out.append((i, text))
    return out


def first_letter(word: str) -> str:
    """The lower-case first letter of a word (leading spaces ignored)."""
    return word.strip()[0].lower()


def spelling_prompt(word: str, examples: Sequence[str]) -> tuple[str, str]:
    """(prompt up to and including the word, the rest): SAEBench's ICL prompt, a newline first."""
    lines = [TEMPLATE.format(word=ex) + " " + first_letter(ex).upper() for ex in examples]
    head = "\n" + "\n".join(lines) + "\n"
    before, after = TEMPLATE.split("{word}")
    return head + before + word, after


class SpellingSet(NamedTuple):
    """Activations at the word token of the prompts of one split."""

    words: list[str]
    """The words (token texts)."""
    letters: Tensor
    """[N] int64 index of each word's first letter in `LETTERS`."""
    x: Tensor
    """[N, d] float32 activations at the word's token."""


@torch.inference_mode()
def spelling_activations(
    loaded: LoadedModel,
    dictionary: Dictionary,
    words: Sequence[tuple[int, str]],
    seed: int,
    batch_size: int = 16,
) -> SpellingSet:
    """Activations at the dictionary's input site on each word's token of its prompt (examples drawn from
    the same words, seeded); words whose token does not survive inside the prompt are dropped."""
    tok = loaded.tokenizer
    rng = random.Random(seed)
    texts = [w for _, w in words]
    rows: list[tuple[list[int], int, str]] = []
    for token_id, word in words:
        examples = [w for w in rng.sample(texts, min(ICL_EXAMPLES + 1, len(texts))) if w != word][
            :ICL_EXAMPLES
        ]
        head, tail = spelling_prompt(word, examples)
        head_ids = encode(tok, head)
        ids = encode(tok, head + tail)
        if head_ids[-1] != token_id or ids[: len(head_ids)] != head_ids:
            continue
        rows.append((ids, len(head_ids) - 1, word))
    if not rows:
        raise OpenscopeError("no word of the first-letter task stays one token inside its prompt")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    xs = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        ids, attn, _ = pad_batch([r[0] for r in batch], pad)
        act = run_to_sites(loaded, ids.to(loaded.device), [dictionary.site_in], attn.to(loaded.device))
        x = act[dictionary.site_in]
        xs.append(x[torch.arange(len(batch)), torch.tensor([r[1] for r in batch])].float().cpu())
    letters = torch.tensor([LETTERS.index(first_letter(r[2])) for r in rows])
    return SpellingSet([r[2] for r in rows], letters, torch.cat(xs))


# ---- the per-word scores -----------------------------------------------------------------------------


def absorption_fraction(probe_proj: float, latent_proj: Tensor, cos: Tensor, main: Sequence[int]) -> float:
    """The share of the probe projection x·p carried by up to `MAX_ABSORBERS` non-main latents aligned
    with the probe (cos ≥ `FRACTION_COS`, positive projection) rather than by the main latents.

    latent_proj [F]: each latent's contribution to x·p; cos [F]: its decoder's cosine with p."""
    main_idx = torch.tensor(list(main), dtype=torch.long)
    main_proj = float(latent_proj[main_idx].sum()) if len(main_idx) else 0.0
    mask = (cos >= FRACTION_COS) & (latent_proj > 0)
    mask[main_idx] = False
    absorbers = latent_proj[mask]
    top = (
        float(absorbers.topk(min(MAX_ABSORBERS, absorbers.numel())).values.sum())
        if absorbers.numel()
        else 0.0
    )
    if probe_proj <= 0 or main_proj >= probe_proj or top / probe_proj < PROPORTION:
        return 0.0
    if main_proj <= 0:
        return 1.0
    absorbed = min(top, probe_proj - main_proj)
    return min(max(absorbed / (absorbed + main_proj), 0.0), 1.0)


def is_full_absorption(
    probe_proj: float, latents: Tensor, latent_proj: Tensor, cos: Tensor, main: Sequence[int]
) -> bool:
    """No main latent fires, and the latent with the largest projection is aligned with the probe
    (cos ≥ `FULL_COS`) and carries at least `PROPORTION` of x·p (which must be positive)."""
    if any(float(latents[j]) >= EPS for j in main):
        return False
    top = int(latent_proj.topk(min(TOP_LATENTS, latent_proj.numel())).indices[0])
    if float(cos[top]) < FULL_COS or probe_proj <= 0:
        return False
    return float(latent_proj[top]) / probe_proj >= PROPORTION


def f1_score(pred: Tensor, truth: Tensor) -> float:
    """F1 of boolean predictions against boolean truth (0 when nothing is predicted or true)."""
    tp = float((pred & truth).sum())
    fp = float((pred & ~truth).sum())
    fn = float((~pred & truth).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp > 0 else 0.0


# ---- per letter --------------------------------------------------------------------------------------


class LetterResult(NamedTuple):
    """Absorption of one letter (SAEBench's result detail, plus what chose its latents)."""

    first_letter: str
    """The letter."""
    mean_absorption_fraction: float
    """Mean absorption fraction over the probe's true positives."""
    full_absorption_rate: float
    """Fraction of the probe's true positives fully absorbed."""
    num_full_absorption: int
    """True positives fully absorbed."""
    num_probe_true_positives: int
    """Test words of the letter on which the ground-truth probe fires."""
    num_split_features: int
    """Main latents of the letter (1 unless the letter is split over several)."""
    main_latents: list[int]
    """The main latents."""
    probe_f1: float
    """Test F1 of the ground-truth probe."""


def main_latents(
    train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor
) -> tuple[list[int], list[float]]:
    """(main latents, test F1 of each k-sparse probe) of one letter, k = 1 … `MAX_K` (see module doc)."""
    ranked = top_k_mean_diff(train_f, train_y, MAX_K, signed=True).tolist()
    best, chosen, f1s = -math.inf, ranked[:1], []
    growing = True
    for k in range(1, len(ranked) + 1):
        cols = ranked[:k]
        probe = fit_logistic(train_f[:, cols], train_y, balanced=True)
        f1 = f1_score(probe.scores(test_f[:, cols]) > 0, test_y.bool())
        f1s.append(f1)
        if growing and f1 > best + F1_JUMP:
            best, chosen = f1, cols
        else:
            growing = False
    return chosen, f1s


def letter_absorption(
    letter: int,
    train: SpellingSet,
    test: SpellingSet,
    train_f: Tensor,
    test_f: Tensor,
    decoder: Tensor,
) -> LetterResult | None:
    """One letter's absorption from the split's activations and latents ([N, F]) and the decoder
    vectors [F, d] (raw units); None when the training or test words hold no word of the letter."""
    ytr, yte = (train.letters == letter).double(), (test.letters == letter)
    if ytr.sum() == 0 or ytr.sum() == len(ytr) or yte.sum() == 0:
        return None
    probe = fit_logistic(train.x, ytr, balanced=True)
    fires = probe.scores(test.x) > 0
    probe_f1 = f1_score(fires, yte)
    main, _ = main_latents(train_f, ytr, test_f, yte.double())
    p = (probe.weight / probe.weight.norm()).float()
    along = decoder @ p
    cos = along / decoder.norm(dim=-1).clamp_min(EPS)
    positives = (fires & yte).nonzero().squeeze(1).tolist()
    fractions, full = [], 0
    for i in positives:
        proj = test_f[i] * along
        probe_proj = float(test.x[i] @ p)
        fractions.append(absorption_fraction(probe_proj, proj, cos, main))
        full += is_full_absorption(probe_proj, test_f[i], proj, cos, main)
    n = len(positives)
    return LetterResult(
        LETTERS[letter],
        sum(fractions) / n if n else 0.0,
        full / n if n else 0.0,
        full,
        n,
        len(main),
        main,
        probe_f1,
    )


class AbsorptionReport(NamedTuple):
    """Feature absorption of one dictionary (SAEBench's `absorption_first_letter` metrics)."""

    mean_absorption_fraction_score: float
    """Mean over the evaluated letters of their mean absorption fraction."""
    mean_full_absorption_score: float
    """Mean over the evaluated letters of their full-absorption rate."""
    mean_num_split_features: float
    """Mean number of main latents per evaluated letter."""
    std_dev_absorption_fraction_score: float
    """Standard deviation over letters of the mean absorption fraction (NaN with one letter)."""
    std_dev_full_absorption_score: float
    """Standard deviation over letters of the full-absorption rate."""
    std_dev_num_split_features: float
    """Standard deviation over letters of the number of main latents."""
    letters: list[LetterResult]
    """The evaluated letters (ground-truth probe F1 > `MIN_PROBE_F1`)."""
    enough_letters: bool
    """Whether at least `MIN_LETTERS` letters passed (SAEBench reports nothing otherwise)."""
    n_train_words: int
    """Words the probes were trained on."""
    n_test_words: int
    """Words held out."""
    seed: int
    """Seed of the word draw, the split and the prompts' examples."""


def _stats(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def absorption_from_activations(
    dictionary: Dictionary, train: SpellingSet, test: SpellingSet, seed: int = 42
) -> AbsorptionReport:
    """Absorption of a single-layer SAE from the first-letter activations of its train and test words."""
    coder = dictionary.coder
    with torch.inference_mode():
        at = coder.w_enc  # the activations were kept on the CPU; the coder may be on a GPU
        train_f = coder.encode_at(0, train.x.to(at.device, at.dtype)).float().cpu()
        test_f = coder.encode_at(0, test.x.to(at.device, at.dtype)).float().cpu()
        width = train_f.shape[1]
        decoder = coder.decoder_vectors(0, 0, torch.arange(width)).float().cpu()
    letters = []
    for letter in range(len(LETTERS)):
        result = letter_absorption(letter, train, test, train_f, test_f, decoder)
        if result is not None and result.probe_f1 > MIN_PROBE_F1:
            letters.append(result)
    fraction = _stats([r.mean_absorption_fraction for r in letters])
    full = _stats([r.full_absorption_rate for r in letters])
    split = _stats([float(r.num_split_features) for r in letters])
    if len(letters) < MIN_LETTERS:
        log.warning(
            "%s: only %d letters have a first-letter probe with F1 > %s (SAEBench needs %d)",
            dictionary.name,
            len(letters),
            MIN_PROBE_F1,
            MIN_LETTERS,
        )
    return AbsorptionReport(
        fraction[0],
        full[0],
        split[0],
        fraction[1],
        full[1],
        split[1],
        letters,
        len(letters) >= MIN_LETTERS,
        len(train.words),
        len(test.words),
        seed,
    )


def run_absorption(
    loaded: LoadedModel,
    dicts: Sequence[Dictionary],
    max_words: int = 3000,
    train_fraction: float = 0.8,
    seed: int = 42,
    progress: bool = False,
) -> dict[str, AbsorptionReport]:
    """The first-letter absorption of every single-layer SAE (others are skipped, logged); the words
    (at most `max_words`, a seeded draw) are split once and shared by every dictionary."""
    if max_words < 10:
        raise OpenscopeError(f"the first-letter task needs at least 10 words, got {max_words}")
    saes = [d for d in dicts if d.n_layers == 1 and d.coder.kind == "sae"]
    for d in dicts:
        if d.name not in {s.name for s in saes}:
            log.warning("absorption skips %s: it is a %s, not a single-layer SAE", d.name, d.coder.kind)
    if not saes:
        return {}
    words = alpha_words(loaded.tokenizer)
    rng = random.Random(seed)
    words = rng.sample(words, min(max_words, len(words)))
    cut = max(1, min(len(words) - 1, round(len(words) * train_fraction)))
    out: dict[str, AbsorptionReport] = {}
    cache: dict[Any, tuple[SpellingSet, SpellingSet]] = {}
    for d in tqdm(saes, desc="absorption", disable=not progress):
        if d.site_in not in cache:
            cache[d.site_in] = (
                spelling_activations(loaded, d, words[:cut], seed),
                spelling_activations(loaded, d, words[cut:], seed + 1),
            )
        out[d.name] = absorption_from_activations(d, *cache[d.site_in], seed=seed)
    return out
