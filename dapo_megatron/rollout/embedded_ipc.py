"""The wire between :class:`~dapo_megatron.rollout.embedded_worker.EmbeddedWorkerEngine` and its worker
process: framed messages on a private socket pair, errors that cross it, and the shared-memory bucket.

Frames: an 8-byte little-endian length, then a pickle. Pickle is safe here because the socket is a
``socketpair`` inherited by exactly one child: nobody else can write to it.

Weights do not travel through the socket. The client copies a bucket into one shared-memory file
(``/dev/shm``, else the temp folder), every tensor at a 64-byte-aligned offset, and sends only the layout
``[(name, dtype, shape, offset, nbytes)]``; the worker maps the same file and hands the engine views
of it. The file is unlinked as soon as the worker has mapped it, so a crash leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import socket
import struct
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from dapo_megatron.rollout.base import EngineDeadError, EngineError, RequestTimeout

_LEN = struct.Struct("<Q")
_ALIGN = 64  # every tensor starts at a multiple of this, so a uint8 slice can be viewed as any dtype
Layout = List[Tuple[str, str, Tuple[int, ...], int, int]]  # (name, dtype, shape, byte offset, nbytes)


# ----------------------------------------------------------------------------- frames
def encode(msg: Any) -> bytes:
    body = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(body)) + body


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes from a blocking socket; ``ConnectionError`` when the peer closed it first."""
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("the peer closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> Any:
    (n,) = _LEN.unpack(recv_exact(sock, _LEN.size))
    return pickle.loads(recv_exact(sock, n))


async def read_frame(reader: Any) -> Any:
    """One frame from an ``asyncio.StreamReader`` (raises ``IncompleteReadError`` at EOF)."""
    (n,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    return pickle.loads(await reader.readexactly(n))


# ----------------------------------------------------------------------------- errors
_ERRORS = {
    "KeyError": KeyError,
    "ValueError": ValueError,
    "TypeError": TypeError,
    "RequestTimeout": RequestTimeout,
    "EngineDeadError": EngineDeadError,
    "EngineError": EngineError,
}


def error_payload(e: BaseException) -> Tuple[str, str]:
    """What crosses the wire for an exception: its class name and its message."""
    text = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
    return type(e).__name__, text


def error_from(payload: Tuple[str, str]) -> Exception:
    """The caller-side exception: the same class for the ones callers act on (bad weights: KeyError /
    ValueError; timeouts; dead engine), else an :class:`EngineError` naming the worker's class."""
    name, text = payload
    cls = _ERRORS.get(name)
    return cls(text) if cls is not None else EngineError(f"embedded worker: {name}: {text}")


# ----------------------------------------------------------------------------- shared-memory bucket
def _map(path: str, size: int, *, create: bool) -> Tuple[mmap.mmap, Tensor]:
    with open(path, "w+b" if create else "r+b") as f:
        if create:
            # Reserve the pages now: a sparse file on a full tmpfs would SIGBUS at the first write.
            os.posix_fallocate(f.fileno(), 0, size)
        mm = mmap.mmap(f.fileno(), size)
    return mm, torch.frombuffer(mm, dtype=torch.uint8)


def _new_buffer(size: int) -> Tuple[str, mmap.mmap, Tensor]:
    """A new shared file of ``size`` bytes in ``/dev/shm``, or in the temp folder when ``/dev/shm`` is
    absent or too small (containers often give it 64 MB; a disk-backed file is shared as well, through
    the page cache)."""
    dirs = [d for d in ("/dev/shm", tempfile.gettempdir()) if os.path.isdir(d)]
    for i, folder in enumerate(dirs):
        fd, path = tempfile.mkstemp(prefix="dapo-embedded-weights-", dir=folder)
        os.close(fd)
        try:
            mm, buf = _map(path, size, create=True)
            return path, mm, buf
        except OSError:
            os.unlink(path)
            if i == len(dirs) - 1:
                raise
    raise OSError("no folder for the shared weight buffer")


def _close_map(mm: Optional[mmap.mmap]) -> None:
    """Unmap now, unless a view of it is still alive somewhere: then the last view's release does it."""
    if mm is not None:
        with contextlib.suppress(BufferError):
            mm.close()


class SharedBucketWriter:
    """Client side: one shared-memory buffer, grown when a bucket does not fit, reused otherwise.

    Ordering hazard: the worker's engine reads the buffer while it loads; :meth:`pack` must not be
    called again until the worker answered the previous update (the client allows one update at a time).
    """

    def __init__(self) -> None:
        self._mm: Optional[mmap.mmap] = None
        self._buf: Optional[Tensor] = None
        self.pending_path: Optional[str] = None  # a new file the worker has not mapped yet

    def pack(self, named_tensors: Sequence[Tuple[str, Tensor]]) -> Tuple[Optional[str], Layout]:
        """Copy the bucket in; ``(path of a new buffer file or None to reuse the mapped one, layout)``."""
        layout: Layout = []
        offset = 0
        for name, t in named_tensors:
            nbytes = t.numel() * t.element_size()
            layout.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, nbytes))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        if self._buf is None or self._buf.numel() < offset:
            self._grow(max(offset, _ALIGN))
        assert self._buf is not None
        for (_, t), (_, _, _, off, nbytes) in zip(named_tensors, layout):
            self._buf[off : off + nbytes].view(t.dtype).view(t.shape).copy_(t.detach())
        return self.pending_path, layout

    def _grow(self, size: int) -> None:
        self.close()
        self.pending_path, self._mm, self._buf = _new_buffer(size)

    def mapped(self) -> None:
        """The worker has the new file mapped (or failed to): unlink it, the mappings keep the memory."""
        if self.pending_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.pending_path)
            self.pending_path = None

    def close(self) -> None:
        self.mapped()
        self._buf = None  # the tensor view first: mmap refuses to close while it is exported
        _close_map(self._mm)
        self._mm = None


class SharedBucketReader:
    """Worker side: maps the client's buffer file and gives views of one bucket (no copy)."""

    def __init__(self) -> None:
        self._mm: Optional[mmap.mmap] = None
        self._buf: Optional[Tensor] = None

    def views(self, path: Optional[str], layout: Layout) -> List[Tuple[str, Tensor]]:
        """Named views ``[(name, tensor)]`` into the buffer; valid until the next new ``path``."""
        if path is not None:
            self.close()
            self._mm, self._buf = _map(path, os.path.getsize(path), create=False)
        if self._buf is None:
            raise EngineError("update_weights: no shared weight buffer was mapped")
        out: List[Tuple[str, Tensor]] = []
        dtypes: Dict[str, torch.dtype] = {}
        for name, dtype, shape, off, nbytes in layout:
            dt = dtypes.setdefault(dtype, getattr(torch, dtype))
            out.append((name, self._buf[off : off + nbytes].view(dt).view(shape)))
        return out

    def close(self) -> None:
        self._buf = None
        _close_map(self._mm)
        self._mm = None
