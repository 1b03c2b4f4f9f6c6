"""Read safetensors tensors straight into GPU memory.

The usual path, a memory-mapped CPU tensor per weight then `.to("cuda")`, copies every byte
twice on one thread: page cache -> a fresh pageable CPU tensor -> the GPU, the second copy
through the driver's own small staging buffer. For a 24 GB FLUX.1 checkpoint that is the bulk of
the launch time. Here each tensor gets its GPU memory first; its bytes are read with plain
positioned reads (`preadv`; several threads; the kernel copies page cache -> pinned buffer, the
GIL is released) into a few reusable pinned staging buffers, and each buffer goes to the GPU as an
asynchronous copy on the reader's own stream. The staging buffers are reused once their copy
has finished, so host memory stays at READERS x CHUNK_BYTES whatever the file size.

Tensors come back in the file's dtype (the caller casts on the GPU, which is fast); every
tensor is its own allocation (no views into one big buffer: cuBLAS and vectorised kernels want
aligned storage).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

from library.errors import ModelFileError

T = TypeVar("T")

CHUNK_BYTES = 64 * 2**20      # one staging buffer; big enough that a copy runs at full PCIe speed
READERS = 4                   # threads reading (and staging buffers): page-cache copies scale to ~4


def run_beside(fn: Callable[..., T], where: torch.device | str, /, *args, **kwargs) -> Future[T]:
    """Start `fn(*args, **kwargs)` on a thread of its own and return its future: a model's file
    reads and GPU copies (which release the GIL) then overlap the caller's Python work (imports,
    building modules). The thread's current CUDA device is `where`'s (give it an index), so that
    allocations without an explicit index land on the right GPU."""
    where = torch.device(where)

    def run() -> T:
        if where.type == "cuda" and where.index is not None:
            torch.cuda.set_device(where)
        return fn(*args, **kwargs)

    pool = ThreadPoolExecutor(1, thread_name_prefix="load-beside")
    try:
        return pool.submit(run)
    finally:
        pool.shutdown(wait=False)   # the thread ends with its job


@dataclass(frozen=True)
class _Piece:
    """A run of file bytes [offset, offset + length) bound for dest[start:start + length]."""
    key: str
    offset: int
    length: int
    start: int


def plan_pieces(spans: dict[str, tuple[int, int]], chunk: int = CHUNK_BYTES) -> list[_Piece]:
    """Cut each tensor's byte span (absolute file offsets [begin, end)) into pieces of at most
    `chunk` bytes, in file order (sequential reads)."""
    pieces = []
    for key, (begin, end) in sorted(spans.items(), key=lambda kv: kv[1][0]):
        for start in range(0, end - begin, chunk):
            pieces.append(_Piece(key, begin + start, min(chunk, end - begin - start), start))
    return pieces


class _Stager:
    """One reader thread's pinned buffer, CUDA stream and the event of its last copy."""

    def __init__(self, device: torch.device, chunk: int, allocated: torch.cuda.Event):
        self.buffer = torch.empty(chunk, dtype=torch.uint8, pin_memory=True)
        self.view = memoryview(self.buffer.numpy())
        self.stream = torch.cuda.Stream(device)
        # the destinations were allocated on the caller's stream, maybe in memory that stream's
        # queued work still reads: write only after it
        self.stream.wait_event(allocated)
        self.done = None

    def copy(self, file: _File, piece: _Piece, dest: torch.Tensor) -> None:
        if self.done is not None:
            self.done.synchronize()         # the buffer's previous copy must have left it
        file.read_exactly(self.view[:piece.length], piece.offset)
        with torch.cuda.stream(self.stream):
            dest[piece.start:piece.start + piece.length].copy_(self.buffer[:piece.length], non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record(self.stream)


class _File:
    """Positioned reads of one file from several threads: `os.preadv` on one descriptor where the
    platform has it (Linux, macOS); elsewhere (Windows) a file object per thread, seek + readinto."""

    def __init__(self, path: str | os.PathLike):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0)) if hasattr(os, "preadv") else None
        self.local = threading.local()
        self.handles: list = []
        self.lock = threading.Lock()

    def read_exactly(self, view: memoryview, offset: int) -> None:
        got = 0
        while got < len(view):
            n = self._read(view[got:], offset + got)
            if not n:
                raise OSError(f"{self.path}: the file ended {len(view) - got} bytes early (truncated download?)")
            got += n

    def _read(self, view: memoryview, offset: int) -> int:
        if self.fd is not None:
            return os.preadv(self.fd, [view], offset)
        if not hasattr(self.local, "f"):
            self.local.f = open(self.path, "rb", buffering=0)
            with self.lock:
                self.handles.append(self.local.f)
        self.local.f.seek(offset)
        return self.local.f.readinto(view)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        for f in self.handles:
            f.close()


def read_tensors(path: str | os.PathLike, entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]],
                 device: torch.device, *, chunk: int = CHUNK_BYTES, readers: int = READERS) -> dict[str, torch.Tensor]:
    """entries: {key: (dtype, shape, begin, end)} with absolute file offsets. Returns the
    tensors on `device`, in `dtype`: on a CUDA device through pinned staging buffers, on the
    CPU read straight into each tensor (plain reads, no memory map)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    out = {k: torch.empty(shape, dtype=dtype, device=device) for k, (dtype, shape, _, _) in entries.items()}
    flat = {k: t.view(-1).view(torch.uint8) if t.numel() else t for k, t in out.items()}
    for k, (_, _, begin, end) in entries.items():
        if flat[k].numel() != end - begin:
            raise ModelFileError(f"{path}: tensor {k} has {end - begin} bytes in the file, but its dtype and "
                                 f"shape need {flat[k].numel()}; the file is corrupt.")
    pieces = plan_pieces({k: (b, e) for k, (_, _, b, e) in entries.items() if e > b}, chunk)
    if not pieces:
        return out
    readers = max(1, min(readers, len(pieces)))
    if device.type != "cuda":
        _read_pieces_on_cpu(path, pieces, flat, readers)
        return out
    allocated = torch.cuda.Event()
    allocated.record(torch.cuda.current_stream(device))
    local = threading.local()
    stagers: list[_Stager] = []
    lock = threading.Lock()

    def stager() -> _Stager:
        if not hasattr(local, "stager"):
            torch.cuda.set_device(device)
            local.stager = _Stager(device, min(chunk, max(p.length for p in pieces)), allocated)
            with lock:
                stagers.append(local.stager)
        return local.stager

    file = _File(path)
    try:
        with ThreadPoolExecutor(readers, thread_name_prefix="safetensors-read") as pool:
            for future in [pool.submit(lambda p=p: stager().copy(file, p, flat[p.key])) for p in pieces]:
                future.result()
    finally:
        file.close()
        for s in stagers:   # every copy has landed before the tensors are used (on any stream)
            if s.done is not None:
                s.done.synchronize()
    return out


def _read_pieces_on_cpu(path, pieces: list[_Piece], flat: dict[str, torch.Tensor], readers: int) -> None:
    views = {k: memoryview(t.numpy()) for k, t in flat.items() if t.numel()}
    file = _File(path)
    try:
        with ThreadPoolExecutor(readers, thread_name_prefix="safetensors-read") as pool:
            for future in [pool.submit(file.read_exactly, views[p.key][p.start:p.start + p.length], p.offset)
                           for p in pieces]:
                future.result()
    finally:
        file.close()
