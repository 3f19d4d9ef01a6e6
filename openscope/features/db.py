"""Read access to the feature index (`FeatureDB`): what the explorer web app and `--export` use.

Every method returns the pydantic models of `openscope.features.schema`; the tables are described in
`openscope.features.index`, which creates and writes them.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from openscope.data.chat import ROLES
from openscope.errors import OpenscopeError
from openscope.features.index import DEFAULT_DB, blob_floats, blob_ints, connect, token_key
from openscope.features.schema import (
    Correlate,
    DictionaryInfo,
    Example,
    FeatureDetail,
    FeatureSummary,
    Histogram,
    LatentExtras,
    LogitHistogram,
    Neighbour,
    QuantileGroup,
    RoleStat,
    RoleTokens,
    TokenValue,
)

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
        self._has_extras = "latent_extras" in tables  # and those from before the Neuronpedia extras

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

    def extras(self, dictionary: str, latent: int) -> LatentExtras:
        """What SAEDashboard's dashboards add for one latent (logit histogram, correlated neurons and
        features, per-head decoder weights); empty where not computed (older databases)."""
        self.dictionary(dictionary)
        if not self._has_extras:
            return LatentExtras()
        rows = self._rows(
            "SELECT * FROM latent_extras WHERE dictionary = ? AND latent = ?", (dictionary, latent)
        )
        if not rows:
            return LatentExtras()
        r = rows[0]
        hist = None
        if r["logits_counts"] is not None:
            hist = LogitHistogram(lo=r["logits_lo"], hi=r["logits_hi"], counts=json.loads(r["logits_counts"]))

        def table(text: str | None) -> list[Correlate]:
            return [Correlate(index=i, pearson=p, cosine=c) for i, p, c in json.loads(text or "[]")]

        return LatentExtras(
            logit_histogram=hist,
            correlated_neurons=table(r["neurons"]),
            correlated_features=table(r["correlates"]),
            head_distribution=json.loads(r["heads"] or "[]"),
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
