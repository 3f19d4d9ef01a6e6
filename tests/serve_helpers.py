"""Shared by the explorer's tests: a small feature database and a saved dictionary for the tiny Gemma 3,
so the explorer can be tested without running `openscope features`; and a uvicorn server run in a
thread on a free local port (`running`, `free_port`).

The database is written through the features module's own writer (`write_results`), with contents
the tests know: latent 3 peaks on the token "ar" (of Paris) and promotes it, every other latent peaks on
"om" (of Rome); latent 5 is latent 3's decoder neighbour.
A second dictionary ("gone") is indexed but its folder does not exist, so it has dashboards but
cannot run on text. `write_suite` makes the dictionaries' folder a small suite (an `openscope suite run`
folder) whose first item is the test dictionary.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openscope.coders.coder import CoderConfig, SparseCoder
from openscope.coders.dictionary import Dictionary, load_dictionary
from openscope.coders.io import save_coder
from openscope.features.index import ExampleRow, FeatureRow, connect, write_results
from openscope.features.schema import DictionaryInfo
from openscope.models.load import LoadedModel
from openscope.models.sites import Site, locate
from openscope.models.tokens import token_pieces


def free_port() -> int:
    """A local TCP port nothing listens on (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running(server: Any, timeout: float = 30.0) -> Iterator[None]:
    """Run a `uvicorn.Server` in a daemon thread until the block ends; wait until it accepts requests."""
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the explorer did not start within {timeout:.0f} s")
            time.sleep(0.05)
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def served(app: Any) -> Iterator[str]:
    """Serve a FastAPI app on a free local port for the block; yields its base URL."""
    import uvicorn

    port = free_port()
    with running(uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))):
        yield f"http://127.0.0.1:{port}"


WIDTH = 32
"""Latents of the test dictionary."""
NAME = "1_resid_post_sae"
"""Its name (folder name) in the database."""
GONE = "0_resid_post_gone"
"""An indexed dictionary whose folder is missing."""
SITE = Site(1, "resid_post")
TEXT = "The capital of France is Paris. The capital of Italy is Rome."


def save_dictionary(loaded: LoadedModel, root: Path) -> Path:
    """A random JumpReLU SAE on 1.resid_post of the tiny model, saved as a Gemma Scope 2 folder."""
    coder = SparseCoder(CoderConfig(d_in=loaded.d_model, d_out=loaded.d_model, width=WIDTH, seed=3))
    with torch.no_grad():
        # A low threshold so that several latents fire on any text of the tiny random model.
        coder.log_threshold.fill_(-6.0)  # type: ignore[union-attr]
    point = locate(loaded.arch.layers, loaded.arch.layers_path, SITE)
    return save_coder(coder, root / NAME, hook_point_in=point.hook_point, model_name=loaded.name)


def _example(
    ids: list[int], acts: list[float], latent: int, rank: int, kind: str = "top", bucket: int = 0
) -> ExampleRow:
    i = int(np.argmax(acts))
    return ExampleRow(
        latent=latent,
        kind=kind,
        bucket=bucket,
        rank=rank,
        context=rank,
        position=i,
        start=0,
        max_index=i,
        max_activation=float(acts[i]),
        max_token_id=ids[i],
        token_ids=np.asarray(ids),
        activations=np.asarray(acts, dtype=np.float32),
    )


