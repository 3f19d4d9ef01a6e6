"""The feature index on disk: an embedded SQLite database (stdlib `sqlite3`), its tables and its writes.

`openscope features` writes it (`openscope.features.build`, through `mark_pending` and
`write_results`); the explorer web app and `--export` read it through `openscope.features.db.FeatureDB`,
whose methods return the pydantic models of `openscope.features.schema`.

Tables (one database holds many dictionaries; every row is keyed by the dictionary's name):

    meta(key PRIMARY KEY, value)                       schema_version, ...
    dictionaries(name PRIMARY KEY, site, site_out, width, kind, model, folder, source,
                 n_tokens, complete, alive, fingerprint, settings)   settings: JSON (hist edges, config)
    features(dictionary, latent, frequency, n_fired, max_activation, mean_activation,
             top_token, top_logit, hist_first, hist_counts, neighbours)
             PRIMARY KEY (dictionary, latent)          hist_counts, neighbours: JSON
    examples(dictionary, latent, kind, bucket, rank, context, position, start, max_index,
             max_activation, max_token_id, token_ids, activations)
             PRIMARY KEY (dictionary, latent, kind, bucket, rank)
             kind 'top' (bucket 0, rank 0 = highest) or 'quantile' (bucket = quantile index);
             token_ids int32 and activations float32 as little-endian BLOBs (compact: the bulk of the file)
    logits(dictionary, latent, sign, rank, token_id, value)        sign +1 top / -1 bottom
             PRIMARY KEY (dictionary, latent, sign, rank)
    vocab(model, token_id, token, key)                 PRIMARY KEY (model, token_id); key = lower(strip(token))
    progress(dictionary PRIMARY KEY, fingerprint, batches_done, tokens_done, state)
             a running computation's checkpoint (state: safetensors bytes); deleted when done
    role_stats(dictionary, latent, role, n_tokens, n_fired, frequency, mean_activation,
             frequency_elsewhere, specificity)   PRIMARY KEY (dictionary, latent, role)
             chat data only (openscope.features.roles); absent from databases made before it existed
    latent_extras(dictionary, latent, logits_lo, logits_hi, logits_counts, neurons, correlates, heads)
             PRIMARY KEY (dictionary, latent)          logits_counts, neurons, correlates, heads: JSON
             what the Neuronpedia export adds (`ExtraRow`); absent from databases made before it existed

Indexes: examples(max_token_id) for search by token, logits(token_id) for search by logit,
vocab(key) to turn a word into token ids.

Writes of one dictionary's results happen in one transaction (`write_results`), so a reader sees
either the old complete dashboards or the new ones, never half.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from openscope.errors import OpenscopeError
from openscope.features.schema import SCHEMA_VERSION, DictionaryInfo

DEFAULT_DB = Path("openscope-out/features.db")
"""Where `openscope features` writes unless told otherwise."""

DDL = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS dictionaries(
    name TEXT PRIMARY KEY, site TEXT NOT NULL, site_out TEXT NOT NULL, width INTEGER NOT NULL,
    kind TEXT, model TEXT, folder TEXT, source TEXT, n_tokens INTEGER DEFAULT 0,
    complete INTEGER DEFAULT 0, alive INTEGER DEFAULT 0, fingerprint TEXT, settings TEXT);
CREATE TABLE IF NOT EXISTS features(
    dictionary TEXT NOT NULL, latent INTEGER NOT NULL, frequency REAL, n_fired INTEGER,
    max_activation REAL, mean_activation REAL, top_token TEXT, top_logit TEXT,
    hist_first INTEGER, hist_counts TEXT, neighbours TEXT,
    PRIMARY KEY (dictionary, latent)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS examples(
    dictionary TEXT NOT NULL, latent INTEGER NOT NULL, kind TEXT NOT NULL, bucket INTEGER NOT NULL,
    rank INTEGER NOT NULL, context INTEGER, position INTEGER, start INTEGER, max_index INTEGER,
    max_activation REAL, max_token_id INTEGER, token_ids BLOB, activations BLOB,
    PRIMARY KEY (dictionary, latent, kind, bucket, rank)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS examples_token ON examples(max_token_id);
CREATE TABLE IF NOT EXISTS logits(
    dictionary TEXT NOT NULL, latent INTEGER NOT NULL, sign INTEGER NOT NULL, rank INTEGER NOT NULL,
    token_id INTEGER, value REAL, PRIMARY KEY (dictionary, latent, sign, rank)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS logits_token ON logits(token_id);
CREATE TABLE IF NOT EXISTS vocab(
    model TEXT NOT NULL, token_id INTEGER NOT NULL, token TEXT, key TEXT,
    PRIMARY KEY (model, token_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS vocab_key ON vocab(key);
CREATE TABLE IF NOT EXISTS progress(
    dictionary TEXT PRIMARY KEY, fingerprint TEXT, batches_done INTEGER, tokens_done INTEGER, state BLOB);
CREATE TABLE IF NOT EXISTS role_stats(
    dictionary TEXT NOT NULL, latent INTEGER NOT NULL, role TEXT NOT NULL, n_tokens INTEGER,
    n_fired INTEGER, frequency REAL, mean_activation REAL, frequency_elsewhere REAL, specificity REAL,
    PRIMARY KEY (dictionary, latent, role)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS role_stats_rank ON role_stats(dictionary, role, specificity);
CREATE TABLE IF NOT EXISTS latent_extras(
    dictionary TEXT NOT NULL, latent INTEGER NOT NULL, logits_lo REAL, logits_hi REAL, logits_counts TEXT,
    neurons TEXT, correlates TEXT, heads TEXT, PRIMARY KEY (dictionary, latent)) WITHOUT ROWID;
"""


