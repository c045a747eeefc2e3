"""`taoflow serve`: the gateway and its model backend in one process (uvicorn)."""

from __future__ import annotations

import logging
import socket

from serving.auth import check_exposure
from serving.backends import build_backend
from serving.exceptions import ServingError
from serving.gateway import Gateway, build_app
from taoflow.settings import Settings

log = logging.getLogger(__name__)


def run_server(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn handles both and drains in-flight requests)."""
    import uvicorn

    cfg = settings.serve
    check_exposure(cfg)  # placeholder keys, or no keys on a reachable address: refuse before loading anything
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((cfg.host, cfg.port))
        except OSError as exc:
            msg = f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}; set TAOFLOW_SERVE_PORT"
            raise ServingError(msg) from None
    gateway = Gateway(settings, build_backend(settings))
    app = build_app(gateway)
    log.info("gateway on http://%s:%d/v1 (model %r, backend %s)", cfg.host, cfg.port, cfg.model_name, cfg.backend)
    uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)).run()
