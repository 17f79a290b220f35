"""Starting real SGLang servers: one command line, one environment, one readiness check, for every launcher.

Both launchers use this module: the trainer's own local fleet (``rollout.engine=sglang`` without a saved
placement plan, :class:`LocalSGLangFleet`) and the sbatch engine step (``slurm/engines_on_node.sh`` ->
``dapo-megatron engines``, :func:`serve_plan_on_node`).

A server is ``<python> -m sglang.launch_server`` with the model path, TP, ``--mem-fraction-static``,
``--enable-memory-saver`` when colocated on a GPU, the bind address from the placement plan and
``--api-key`` (a per-job key kept in the run folder with mode 0600). ``python`` is
``rollout.sglang_python``: SGLang lives in its own environment (on CPU machines ``.venv-sglang`` from
``tools/sglang_env.sh``; on GPU clusters any interpreter with the CUDA SGLang installed).

On CPU (``rollout.sglang_device=cpu``) the server also gets SGLang's CPU engine switch, the torch-native
attention backend, a bounded KV pool, and the ``sglang_cpu_shim`` sitecustomize that keeps weights in a
loadable layout (see that file for why).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

from dapo_megatron.rollout import sglang_api as api
from dapo_megatron.rollout.process import free_port, wait_http_ok

SHIM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sglang_cpu_shim")
API_KEY_FILE = "engine_api_key"
# Allocators SGLang's CPU docs preload; used when present, skipped otherwise (they only speed it up).
_CPU_PRELOAD = ("/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",)


class SGLangStartError(RuntimeError):
    """A server exited or did not become ready; the message carries the tail of its log."""


@dataclass(frozen=True)
class ServerOptions:
    """What one server needs. ``device`` is ``cuda`` or ``cpu``; ``max_total_tokens`` 0 lets SGLang size
    the KV pool from ``mem_fraction_static`` (on CPU a bounded pool is used instead, see ``argv``);
    ``gpu_ids``: the node-local GPUs the server may see (``CUDA_VISIBLE_DEVICES``; empty: all);
    ``return_routed_experts``: capture each token's MoE experts (``--enable-return-routed-experts``) so
    requests may ask for them (``algo.routing_replay: rollout``)."""

    model_path: str
    host: str = "127.0.0.1"
    port: int = 30000
    tp: int = 1
    mem_fraction_static: float = 0.7
    device: str = "cuda"
    base_gpu_id: int = 0
    enable_memory_saver: bool = False
    api_key: Optional[str] = None
    seed: Optional[int] = None
    max_total_tokens: int = 0
    gpu_ids: Tuple[int, ...] = ()
    return_routed_experts: bool = False
    extra: Tuple[str, ...] = field(default_factory=tuple)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def launch_sglang_server(opts: ServerOptions, *, python: str = "python") -> List[str]:
    """argv of ``python -m sglang.launch_server`` (flag names as in SGLang 0.5.23's server_args)."""
    argv = [python, "-m", "sglang.launch_server", "--model-path", opts.model_path]
    argv += ["--host", opts.host, "--port", str(opts.port), "--tp-size", str(opts.tp)]
    argv += ["--mem-fraction-static", str(opts.mem_fraction_static)]
    if opts.device == "cpu":
        # torch_native attention: the AMX kernels are off (shim); no overlap scheduler on a few cores.
        argv += ["--device", "cpu", "--attention-backend", "torch_native", "--disable-overlap-schedule"]
        argv += ["--max-total-tokens", str(opts.max_total_tokens or 16384)]
    else:
        argv += ["--base-gpu-id", str(opts.base_gpu_id)]
        if opts.max_total_tokens:
            argv += ["--max-total-tokens", str(opts.max_total_tokens)]
    if opts.enable_memory_saver and opts.device != "cpu":  # torch_memory_saver is CUDA-only
        argv += ["--enable-memory-saver"]
    if opts.seed is not None:
        argv += ["--random-seed", str(opts.seed)]
    if opts.api_key:
        argv += ["--api-key", opts.api_key]
    if opts.return_routed_experts:
        argv += ["--enable-return-routed-experts"]
    return argv + list(opts.extra)


# The trainer's launcher variables (torchrun, torch elastic). A server started by a trainer rank must not
# inherit them: SGLang's scheduler would join the trainer's world (WORLD_SIZE=2 under a 2-rank torchrun)
# and wait forever for a peer that never comes.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # fmt: skip


def server_env(device: str, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The server's environment: ``base`` (default ``os.environ``) without the trainer's launcher
    variables, with ``/health`` as liveness only; on CPU also SGLang's CPU-engine switch, the shim
    first on PYTHONPATH, and the preloaded allocator where the machine has it."""
    env = {
        k: v
        for k, v in (os.environ if base is None else base).items()
        if k not in _LAUNCHER_VARS and not k.startswith("TORCHELASTIC_")
    }
    env.setdefault("HF_HUB_OFFLINE", "1")  # the model folder is local; never reach for a hub
    # The router probes each worker's /health every second. By default /health generates a token, and
    # a worker paused or released for the trainer (colocated) generates nothing: the probe times out,
    # the router drops every worker and answers the next rollout with 503 until two probes pass. So
    # /health is liveness only; /health_generate (our readiness and failure checks) still generates.
    env["SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"] = "false"
    if device != "cpu":
        return env
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    env["DAPO_SGLANG_PARENT_PID"] = str(os.getpid())  # the shim ties the server's life to ours
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SHIM_DIR, env.get("PYTHONPATH", "")) if p)
    preload = [p for p in _CPU_PRELOAD if os.path.exists(p)]
    if preload and "LD_PRELOAD" not in env:
        env["LD_PRELOAD"] = ":".join(preload)
    return env


def new_api_key(run_dir: str) -> str:
    """A fresh per-job key, written to ``<run_dir>/engine_api_key`` with mode 0600 (atomically)."""
    key = secrets.token_hex(24)
    path = os.path.join(run_dir, API_KEY_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    os.replace(tmp, path)
    return key


def read_api_key(run_dir: str) -> Optional[str]:
    """The key written by :func:`new_api_key`, or None when the run has none."""
    path = os.path.join(run_dir, API_KEY_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def log_tail(path: Optional[str], lines: int = 30) -> str:
    if not path or not os.path.isfile(path):
        return "(no log)"
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


class SGLangServer:
    """One server process we own, in its own process group (SGLang forks a scheduler and a detokenizer;
    stopping signals the whole group, so nothing outlives it)."""

    def __init__(self, opts: ServerOptions, *, python: str, log_path: str):
        self.opts, self.python, self.log_path = opts, python, log_path
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return self.opts.url

    def start(self) -> SGLangServer:
        argv = launch_sglang_server(self.opts, python=self.python)
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # it logs the api key
        with os.fdopen(fd, "a") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                                         start_new_session=True)  # fmt: skip
        return self

    def _env(self) -> Dict[str, str]:
        env = server_env(self.opts.device)
        if self.opts.gpu_ids and self.opts.device == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in self.opts.gpu_ids)
        return env

    def wait_ready(self, *, timeout_s: float) -> None:
        """``/health_generate`` answers 200 (the model ran once); raises :class:`SGLangStartError` with the
        log tail when the process exits or the deadline passes."""
        assert self.proc is not None, "start() first"
        try:
            wait_http_ok(self.url + "/health_generate", timeout_s=timeout_s, proc=self.proc, poll_s=1.0,
                         headers=api.auth_headers(self.opts.api_key))  # fmt: skip
        except (RuntimeError, TimeoutError) as e:
            where, tail = self.log_path, log_tail(self.log_path)
            msg = f"SGLang server {self.url} did not start ({e}); last lines of {where}:\n{tail}"
            raise SGLangStartError(msg) from None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole group at once (a crashed node, for fault tests)."""
        if self.proc is not None:
            _signal_group(self.proc, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, *, timeout_s: float = 20.0) -> None:
        """SIGTERM the group, SIGKILL it after ``timeout_s``."""
        if self.proc is None:
            return
        _signal_group(self.proc, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout_s)
        _signal_group(self.proc, signal.SIGKILL)  # children too, even when the leader already left
        if self.proc.poll() is None:
            self.proc.wait(timeout=timeout_s)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)  # start_new_session: the group id is the leader's pid


def start_servers(servers: Sequence[SGLangServer], *, timeout_s: float) -> None:
    """Start every server, then wait for each (they load in parallel); on any failure stop them all."""
    try:
        for s in servers:
            s.start()
        deadline = time.monotonic() + timeout_s
        for s in servers:
            s.wait_ready(timeout_s=max(1.0, deadline - time.monotonic()))
    except BaseException:
        for s in servers:
            s.stop()
        raise


def local_server_options(base: ServerOptions, count: int) -> List[ServerOptions]:
    """``count`` servers on free ports of ``base.host`` with seeds ``base.seed + i``."""
    return [
        replace(base, port=free_port(base.host), seed=None if base.seed is None else base.seed + i)
        for i in range(count)
    ]


class LocalSGLangFleet:
    """``count`` servers on this machine, behind a real sglang-router when there are several; the trainer
    owns them (``rollout.engine=sglang`` with no saved placement plan) and stops them by PID at the end.

    Logs go to ``log_dir`` (``sglang-<i>.log``, ``router.log``)."""

    def __init__(self, base: ServerOptions, count: int, *, python: str, log_dir: str):
        os.makedirs(log_dir, exist_ok=True)
        self.servers = [
            SGLangServer(opts, python=python, log_path=os.path.join(log_dir, f"sglang-{i}.log"))
            for i, opts in enumerate(local_server_options(base, count))
        ]
        self.router: Optional[object] = None
        self._log_dir, self._api_key, self._host = log_dir, base.api_key, base.host

    @property
    def worker_urls(self) -> List[str]:
        return [s.url for s in self.servers]

    @property
    def base_url(self) -> str:
        return self.router.url if self.router is not None else self.servers[0].url  # type: ignore[attr-defined]

    def start(self, *, timeout_s: float) -> LocalSGLangFleet:
        from dapo_megatron.rollout.router import SGLangRouter

        start_servers(self.servers, timeout_s=timeout_s)
        if len(self.servers) > 1:
            try:
                router = SGLangRouter(host=self._host, port=free_port(self._host), api_key=self._api_key,
                                      log_path=os.path.join(self._log_dir, "router.log"))  # fmt: skip
                self.router = router.start()
                for url in self.worker_urls:
                    router.add_worker(url)
            except BaseException:
                self.stop()
                raise
        return self

    def stop(self) -> None:
        if self.router is not None:
            self.router.stop()  # type: ignore[attr-defined]
            self.router = None
        for s in self.servers:
            s.stop()