def token_key(token: str) -> str:
    """How tokens are matched in searches: case-insensitive, surrounding whitespace ignored."""
    return token.strip().lower()


def _check_ours(conn: sqlite3.Connection, path: Path) -> None:
    """Raise (closing conn) unless the database is an openscope feature index: a file that is not
    SQLite, or another program's SQLite database, is never written into."""
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        conn.execute("SELECT 1 FROM dictionaries LIMIT 1")
    except sqlite3.DatabaseError as exc:
        row, reason = None, str(exc)
    else:
        reason = "it records no openscope schema version"
    if row is None:
        conn.close()
        raise OpenscopeError(f"{path} is not an openscope feature database ({reason})")


def connect(path: str | Path, *, read_only: bool = False) -> sqlite3.Connection:
    """Open (and for writing, create) a feature database. An existing file is opened only if it is
    one openscope wrote."""
    path = Path(path)
    if path.is_dir():
        raise OpenscopeError(f"{path} is a folder, not a feature database file")
    if read_only:
        if not path.is_file():
            raise OpenscopeError(f"no feature database at {path}; build one with `openscope features`")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        _check_ours(conn, path)
        return conn
    existed = path.exists() and path.stat().st_size > 0
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(path, check_same_thread=False)
    except sqlite3.Error as exc:
        raise OpenscopeError(f"cannot open the feature database {path} ({exc})") from None
    if existed:
        _check_ours(conn, path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")  # readers (the web app) keep reading while we write
        conn.executescript(DDL)
        conn.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )
        conn.commit()
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise OpenscopeError(f"{path} is not an openscope feature database ({exc})") from None
    return conn


# ---- blobs ----------------------------------------------------------------------------------------


def ints_blob(values: Sequence[int] | np.ndarray) -> bytes:
    return np.asarray(values, dtype="<i4").tobytes()


def floats_blob(values: Sequence[float] | np.ndarray) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def blob_ints(blob: bytes) -> list[int]:
    return np.frombuffer(blob, dtype="<i4").tolist()


def blob_floats(blob: bytes) -> list[float]:
    return np.frombuffer(blob, dtype="<f4").astype(np.float64).tolist()


# ---- writing (used by build) ----------------------------------------------------------------------


class FeatureRow(NamedTuple):
    """The per-latent scalars of one feature (one row of `features`)."""

    latent: int
    """Latent index."""
    frequency: float
    """Fraction of encoded tokens where it fired."""
    n_fired: int
    """Tokens where it fired."""
    max_activation: float
    """Largest activation."""
    mean_activation: float
    """Mean activation over firing tokens."""
    top_token: str
    """Text of the top example's max token."""
    top_logit: str
    """Text of the token with the largest logit effect."""
    hist_first: int
    """Index of the first stored histogram bin (leading empty bins are dropped)."""
    hist_counts: list[int]
    """Counts from bin hist_first on (trailing empty bins dropped)."""
    neighbours: list[tuple[int, float]]
    """(latent, cosine), highest first."""


class ExampleRow(NamedTuple):
    """One stored example (one row of `examples`)."""

    latent: int
    """Latent index."""
    kind: str
    """'top' or 'quantile'."""
    bucket: int
    """Quantile bucket (0 for top examples)."""
    rank: int
    """Order within (kind, bucket), 0 = highest activation."""
    context: int
    """Context id."""
    position: int
    """Position of the max token in the context."""
    start: int
    """Context position of the window's first token."""
    max_index: int
    """Index of the max token within the window."""
    max_activation: float
    """Activation at the max token."""
    max_token_id: int
    """Token id at the max token."""
    token_ids: np.ndarray
    """Window token ids."""
    activations: np.ndarray
    """Window activations."""


class RoleStatRow(NamedTuple):
    """One latent in one chat role (one row of `role_stats`)."""

    latent: int
    """Latent index."""
    role: str
    """Role name."""
    n_tokens: int
    """Tokens of the role."""
    n_fired: int
    """Of those, tokens where the latent fired."""
    frequency: float
    """n_fired / n_tokens."""
    mean_activation: float
    """Mean activation over those firings."""
    frequency_elsewhere: float
    """Firing frequency on the other roles' tokens."""
    specificity: float
    """frequency / (frequency + frequency_elsewhere)."""


