"""`openscope serve`: a local feature explorer (a small Neuronpedia) for the dictionaries of one model.

`openscope.serve.app.create_app` builds the FastAPI app (JSON API at `/api/...`, documented at
`/docs`; static front end at `/`); `ServeConfig` holds its settings; `openscope.serve.run.serve` runs
it with uvicorn. Only the config is imported here, so the CLI starts without loading FastAPI.
"""

from openscope.serve.config import ServeConfig

__all__ = ["ServeConfig"]
