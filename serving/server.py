"""`taoflow serve`: the gateway and its model backend in one process (uvicorn)."""

from __future__ import annotations

import logging
import socket
import sys

from serving.auth import check_exposure
from serving.backends import build_backend
from serving.exceptions import ServingError
from serving.gateway import Gateway, build_app
from taoflow.settings import Settings

log = logging.getLogger(__name__)


# The gateway's event loop shares the interpreter with the capture threads (the SDK Emitter and its Kafka
# producer). CPython hands the GIL over every 5 ms by default, so a request waiting for it behind a capture thread
# could wait that long; 0.5 ms keeps the loop's wait short (measured by `bench/gateway.py --upstream`).
SWITCH_INTERVAL_S = 0.0005


def tune_interpreter() -> None:
    """The gateway process's interpreter settings (its own process: `taoflow serve`)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)


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
    tune_interpreter()
    gateway = Gateway(settings, build_backend(settings))
    app = build_app(gateway)
    log.info("gateway on http://%s:%d/v1 (model %r, backend %s)", cfg.host, cfg.port, cfg.model_name, cfg.backend)
    uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)).run()
