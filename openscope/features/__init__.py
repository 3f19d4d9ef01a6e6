"""Feature dashboards: compute per-latent statistics and examples into a SQLite index, read them back.

`schema` is the contract (pydantic models shared with the web app and exported JSON), `db` the index
and its read API (`FeatureDB`), `compute` the streaming computation behind `openscope features`.
"""
