"""`openscope autointerp`: explain a dictionary's latents with a chat model and score the explanations.

For each latent: the explainer reads its dashboard (`explain_examples` of its top and quantile examples,
firing tokens marked) and writes one line; the scorer gets that line and a shuffled mix of held-out
texts, `score_examples` where the latent fires (examples the explainer did not see, nor any text
overlapping them) and as many where it does not, and says which fire (detection), then lists the words
that fire in the firing ones (fuzzing). Texts where it does not fire are other latents' examples that
share no token with this latent's stored examples. (The database keeps each window's activations of its
own latent only, so for a latent that fires on a large fraction of tokens some of these may hold a
firing the index never saw; the report gives each latent's frequency beside its scores.)

A call that fails for good marks that latent unexplained with the reason and the run goes on; every
answer is cached in the database, so a rerun asks nothing twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from openscope.errors import OpenscopeError
from openscope.features.db import FeatureDB
from openscope.features.export import parse_latents
from openscope.features.schema import DictionaryInfo, Example, FeatureDetail
from openscope.files import safe_name
from openscope.interp.backends import (
    BackendError,
    CachedBackend,
    ChatBackend,
    Message,
    OpenAIBackend,
    TransformersBackend,
    is_loopback,
)
from openscope.interp.config import AutointerpConfig, api_key, base_url, check_config
from openscope.interp.prompts import (
    Window,
    detection_messages,
    explainer_messages,
    fuzzing_messages,
    parse_explanation,
    trim,
)
from openscope.interp.report import AutointerpResult, check_report, write_report
from openscope.interp.scoring import detection_score, fuzzing_score
from openscope.interp.store import AutointerpStore, Explanation

log = logging.getLogger(__name__)

NEGATIVE_POOL = 64
"""Other latents whose top examples make the pool of texts where a latent does not fire."""


class Plan(NamedTuple):
    """What one latent is explained from and scored on."""

    latent: int
    """Latent index."""
    frequency: float
    """Its firing frequency in the index."""
    explain: list[Window]
    """Examples the explainer reads."""
    positives: list[Window]
    """Held-out texts where it fires."""
    negatives: list[Window]
    """Texts where it does not fire."""

    @property
    def calls(self) -> int:
        """Calls this latent needs: one explanation, a detection per text, a fuzzing per firing text."""
        return 1 + len(self.positives) + len(self.negatives) + len(self.positives)


class DryRun(NamedTuple):
    """What a run would do, without calling anything."""

    latents: list[int]
    """The latents it would explain."""
    calls: int
    """Calls it would make at most (a cached answer is not asked again)."""
    prompts: list[tuple[str, list[Message]]]
    """The first latent's prompts: (what, messages)."""


def window_of(example: Example) -> Window:
    return Window(tuple(example.tokens), tuple(example.activations), example.context, example.start)


