"""sglang-router as a child process: start, register and remove workers, stop by PID.

What the router (0.3.2) forwards, checked against its route table and by running it here:

* ``/generate``: to one worker chosen by ``--policy``; when that worker dies mid-request the router
  retries on another (seen with a SIGKILLed worker: the request completed on the survivor).
* ``/flush_cache``: to every worker.
* ``/health`` (router liveness only), ``/health_generate``, ``/get_model_info``, ``/get_server_info``.
* **Not forwarded** (404): ``/abort_request``, ``/pause_generation``, ``/continue_generation``,
  ``/init_weights_update_group``, ``/update_weights_from_*``, ``/release|resume_memory_occupation``.
  :class:`~dapo_megatron.rollout.sglang.SGLangEngine` sends those to each worker directly.

``/readiness`` answers 503 until at least one worker is registered and healthy.
"""

from __future__ import annotations

import sys
import time
from typing import Dict, List, Optional, Sequence

import httpx

from dapo_megatron.rollout import sglang_api as api
from dapo_megatron.rollout.process import free_port, start_process, stop_process, wait_http_ok


def router_argv(
    *,
    host: str,
    port: int,
    prometheus_port: int,
    policy: str = "round_robin",
    health_check_interval_s: int = 1,
    health_failure_threshold: int = 1,
    api_key: Optional[str] = None,
    extra: Sequence[str] = (),
) -> List[str]:
    """``python -m sglang_router.launch_router`` argv. A 1 s health check with failure threshold 1 makes
    a dead worker leave the rotation quickly (the defaults take tens of seconds). The router always
    binds a Prometheus port (default 29000): each router needs its own, or the second one panics.
    ``api_key``: the workers' ``--api-key``, which the router presents to them."""
    auth = ("--api-key", api_key) if api_key else ()
    return [
        *(sys.executable, "-m", "sglang_router.launch_router", "--host", host, "--port", str(port)),
        *("--policy", policy, "--health-check-interval-secs", str(health_check_interval_s)),
        *("--health-failure-threshold", str(health_failure_threshold)),
        *("--prometheus-host", host, "--prometheus-port", str(prometheus_port)),
        *("--log-level", "warn", *auth, *extra),
    ]


class SGLangRouter:
    """A router process we own. Use as a context manager, or call :meth:`stop` in a ``finally``."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int,
        policy: str = "round_robin",
        prometheus_port: Optional[int] = None,
        extra: Sequence[str] = (),
        log_path: Optional[str] = None,
        api_key: Optional[str] = None,
        health_failure_threshold: int = 1,
    ):
        self.host, self.port = host, port
        self._argv = router_argv(
            host=host, port=port, prometheus_port=prometheus_port or free_port(host), policy=policy, extra=extra,
            api_key=api_key, health_failure_threshold=health_failure_threshold,
        )  # fmt: skip
        self._log_path, self._api_key = log_path, api_key
        self.proc = None
        self.worker_ids: Dict[str, str] = {}  # worker url -> router worker id (UUID)
        self._client = httpx.Client(timeout=10.0, headers=api.auth_headers(api_key))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, *, timeout_s: float = 60.0) -> SGLangRouter:
        self.proc = start_process(self._argv, log_path=self._log_path)
        try:
            wait_http_ok(self.url + "/health", timeout_s=timeout_s, proc=self.proc)
        except Exception:
            self.stop()
            raise
        return self

    def add_worker(self, worker_url: str, *, timeout_s: float = 30.0) -> str:
        """Register a worker and wait until the router lists it healthy; returns its worker id."""
        r = self._client.post(self.url + "/workers", json=api.router_add_worker(worker_url, self._api_key))
        r.raise_for_status()
        worker_id = api.parse_router_add_worker(r.json())
        self.worker_ids[worker_url] = worker_id
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:  # registration is asynchronous (a job queue in the router)
            info = self.workers().get(worker_url)
            if info and info.get("is_healthy"):
                return worker_id
            time.sleep(0.1)
        raise TimeoutError(f"router did not list {worker_url} as healthy within {timeout_s} s")

    def workers(self) -> Dict[str, dict]:
        r = self._client.get(self.url + "/workers")
        r.raise_for_status()
        return api.parse_router_workers(r.json())

    def stop(self, *, timeout_s: float = 10.0) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout_s=timeout_s)
        self._client.close()

    def __enter__(self) -> SGLangRouter:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
