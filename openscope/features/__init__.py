"""Feature dashboards: compute per-latent statistics and examples into a SQLite index, read them back.

`schema` is the contract (pydantic models shared with the web app and exported JSON); `index` the
database's tables and writes, `db` its read API (`FeatureDB`); `build` the streaming computation behind
`openscope features` (`config` its settings), made of `streaming` (per-latent statistics), `examples`,
`directions` (logit effects, neighbours) and `roles` (chat-role statistics); `export` the JSON files.
"""

from openscope.features.build import FeaturesResult, compute_features
from openscope.features.config import FeaturesConfig
from openscope.features.db import FeatureDB
from openscope.features.export import export_features

__all__ = ["FeatureDB", "FeaturesConfig", "FeaturesResult", "compute_features", "export_features"]