def write_db(path: Path, loaded: LoadedModel, folder: Path) -> Path:
    """The test database: dashboards for every latent of the saved dictionary, and for "gone"."""
    tok = loaded.tokenizer
    ids: list[int] = tok(TEXT).input_ids
    pieces = token_pieces(tok, ids)
    # The tiny tokenizer has a 300-token vocabulary: "Paris" is P|ar|i|s, "Rome" is R|om|e.
    paris = next(i for i in ids if pieces[i] == "ar")
    rome = next(i for i in ids if pieces[i] == "om")
    edges = [float(e) for e in np.logspace(-3, 2, 21)]
    conn = connect(path)
    for name, width, dict_folder in ((NAME, WIDTH, str(folder)), (GONE, 16, str(folder.parent / "missing"))):
        features, examples, logits = [], [], []
        for latent in range(width):
            peak = paris if latent == 3 else rome
            acts = [0.0] * len(ids)
            acts[ids.index(peak)] = 2.0 + latent / 10
            acts[max(0, ids.index(peak) - 1)] = 0.5
            top = [_example(ids, [a * (1 - r / 10) for a in acts], latent, r) for r in range(3)]
            quant = [_example(ids, [a / (4 - b) for a in acts], latent, 0, "quantile", b) for b in range(2)]
            examples += top + quant
            features.append(
                FeatureRow(
                    latent=latent,
                    frequency=0.01 * (latent + 1),
                    n_fired=latent + 1,
                    max_activation=2.0 + latent / 10,
                    mean_activation=1.0,
                    top_token=pieces[peak],
                    top_logit=pieces[peak],
                    hist_first=5,
                    hist_counts=[1, 4, 9, 3, 1],
                    neighbours=[(5 if latent == 3 else 3, 0.8), ((latent + 1) % width, 0.1)],
                )
            )
            logits += [(latent, 1, 0, peak, 1.5), (latent, 1, 1, ids[0], 0.5), (latent, -1, 0, ids[1], -1.2)]
        info = DictionaryInfo(
            name=name,
            site="1.resid_post",
            site_out="1.resid_post",
            width=width,
            model=loaded.name,
            folder=dict_folder,
            source="test",
            n_tokens=1000,
            complete=True,
            alive=width,
        )
        settings: dict[str, Any] = {"hist_edges": edges, "quantile_buckets": 2}
        write_results(conn, info, "test", settings, features, examples, logits, pieces)
    conn.close()
    return path


def explorer_files(loaded: LoadedModel, root: Path) -> tuple[Path, Dictionary]:
    """(database path, loaded dictionary) under root."""
    folder = save_dictionary(loaded, root / "dicts")
    db = write_db(root / "features.db", loaded, folder)
    return db, load_dictionary(folder, loaded)


SUITE_ITEMS = (NAME, "transcoder/layer_1_width_16_l0_small", "clt/width_96_l0_small")
"""The suite's items: the test dictionary (done, with dashboards), a failed transcoder, a pending CLT."""


def write_suite(folder: Path, model: str, figures: list[str]) -> Path:
    """A suite catalogue in folder (the folder of the test dictionary) with `SUITE_ITEMS`, evaluated for
    the first, and an evaluation report listing `figures` (of which `ok.png` exists)."""
    from openscope.config import save_json
    from openscope.suite.folder import catalogue_document
    from openscope.suite.plan import SuiteItem, SuitePlan

    items = [
        SuiteItem(SUITE_ITEMS[0], "sae", "1.resid_post", WIDTH, 8, 1024),
        SuiteItem(SUITE_ITEMS[1], "transcoder", "1.mlp_in", 16, 4, 1024),
        SuiteItem(SUITE_ITEMS[2], "clt", "0-2.mlp_in", 96, 4, 1024),
    ]
    plan = SuitePlan(model, items)
    manifest = {
        "items": {
            SUITE_ITEMS[0]: {"status": "done", "train": {"l0": 8.5, "fvu": 0.2, "dead_fraction": 0.0}},
            SUITE_ITEMS[1]: {
                "status": "failed",
                "reason": "loss became nan at step 3, site 1.mlp_in; lower --lr",
            },
            SUITE_ITEMS[2]: {"status": "pending"},
        }
    }
    evaluated = {
        SUITE_ITEMS[0]: {"l0": 8.1, "fvu": 0.25, "dead_fraction": 0.0, "delta_loss": 0.05},
        "": {"source": "wiki[9000:]", "held_out": True, "n_tokens": 512, "report": "eval"},
    }
    groups = {name: f"00{i}" for i, name in enumerate(SUITE_ITEMS)}
    save_json(folder / "catalogue.json", catalogue_document(plan, manifest, 3, evaluated, groups))
    (folder / "eval").mkdir(exist_ok=True)
    (folder / "eval" / "ok.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    save_json(folder / "eval" / "report.json", {"kind": "suite-catalogue", "figures": figures})
    return folder
