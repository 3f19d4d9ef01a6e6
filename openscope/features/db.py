"""The feature index on disk: an embedded SQLite database (stdlib `sqlite3`), and its read API.

`openscope features` writes it (`openscope.features.compute`); the explorer web app and
`--export` read it through `FeatureDB`, whose methods return the pydantic models of
`openscope.features.schema`.

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
             chat data only (openscope.analysis.roles); absent from databases made before it existed

Indexes: examples(max_token_id) for search by token, logits(token_id) for search by logit,
vocab(key) to turn a word into token ids.

Writes of one dictionary's results happen in one transaction (`write_results`), so a reader sees
either the old complete dashboards or the new ones, never half.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from openscope.data.chat import ROLES
from openscope.errors import OpenscopeError
from openscope.features.schema import (
    SCHEMA_VERSION,
    DictionaryInfo,
    Example,
    FeatureDetail,
    FeatureSummary,
    Histogram,
    Neighbour,
    QuantileGroup,
    RoleStat,
    RoleTokens,
    TokenValue,
)

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


# ---- writing (used by compute) --------------------------------------------------------------------


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
) -> None:
    """Replace one dictionary's dashboards in one transaction and drop its progress checkpoint.

    logits rows: (latent, sign, rank, token_id, value). vocab: every token id the rows mention.
    role_stats: per (latent, role) rows, chat data only.
    """
    name = info.name
    with conn:  # one transaction: commit on success, roll back on any error
        for table in ("features", "examples", "logits", "role_stats"):
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
            "INSERT OR IGNORE INTO vocab VALUES (?,?,?,?)",
            ((info.model, i, t, token_key(t)) for i, t in vocab.items()),
        )
        conn.execute("DELETE FROM progress WHERE dictionary = ?", (name,))


# ---- reading --------------------------------------------------------------------------------------

_ORDERS = {
    "latent": "latent",
    "frequency": "frequency DESC",
    "max_activation": "max_activation DESC",
    "mean_activation": "mean_activation DESC",
}


class FeatureDB:
    """Read access to a feature database; every method returns `openscope.features.schema` models.

    Safe to share between threads (one connection behind a lock; SQLite reads are fast). Opened
    read-only: the web app can never change the index.
    """

    def __init__(self, path: str | Path = DEFAULT_DB) -> None:
        self.path = Path(path)
        self._conn = connect(self.path, read_only=True)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        self._has_roles = "role_stats" in tables  # databases from before role statistics lack it

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> FeatureDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # -- dictionaries

    def dictionaries(self) -> list[DictionaryInfo]:
        """Every dictionary in the index (complete or still being computed), by name."""
        return [_info(r) for r in self._rows("SELECT * FROM dictionaries ORDER BY name")]

    def dictionary(self, name: str) -> DictionaryInfo:
        """One dictionary; OpenscopeError if the index has none by that name."""
        rows = self._rows("SELECT * FROM dictionaries WHERE name = ?", (name,))
        if not rows:
            known = ", ".join(d.name for d in self.dictionaries()) or "none"
            raise OpenscopeError(f"no dictionary {name!r} in {self.path} (it has: {known})")
        return _info(rows[0])

    def _model(self, name: str) -> str:
        return self.dictionary(name).model

    # -- features

    def features(
        self, dictionary: str, offset: int = 0, limit: int = 100, order: str = "latent"
    ) -> list[FeatureSummary]:
        """A page of a dictionary's features, ordered by latent, frequency, max_activation or
        mean_activation (the last three descending)."""
        self.dictionary(dictionary)
        if order not in _ORDERS:
            raise OpenscopeError(f"unknown order {order!r}; choose one of {', '.join(_ORDERS)}")
        rows = self._rows(
            f"SELECT * FROM features WHERE dictionary = ? ORDER BY {_ORDERS[order]} LIMIT ? OFFSET ?",
            (dictionary, int(limit), int(offset)),
        )
        return [_summary(r) for r in rows]

    def feature(self, dictionary: str, latent: int) -> FeatureDetail:
        """Everything about one latent (the dashboard; also the exported JSON)."""
        info = self.dictionary(dictionary)
        if not 0 <= latent < info.width:
            raise OpenscopeError(
                f"latent {latent} is out of range for {dictionary} (width {info.width}: 0..{info.width - 1})"
            )
        rows = self._rows("SELECT * FROM features WHERE dictionary = ? AND latent = ?", (dictionary, latent))
        if not rows:
            raise OpenscopeError(f"dictionary {dictionary} has no dashboards yet; run `openscope features`")
        row = rows[0]
        settings = self._settings(dictionary)
        edges: list[float] = settings.get("hist_edges", [])
        counts = json.loads(row["hist_counts"] or "[]")
        first = int(row["hist_first"] or 0)
        examples = self._rows(
            "SELECT * FROM examples WHERE dictionary = ? AND latent = ? ORDER BY kind, bucket, rank",
            (dictionary, latent),
        )
        logit_rows = self._rows(
            "SELECT l.sign, l.token_id, l.value, v.token FROM logits l LEFT JOIN vocab v "
            "ON v.model = ? AND v.token_id = l.token_id WHERE l.dictionary = ? AND l.latent = ? "
            "ORDER BY l.sign DESC, l.rank",
            (info.model, dictionary, latent),
        )
        ids = {i for e in examples for i in blob_ints(e["token_ids"])}
        pieces = self._pieces(info.model, ids)
        top = [_example(e, pieces) for e in examples if e["kind"] == "top"]
        groups: dict[int, list[Example]] = {}
        for e in examples:
            if e["kind"] == "quantile":
                groups.setdefault(int(e["bucket"]), []).append(_example(e, pieces))
        n_groups = int(settings.get("quantile_buckets", len(groups)) or len(groups))
        quantiles = [_group(b, exs, n_groups) for b, exs in sorted(groups.items())]
        logits = [
            (int(r["sign"]), TokenValue(token=r["token"] or "", token_id=r["token_id"], value=r["value"]))
            for r in logit_rows
        ]
        return FeatureDetail(
            **_summary(row).model_dump(),
            model=info.model,
            site=info.site,
            site_out=info.site_out,
            n_tokens=info.n_tokens,
            n_fired=int(row["n_fired"]),
            histogram=Histogram(edges=edges[first : first + len(counts) + 1], counts=counts),
            top_examples=top,
            quantiles=quantiles,
            top_logits=[t for s, t in logits if s > 0],
            bottom_logits=[t for s, t in logits if s < 0],
            neighbours=[Neighbour(latent=a, cosine=c) for a, c in json.loads(row["neighbours"] or "[]")],
            roles=self._role_stats(dictionary, latent),
        )

    # -- chat roles

    def _role_stats(self, dictionary: str, latent: int) -> list[RoleStat]:
        if not self._has_roles:
            return []
        rows = self._rows(
            "SELECT * FROM role_stats WHERE dictionary = ? AND latent = ?", (dictionary, latent)
        )
        order = {name: i for i, name in enumerate(ROLES)}
        stats = [RoleStat(**{k: r[k] for k in RoleStat.model_fields}) for r in rows]
        return sorted(stats, key=lambda s: order.get(s.role, len(order)))

    def roles(self, dictionary: str) -> list[RoleTokens]:
        """The chat roles of a dictionary's indexed tokens and their counts ([] for plain text)."""
        self.dictionary(dictionary)
        if not self._has_roles:
            return []
        rows = self._rows(
            "SELECT role, MAX(n_tokens) AS n FROM role_stats WHERE dictionary = ? GROUP BY role",
            (dictionary,),
        )
        order = {name: i for i, name in enumerate(ROLES)}
        out = [RoleTokens(role=r["role"], n_tokens=int(r["n"])) for r in rows]
        return sorted(out, key=lambda t: order.get(t.role, len(order)))

    def role_specific(
        self, dictionary: str, role: str, limit: int = 20, min_fired: int = 5
    ) -> list[FeatureSummary]:
        """The latents most specific to a chat role (score: specificity), among those that fired at least
        min_fired times in it; more firings first among equals."""
        known = [t.role for t in self.roles(dictionary)]
        if role not in known:
            have = ", ".join(known) or "none (not indexed on chat data)"
            raise OpenscopeError(f"dictionary {dictionary} has no role {role!r}; its roles: {have}")
        rows = self._rows(
            "SELECT f.*, r.specificity AS score FROM role_stats r JOIN features f "
            "ON f.dictionary = r.dictionary AND f.latent = r.latent "
            "WHERE r.dictionary = ? AND r.role = ? AND r.n_fired >= ? "
            "ORDER BY r.specificity DESC, r.n_fired DESC, r.latent LIMIT ?",
            (dictionary, role, max(int(min_fired), 1), int(limit)),
        )
        return [_summary(r).model_copy(update={"score": float(r["score"])}) for r in rows]

    # -- search

    def token_ids(self, token: str, dictionary: str | None = None) -> list[int]:
        """Vocabulary ids whose text matches `token` (case-insensitive, whitespace ignored)."""
        models = [self._model(dictionary)] if dictionary else None
        sql = "SELECT DISTINCT token_id FROM vocab WHERE key = ?"
        args: list[Any] = [token_key(token)]
        if models:
            sql += " AND model = ?"
            args += models
        return [int(r[0]) for r in self._rows(sql, args)]

    def search_by_token(
        self, token: str, dictionary: str | None = None, limit: int = 20
    ) -> list[FeatureSummary]:
        """Latents whose top examples peak on `token`, strongest first (score = that activation)."""
        return self._search(
            "SELECT e.dictionary, e.latent, MAX(e.max_activation) AS score FROM examples e "
            "JOIN dictionaries d ON d.name = e.dictionary JOIN vocab v ON v.model = d.model "
            "AND v.token_id = e.max_token_id WHERE v.key = ? AND e.kind = 'top'",
            token,
            dictionary,
            limit,
            "e",
        )

    def search_by_logit(
        self, word: str, dictionary: str | None = None, limit: int = 20
    ) -> list[FeatureSummary]:
        """Latents whose decoder direction promotes `word` among their top logits, largest effect first."""
        return self._search(
            "SELECT l.dictionary, l.latent, MAX(l.value) AS score FROM logits l "
            "JOIN dictionaries d ON d.name = l.dictionary JOIN vocab v ON v.model = d.model "
            "AND v.token_id = l.token_id WHERE v.key = ? AND l.sign = 1",
            word,
            dictionary,
            limit,
            "l",
        )

    def _search(
        self, sql: str, word: str, dictionary: str | None, limit: int, alias: str
    ) -> list[FeatureSummary]:
        args: list[Any] = [token_key(word)]
        if dictionary is not None:
            self.dictionary(dictionary)
            sql += f" AND {alias}.dictionary = ?"
            args.append(dictionary)
        sql += f" GROUP BY {alias}.dictionary, {alias}.latent ORDER BY score DESC LIMIT ?"
        args.append(int(limit))
        out = []
        for hit in self._rows(sql, args):
            rows = self._rows(
                "SELECT * FROM features WHERE dictionary = ? AND latent = ?",
                (hit["dictionary"], hit["latent"]),
            )
            if rows:
                out.append(_summary(rows[0]).model_copy(update={"score": float(hit["score"])}))
        return out

    # -- helpers

    def _settings(self, dictionary: str) -> dict[str, Any]:
        rows = self._rows("SELECT settings FROM dictionaries WHERE name = ?", (dictionary,))
        return json.loads(rows[0]["settings"] or "{}") if rows else {}

    def _pieces(self, model: str, ids: Iterable[int]) -> dict[int, str]:
        ids = sorted(set(ids))
        out: dict[int, str] = {}
        for i in range(0, len(ids), 500):  # SQLite limits the number of bound parameters
            chunk = ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            for r in self._rows(
                f"SELECT token_id, token FROM vocab WHERE model = ? AND token_id IN ({marks})",
                [model, *chunk],
            ):
                out[int(r["token_id"])] = r["token"]
        return out


