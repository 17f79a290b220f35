"""Child processes for engines and the router: free ports, bounded readiness waits, stop by PID.

Processes are only ever stopped through the ``Popen`` handle we started (SIGTERM, then SIGKILL after a
bounded wait), never by name, so nothing else on the machine is touched.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from typing import Optional, Sequence

import httpx

_PORTS = (10000, 20000)  # where servers listen: below Linux's ephemeral range (32768+ by default)


def _can_bind(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A random port in 10000-19999 that is free right now.

    Why not port 0: the OS then hands out a port of its ephemeral range, the range it also draws the
    source port of every outgoing connection from. A SGLang server binds its port only after loading
    its model (tens of seconds on CPU), and in that window any connection on the machine could take it
    ("address already in use"; seen in CI). Below the ephemeral range only an explicit bind can
    collide. Callers still fail loudly if the bind fails."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(*_PORTS)
        if _can_bind(host, port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # all taken: any free port at all
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_http_ok(
    url: str,
    *,
    timeout_s: float,
    proc: Optional[subprocess.Popen] = None,
    poll_s: float = 0.1,
    headers: Optional[dict] = None,
) -> None:
    """Poll ``GET url`` until it answers 200. Raises ``TimeoutError`` after ``timeout_s``, or
    ``RuntimeError`` at once if ``proc`` exits meanwhile (a crashed server never becomes ready)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with httpx.Client(timeout=max(2.0, poll_s), headers=headers) as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before {url} was ready")
            try:
                r = client.get(url)
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                last = type(e).__name__
            time.sleep(poll_s)
    raise TimeoutError(f"{url} not ready after {timeout_s} s (last: {last})")


def start_process(
    argv: Sequence[str], *, log_path: Optional[str] = None, env: Optional[dict] = None
) -> subprocess.Popen:
    """Start ``argv`` in its own session (so a terminal's Ctrl-C does not hit it twice); stdout and
    stderr go to ``log_path`` (appended) or nowhere. The child keeps its own copy of the file handle."""
    full_env = {**os.environ, **(env or {})}
    if log_path is None:
        return subprocess.Popen(
            list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=full_env, start_new_session=True
        )
    with open(log_path, "a") as log:
        return subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)


def stop_process(proc: subprocess.Popen, *, timeout_s: float = 10.0) -> Optional[int]:
    """SIGTERM the process we started, SIGKILL it if still alive after ``timeout_s``; its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)
    return proc.returncode
