"""Serve a Flask app factory with gunicorn: one worker process (it owns the model), many threads."""

import logging
import os
import signal
import threading

from gunicorn.app.base import BaseApplication

log = logging.getLogger(__name__)

# Gunicorn's arbiter halts with this code when a worker exits with it ("failed to boot").
WORKER_BOOT_ERROR = 3


def exit_gunicorn(code: int = 0) -> None:
    """From the worker: end the whole server, exit code 0 (shutdown) or non-zero (fatal error)."""
    if code == 0:
        # The arbiter stops the worker gracefully on SIGTERM and exits 0.
        threading.Timer(0.2, os.kill, (os.getppid(), signal.SIGTERM)).start()
    else:
        # A worker exiting with this code makes the arbiter halt with the same code, not respawn it.
        # The delay lets the threads answering requests send their 503s (and probes see 503) first.
        threading.Timer(2.0, _halt).start()


def _halt() -> None:
    logging.shutdown()
    os._exit(WORKER_BOOT_ERROR)


class _Gunicorn(BaseApplication):
    def __init__(self, app_factory, options: dict):
        self.app_factory = app_factory
        self.options = options
        super().__init__()

    def load_config(self):
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        # Runs in the worker process: the model is loaded there, after the fork.
        return self.app_factory()


def _halt_on_worker_death(arbiter, worker) -> None:
    # gunicorn's child_exit hook, in the arbiter. While it still listens it is not shutting down,
    # so the worker died on its own: with several ranks a new worker could never rejoin the job.
    if arbiter.LISTENERS:
        arbiter.log.error("the worker process died; exiting so that the whole job restarts")
        os._exit(1)


def serve(app_factory, host: str, port: int, threads: int, respawn: bool = True) -> None:
    """Run gunicorn in this process until shutdown; `app_factory()` is called in the worker.

    respawn: replace a worker that dies (one rank), or exit non-zero (several ranks).
    """
    options = {} if respawn else {"child_exit": _halt_on_worker_death}
    _Gunicorn(
        app_factory,
        options
        | {
            "bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
            "workers": 1,  # one copy of the model; concurrency comes from threads and batching
            "worker_class": "gthread",
            "threads": threads,
            "timeout": 120,  # the worker heartbeats from its own loop, not from request threads
            "graceful_timeout": 5,
            "keepalive": 5,
            "accesslog": None,  # our request log line has more: sequences and tokens
            "loglevel": "info",
            "control_socket_disable": True,  # no runtime-management socket in a container
        },
    ).run()
