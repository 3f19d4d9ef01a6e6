"""Autointerp's tables in the feature database: explanations and scores, their full-text index, and the
cache of answers.

They live beside the dashboards they explain, in the same SQLite file, opened through
`openscope.features.index.connect` (so only an openscope feature database is ever written into):

    autointerp(dictionary, latent, status, explanation, reason, detection, fuzzing, n_detection,
               n_fuzzing, explainer, scorer, setup, calls, seconds)   PRIMARY KEY (dictionary, latent)
               status 'explained', 'unexplained' or 'unscored' (reason says why: endpoint down, garbage)
    autointerp_fts(explanation, dictionary UNINDEXED, latent UNINDEXED)   FTS5 over the explanations
    autointerp_cache(key PRIMARY KEY, backend, answer)   every answer, keyed by model + prompt

Each latent's row and its search entry are written in one transaction; the cache entry of each answer is
committed as soon as it arrives, so an interrupted run loses no call it paid for. Databases built before
autointerp lack the tables; readers then see no explanations.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import NamedTuple

from openscope.errors import OpenscopeError
from openscope.features.index import connect

DDL = """
CREATE TABLE IF NOT EXISTS autointerp(
    dictionary TEXT NOT NULL, latent INTEGER NOT NULL, status TEXT NOT NULL, explanation TEXT,
    reason TEXT, detection REAL, fuzzing REAL, n_detection INTEGER, n_fuzzing INTEGER,
    explainer TEXT, scorer TEXT, setup TEXT, calls INTEGER, seconds REAL,
    PRIMARY KEY (dictionary, latent)) WITHOUT ROWID;
CREATE VIRTUAL TABLE IF NOT EXISTS autointerp_fts USING fts5(
    explanation, dictionary UNINDEXED, latent UNINDEXED);
CREATE TABLE IF NOT EXISTS autointerp_cache(key TEXT PRIMARY KEY, backend TEXT, answer TEXT) WITHOUT ROWID;
"""


class Explanation(NamedTuple):
    """One latent's autointerp result (one row of `autointerp`)."""

    dictionary: str
    """The dictionary's name in the database."""
    latent: int
    """Latent index."""
    status: str
    """'explained'; 'unexplained' (no explanation) or 'unscored' (the scorer failed): `reason` says why."""
    explanation: str
    """The explainer's one line ('' when unexplained)."""
    reason: str
    """Why it is unexplained, or what went wrong while scoring ('' when all went well)."""
    detection: float | None
    """Detection score (balanced accuracy, 0.5 = chance), None when not scored."""
    fuzzing: float | None
    """Fuzzing score (balanced accuracy over tokens, 0.5 = chance), None when not scored."""
    n_detection: int
    """Texts the detection score averages."""
    n_fuzzing: int
    """Tokens the fuzzing score averages."""
    explainer: str
    """The explainer model's name."""
    scorer: str
    """The scorer model's name."""
    setup: str
    """Fingerprint of the models and settings that produced it."""
    calls: int
    """Calls made for it (cached answers not counted)."""
    seconds: float
    """Wall time spent on it."""


def has_tables(conn: sqlite3.Connection) -> bool:
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
    return "autointerp" in names


class AutointerpStore:
    """The write side: results and cache of one run (thread-safe: one connection behind a lock)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._conn = connect(self.path)
        try:
            self._conn.executescript(DDL)
        except sqlite3.Error as exc:
            self._conn.close()
            raise OpenscopeError(f"cannot add autointerp tables to {self.path} ({exc})") from None
        self._lock = threading.Lock()

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> AutointerpStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- cache (the Cache protocol of openscope.interp.backends)

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT answer FROM autointerp_cache WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def put(self, key: str, backend: str, text: str) -> None:
        with self._lock, self._conn:
            self._conn.execute("INSERT OR REPLACE INTO autointerp_cache VALUES (?,?,?)", (key, backend, text))

    # -- results

    def setups(self, dictionary: str) -> set[str]:
        """The setups whose results the database holds for a dictionary."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT DISTINCT setup FROM autointerp WHERE dictionary = ?", (dictionary,)
            ).fetchall()
        return {str(r[0]) for r in rows}

    def clear(self, dictionary: str) -> None:
        """Drop every result of a dictionary (--overwrite with another setup)."""
        with self._lock, self._conn:
            self._conn.execute("DELETE FROM autointerp WHERE dictionary = ?", (dictionary,))
            self._conn.execute("DELETE FROM autointerp_fts WHERE dictionary = ?", (dictionary,))

    def write(self, result: Explanation) -> None:
        """Replace one latent's result and its search entry in one transaction."""
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO autointerp VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", tuple(result)
            )
            self._conn.execute(
                "DELETE FROM autointerp_fts WHERE dictionary = ? AND latent = ?",
                (result.dictionary, result.latent),
            )
            if result.explanation:
                self._conn.execute(
                    "INSERT INTO autointerp_fts VALUES (?,?,?)",
                    (result.explanation, result.dictionary, result.latent),
                )


# ---- the read side (the explorer) --------------------------------------------------------------------


def _read(path: Path) -> sqlite3.Connection | None:
    conn = connect(path, read_only=True)
    if not has_tables(conn):
        conn.close()
        return None
    return conn


def _row(r: tuple) -> Explanation:
    return Explanation(*r)


def read_explanation(path: Path, dictionary: str, latent: int) -> Explanation | None:
    """One latent's result, or None when it has none (or the database has no autointerp tables)."""
    conn = _read(path)
    if conn is None:
        return None
    try:
        row = conn.execute(
            "SELECT * FROM autointerp WHERE dictionary = ? AND latent = ?", (dictionary, latent)
        ).fetchone()
    finally:
        conn.close()
    return None if row is None else _row(row)


def read_explanations(path: Path, dictionary: str) -> list[Explanation]:
    """Every result of a dictionary, by latent."""
    conn = _read(path)
    if conn is None:
        return []
    try:
        rows = conn.execute(
            "SELECT * FROM autointerp WHERE dictionary = ? ORDER BY latent", (dictionary,)
        ).fetchall()
    finally:
        conn.close()
    return [_row(r) for r in rows]


def fts_query(text: str) -> str:
    """A safe FTS5 query: every word of the text must appear (each word quoted, so no operator leaks
    through); the last word matches as a prefix."""
    words = ["".join(c for c in w if c.isalnum()) for w in text.split()]
    words = [w for w in words if w]
    if not words:
        raise OpenscopeError("search for at least one word")
    return " ".join(f'"{w}"' for w in words[:-1]) + (" " if len(words) > 1 else "") + f'"{words[-1]}"*'


def search_explanations(
    path: Path, text: str, dictionary: str | None = None, limit: int = 20
) -> list[Explanation]:
    """Results whose explanation matches every word of `text` (SQLite full-text search), best first."""
    query = fts_query(text)
    conn = _read(path)
    if conn is None:
        return []
    sql = (
        "SELECT a.* FROM autointerp_fts f JOIN autointerp a ON a.dictionary = f.dictionary "
        "AND a.latent = f.latent WHERE autointerp_fts MATCH ?"
    )
    args: list[object] = [query]
    if dictionary is not None:
        sql += " AND f.dictionary = ?"
        args.append(dictionary)
    sql += " ORDER BY rank LIMIT ?"
    args.append(int(limit))
    try:
        rows = conn.execute(sql, args).fetchall()
    finally:
        conn.close()
    return [_row(r) for r in rows]