def split_examples(detail: FeatureDetail, n_explain: int, n_score: int) -> tuple[list[Window], list[Window]]:
    """The explainer's examples (even ranks: the top ones first, then quantile samples) and held-out firing
    texts (odd ranks, quantile samples and top examples alternating), none overlapping the other side."""
    top = [window_of(e) for e in detail.top_examples]
    quant = [window_of(e) for g in detail.quantiles for e in g.examples]
    n_quant = min(len(quant[0::2]), n_explain // 3) if quant else 0
    explain = (top[0::2][: n_explain - n_quant] + quant[0::2][:n_quant])[:n_explain]
    rest = [w for pair in zip(quant[1::2], top[1::2], strict=False) for w in pair]
    rest += quant[1::2][len(top[1::2]) :] + top[1::2][len(quant[1::2]) :]
    held: list[Window] = []
    for w in rest:
        if w.fires and not any(w.overlaps(x) for x in explain + held):
            held.append(w)
    return explain, held[:n_score]


def negatives_for(
    latent: int, avoid: Sequence[Window], pool: dict[int, list[Window]], n: int, seed: int
) -> list[Window]:
    """n texts from other latents' examples sharing no token with this latent's (activations zeroed)."""
    candidates = [w for other, ws in sorted(pool.items()) if other != latent for w in ws]
    random.Random(seed * 1_000_003 + latent).shuffle(candidates)
    out: list[Window] = []
    for w in candidates:
        if len(out) == n:
            break
        if not any(w.overlaps(x) for x in [*avoid, *out]):
            out.append(w._replace(activations=(0.0,) * len(w.tokens)))
    return out


def choose_latents(db: FeatureDB, cfg: AutointerpConfig, width: int) -> tuple[list[int], dict[int, float]]:
    """The latents to explain (those that fired) and every alive latent's frequency."""
    freqs = {f.latent: f.frequency for f in db.features(cfg.dictionary, limit=width) if f.frequency > 0}
    if cfg.latents:
        chosen = parse_latents(cfg.latents, width)
        dead = [i for i in chosen if i not in freqs]
        if dead:
            raise OpenscopeError(f"latents {dead[:5]} never fired in the index: nothing to explain")
        return chosen[: cfg.max_latents], freqs
    if not freqs:
        raise OpenscopeError(f"no latent of {cfg.dictionary} fired in the index: nothing to explain")
    alive = sorted(freqs)
    return sorted(random.Random(cfg.seed).sample(alive, min(cfg.max_latents, len(alive)))), freqs


def plan_latents(
    db: FeatureDB, cfg: AutointerpConfig, latents: Sequence[int], freqs: dict[int, float]
) -> list[Plan]:
    side = cfg.window
    pool_latents = random.Random(cfg.seed + 1).sample(sorted(freqs), min(NEGATIVE_POOL, len(freqs)))
    pool = {
        i: [trim(window_of(e), side) for e in db.feature(cfg.dictionary, i).top_examples]
        for i in pool_latents
    }
    plans = []
    for latent in latents:
        detail = db.feature(cfg.dictionary, latent)
        explain, held = split_examples(detail, cfg.explain_examples, cfg.score_examples)
        everything = [window_of(e) for e in detail.top_examples] + [
            window_of(e) for g in detail.quantiles for e in g.examples
        ]
        negatives = negatives_for(latent, everything, pool, len(held), cfg.seed)
        plans.append(Plan(latent, freqs.get(latent, 0.0), explain, [trim(w, side) for w in held], negatives))
    return plans


def setup_of(cfg: AutointerpConfig, explainer: str, scorer: str) -> str:
    """Fingerprint of what produces the results: the models and every setting that changes a prompt."""
    keys = ("explain_examples", "score_examples", "window", "explain_tokens", "fuzz_tokens", "seed")
    doc = json.dumps([explainer, scorer, {k: getattr(cfg, k) for k in keys}], sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def explain_latent(
    plan: Plan,
    dictionary: str,
    explainer: ChatBackend,
    scorer: ChatBackend,
    cfg: AutointerpConfig,
    setup: str,
) -> tuple[Explanation, int]:
    """Explain and score one latent; a failed call marks it unexplained (or unscored) with the reason.
    Returns the result and the tokens used."""
    start = time.perf_counter()
    names = dict(explainer=explainer.name, scorer=scorer.name, setup=setup)

    def done(status: str, text: str, reason: str, det=None, fuzz=None, calls=0) -> Explanation:
        return Explanation(
            dictionary, plan.latent, status, text, reason,
            None if det is None else det.value, None if fuzz is None else fuzz.value,
            0 if det is None else det.n, 0 if fuzz is None else fuzz.n,
            names["explainer"], names["scorer"], setup, calls, time.perf_counter() - start,
        )  # fmt: skip

    try:
        reply = explainer.chat(explainer_messages(plan.explain), cfg.explain_tokens)
    except BackendError as exc:
        return done("unexplained", "", f"explainer failed: {exc}"), 0
    used = reply.prompt_tokens + reply.completion_tokens
    calls = int(not reply.cached)
    text = parse_explanation(reply.text)
    if text is None:
        return done(
            "unexplained", "", f"explainer answered nothing usable ({reply.text[:60]!r})", calls=calls
        ), used
    try:
        det = detection_score(scorer, text, plan.positives, plan.negatives, seed=cfg.seed + plan.latent)
        fuzz = fuzzing_score(scorer, text, plan.positives, max_tokens=cfg.fuzz_tokens)
    except BackendError as exc:
        return done("unscored", text, f"scorer failed: {exc}", calls=calls), used
    calls += det.calls + fuzz.calls
    used += det.tokens + fuzz.tokens
    reason = ""
    if det.unparsed * 2 > det.n:
        reason = f"scorer answered neither yes nor no to {det.unparsed} of {det.n} texts"
        det = None
    return done("explained", text, reason, det, fuzz, calls), used


def make_backends(cfg: AutointerpConfig) -> tuple[ChatBackend, ChatBackend]:
    """The explainer and the scorer named by the settings (one model object when they are the same)."""
    if cfg.backend == "transformers":
        explainer: ChatBackend = TransformersBackend(cfg.model, cfg.device)
        scorer_name = cfg.scorer_model or cfg.model
        scorer = explainer if scorer_name == cfg.model else TransformersBackend(scorer_name, cfg.device)
        return explainer, scorer
    url = base_url(cfg)
    key = api_key(cfg, url, is_loopback(url))
    opts = dict(timeout=cfg.timeout, retries=cfg.retries, backoff=cfg.backoff)
    explainer = OpenAIBackend(url, cfg.model, key, **opts)  # type: ignore[arg-type]
    return explainer, OpenAIBackend(url, cfg.scorer_model or cfg.model, key, **opts)  # type: ignore[arg-type]


def report_path(cfg: AutointerpConfig) -> Path:
    return cfg.output or Path(cfg.db).parent / f"autointerp-{safe_name(cfg.dictionary)}"


def dry_run(cfg: AutointerpConfig) -> DryRun:
    """The latents, the number of calls and the first latent's prompts; nothing is called."""
    check_config(cfg, endpoint=False)
    with FeatureDB(cfg.db) as db:
        info = _complete(db, cfg.dictionary)
        latents, freqs = choose_latents(db, cfg, info.width)
        plans = plan_latents(db, cfg, latents, freqs)
    first = plans[0]
    prompts: list[tuple[str, list[Message]]] = [
        (f"explain latent {first.latent}", explainer_messages(first.explain))
    ]
    if first.positives:
        prompts.append(("detection (one per text)", detection_messages("<explanation>", first.positives[0])))
        prompts.append(
            ("fuzzing (one per firing text)", fuzzing_messages("<explanation>", first.positives[0]))
        )
    return DryRun(latents, sum(p.calls for p in plans), prompts)


def _complete(db: FeatureDB, name: str) -> DictionaryInfo:
    info = db.dictionary(name)
    if not info.complete:
        raise OpenscopeError(f"dictionary {name} has no dashboards yet; run `openscope features` on it first")
    return info


def run_autointerp(
    cfg: AutointerpConfig,
    explainer: ChatBackend | None = None,
    scorer: ChatBackend | None = None,
    *,
    progress: bool = True,
) -> AutointerpResult:
    """Explain and score the chosen latents, write them into the database and a report folder.
    `explainer` and `scorer` override the backends the settings name (planted models in tests)."""
    check_config(cfg, endpoint=explainer is None or scorer is None)
    t0 = time.perf_counter()
    with FeatureDB(cfg.db) as db:
        info = _complete(db, cfg.dictionary)
        latents, freqs = choose_latents(db, cfg, info.width)
        output = report_path(cfg)
        check_report(output, cfg.overwrite, cfg.db)
        if explainer is None or scorer is None:
            explainer, scorer = make_backends(cfg)
        plans = plan_latents(db, cfg, latents, freqs)
    setup = setup_of(cfg, explainer.name, scorer.name)
    results: list[Explanation] = []
    tokens = skipped = 0
    lock = threading.Lock()  # the workers share the token count
    with AutointerpStore(cfg.db) as store:
        others = store.setups(cfg.dictionary) - {setup}
        if others and not cfg.overwrite:
            raise OpenscopeError(
                f"{cfg.db} holds explanations of {cfg.dictionary} made with other models or settings; "
                "pass --overwrite to replace them"
            )
        if others:
            store.clear(cfg.dictionary)
        cached_explainer, cached_scorer = CachedBackend(explainer, store), CachedBackend(scorer, store)

        def work(plan: Plan) -> Explanation | None:
            nonlocal tokens, skipped
            with lock:
                if cfg.token_budget and tokens >= cfg.token_budget:
                    skipped += 1
                    return None
            result, used = explain_latent(plan, cfg.dictionary, cached_explainer, cached_scorer, cfg, setup)
            with lock:
                tokens += used
            store.write(result)
            if result.status != "explained" or result.reason:
                log.warning("latent %d: %s", plan.latent, result.reason)
            return result

        with ThreadPoolExecutor(cfg.concurrency) as pool:
            jobs = pool.map(work, plans)
            for r in tqdm(jobs, total=len(plans), desc="autointerp", unit="latent", disable=not progress):
                if r is not None:
                    results.append(r)
    results.sort(key=lambda r: r.latent)
    seconds = time.perf_counter() - t0
    settings = {k: v for k, v in asdict(cfg).items() if k != "api_key"}  # the key is never written
    result = AutointerpResult(results, freqs, skipped, tokens, seconds, output)
    write_report(output, cfg.overwrite, cfg.db, settings, result)
    return result
