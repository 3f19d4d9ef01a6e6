"""Run the explorer with uvicorn (what `openscope serve` calls)."""

from __future__ import annotations

import logging

from openscope.serve.app import create_app
from openscope.serve.config import ServeConfig

log = logging.getLogger(__name__)


def serve(config: ServeConfig) -> None:
    """Load everything, then answer requests until interrupted."""
    import uvicorn  # the web server loads only when serving

    app = create_app(config)
    log.info("explorer at http://%s:%d/ (API docs at /docs)", config.host, config.port)
    # One worker process: the model lives in this process; requests share it under a lock.
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