def _info(r: sqlite3.Row) -> DictionaryInfo:
    return DictionaryInfo(
        name=r["name"],
        site=r["site"],
        site_out=r["site_out"],
        width=int(r["width"]),
        kind=r["kind"] or "sae",
        model=r["model"] or "",
        folder=r["folder"] or "",
        source=r["source"] or "",
        n_tokens=int(r["n_tokens"] or 0),
        complete=bool(r["complete"]),
        alive=int(r["alive"] or 0),
    )


def _summary(r: sqlite3.Row) -> FeatureSummary:
    return FeatureSummary(
        dictionary=r["dictionary"],
        latent=int(r["latent"]),
        frequency=float(r["frequency"]),
        max_activation=float(r["max_activation"]),
        mean_activation=float(r["mean_activation"]),
        top_token=r["top_token"] or "",
        top_logit=r["top_logit"] or "",
    )


def _example(r: sqlite3.Row, pieces: dict[int, str]) -> Example:
    ids = blob_ints(r["token_ids"])
    return Example(
        tokens=[pieces.get(i, "") for i in ids],
        token_ids=ids,
        activations=blob_floats(r["activations"]),
        max_activation=float(r["max_activation"]),
        max_index=int(r["max_index"]),
        context=int(r["context"]),
        position=int(r["position"]),
        start=int(r["start"]),
    )


def _group(bucket: int, examples: list[Example], n_groups: int) -> QuantileGroup:
    low = min(e.max_activation for e in examples)
    high = max(e.max_activation for e in examples)
    return QuantileGroup(
        index=bucket,
        low=low,
        high=high,
        label=f"quantile {bucket + 1}/{n_groups} ({low:.3g} - {high:.3g})",
        examples=examples,
    )