class ExtraRow(NamedTuple):
    """What SAEDashboard's dashboards add for one latent (one row of `latent_extras`)."""

    latent: int
    """Latent index."""
    logit_hist: tuple[float, float, list[int]] | None
    """(lo, hi, counts) of its logit effects over the vocabulary; None if it has none."""
    neurons: list[tuple[int, float, float]]
    """Correlated input coordinates: (coordinate, pearson, cosine), highest pearson first."""
    correlates: list[tuple[int, float, float]]
    """Correlated latents: (latent, pearson, cosine), highest pearson first."""
    heads: list[float]
    """attn_out dictionaries: each head's share of the decoder direction's norm ([] otherwise)."""


def mark_pending(conn: sqlite3.Connection, info: DictionaryInfo) -> None:
    """List a dictionary whose dashboards are being computed (complete = 0), unless it already has
    complete ones: those stay visible until `write_results` replaces them."""
    with conn:
        conn.execute(
            "INSERT OR IGNORE INTO dictionaries(name, site, site_out, width, kind, model, folder, source, "
            "n_tokens, complete, alive) VALUES (?,?,?,?,?,?,?,?,0,0,0)",
            (
                info.name,
                info.site,
                info.site_out,
                info.width,
                info.kind,
                info.model,
                info.folder,
                info.source,
            ),
        )


def write_results(
    conn: sqlite3.Connection,
    info: DictionaryInfo,
    fingerprint: str,
    settings: dict[str, Any],
    features: Iterable[FeatureRow],
    examples: Iterable[ExampleRow],
    logits: Iterable[tuple[int, int, int, int, float]],
    vocab: dict[int, str],
    role_stats: Iterable[RoleStatRow] = (),
    extras: Iterable[ExtraRow] = (),
) -> None:
    """Replace one dictionary's dashboards in one transaction and drop its progress checkpoint.

    logits rows: (latent, sign, rank, token_id, value). vocab: every token id the rows mention.
    role_stats: per (latent, role) rows, chat data only. extras: per latent, what the Neuronpedia export adds.
    """
    name = info.name
    with conn:  # one transaction: commit on success, roll back on any error
        for table in ("features", "examples", "logits", "role_stats", "latent_extras"):
            conn.execute(f"DELETE FROM {table} WHERE dictionary = ?", (name,))
        conn.execute(
            "INSERT OR REPLACE INTO dictionaries(name, site, site_out, width, kind, model, folder, source, "
            "n_tokens, complete, alive, fingerprint, settings) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                name,
                info.site,
                info.site_out,
                info.width,
                info.kind,
                info.model,
                info.folder,
                info.source,
                info.n_tokens,
                1,
                info.alive,
                fingerprint,
                json.dumps(settings),
            ),
        )
        conn.executemany(
            "INSERT INTO features VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                (
                    name,
                    f.latent,
                    f.frequency,
                    f.n_fired,
                    f.max_activation,
                    f.mean_activation,
                    f.top_token,
                    f.top_logit,
                    f.hist_first,
                    json.dumps(f.hist_counts),
                    json.dumps([[a, round(c, 6)] for a, c in f.neighbours]),
                )
                for f in features
            ),
        )
        conn.executemany(
            "INSERT INTO examples VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                (
                    name,
                    e.latent,
                    e.kind,
                    e.bucket,
                    e.rank,
                    e.context,
                    e.position,
                    e.start,
                    e.max_index,
                    e.max_activation,
                    e.max_token_id,
                    ints_blob(e.token_ids),
                    floats_blob(e.activations),
                )
                for e in examples
            ),
        )
        conn.executemany("INSERT INTO logits VALUES (?,?,?,?,?,?)", ((name, *row) for row in logits))
        conn.executemany(
            "INSERT INTO role_stats VALUES (?,?,?,?,?,?,?,?,?)", ((name, *row) for row in role_stats)
        )
        conn.executemany(
            "INSERT INTO latent_extras VALUES (?,?,?,?,?,?,?,?)", (_extra(name, e) for e in extras)
        )
        conn.executemany(
            "INSERT OR IGNORE INTO vocab VALUES (?,?,?,?)",
            ((info.model, i, t, token_key(t)) for i, t in vocab.items()),
        )
        conn.execute("DELETE FROM progress WHERE dictionary = ?", (name,))


def _extra(dictionary: str, e: ExtraRow) -> tuple[Any, ...]:
    lo, hi, counts = e.logit_hist if e.logit_hist is not None else (None, None, None)

    def table(rows: list[tuple[int, float, float]]) -> str:
        return json.dumps([[i, round(p, 6), round(c, 6)] for i, p, c in rows])

    heads = json.dumps([round(h, 6) for h in e.heads])
    counts_json = json.dumps(counts) if counts is not None else None
    return (dictionary, e.latent, lo, hi, counts_json, table(e.neurons), table(e.correlates), heads)
