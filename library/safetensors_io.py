"""Safetensors reading (memory-mapped) and atomic writing.

Every tensor file the project writes goes through `save_file_atomic`, so a crash or a full
disk never leaves a half-written file in place of a good one.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import tempfile
from concurrent.futures import Future
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save as _serialize

from library.device_reader import read_tensors, run_beside
from library.errors import ModelFileError, UserError


class SaveError(UserError):
    """Writing an output file failed (disk full, permissions); the previous file is intact."""


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, `__metadata__`)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: file not found. Check the path you passed.")
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or n > 100 * 1024 * 1024:
                raise ValueError("header size out of range")
            return json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise ModelFileError(
            f"{path}: not a readable .safetensors file ({e}). The download may be incomplete; "
            "re-download it or convert it to safetensors."
        ) from e


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    return read_header(path).get("__metadata__", {}) or {}


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, dtype string)} without reading any tensor data."""
    header = read_header(path)
    return {k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items() if k != "__metadata__"}


# `--disable_mmap_load_safetensors`: read tensors with plain file reads instead of mapping the
# file. Set once by the entry script (`set_mmap_loading`), before any model is loaded: memory
# maps of network drives or of files larger than free RAM behave badly on some systems (Windows).
_use_mmap = True

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
           "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def set_mmap_loading(enabled: bool) -> None:
    global _use_mmap
    _use_mmap = bool(enabled)


# Whole files being read into GPU memory ahead of their load_file (prefetch): (path, device) -> job.
_prefetched: dict[tuple[str, str], Future] = {}


def prefetch(path: str | os.PathLike, device: torch.device) -> None:
    """Start reading every tensor of `path` into `device` memory (a CUDA device) on a thread of
    its own; the next load_file of that file to that device takes its tensors from there. Lets
    a loader read a file while it builds the module (Python work that holds the GIL: imports,
    module construction), which the reads do not need. Tensors load_file is not asked for are
    dropped then."""
    key = _prefetch_key(path, device)
    if key is None or key in _prefetched:
        return
    device = torch.device(key[1])
    _prefetched[key] = run_beside(_read_direct, device, path, read_header(path), device, None)


def _prefetch_key(path, device) -> tuple[str, str] | None:
    """(real path, "cuda:N") for a CUDA device, the index resolved in the calling thread (a
    reading thread has no current device of its own); None for any other device."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return os.path.realpath(path), str(device)


def drop_prefetched() -> None:
    """Forget every prefetch not yet taken (a loader failed before reading its file): their
    tensors are freed once the reads finish."""
    _prefetched.clear()


def _take_prefetched(path, device, keys: list[str] | None) -> dict[str, torch.Tensor] | None:
    if not _prefetched:
        return None
    job = _prefetched.pop(_prefetch_key(path, device), None)
    if job is None:
        return None
    tensors = job.result()
    if keys is None:
        return tensors
    if any(k not in tensors for k in keys):
        return None   # the plain read below names the missing tensor
    return {k: tensors[k] for k in keys}


def load_file(path: str | os.PathLike, device: str | torch.device = "cpu",
              keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Load tensors (memory-mapped on CPU: pages are read on first touch; plain reads after
    `set_mmap_loading(False)`). To a CUDA device they are read straight into GPU memory through
    pinned staging buffers (library/device_reader.py), with no CPU copy, or taken from a
    prefetch of the file."""
    prefetched = _take_prefetched(path, device, keys)
    if prefetched is not None:
        return prefetched
    header = read_header(path)  # a clear error for missing or corrupt files
    if torch.device(device).type == "cuda" or not _use_mmap:
        return _read_direct(path, header, device, keys)
    out = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        for k in keys if keys is not None else f.keys():
            out[k] = f.get_tensor(k)
    return out


def load_keys(where: Mapping[str, str | os.PathLike], keys: Iterable[str],
              device: str | torch.device) -> dict[str, torch.Tensor]:
    """The tensors `keys` that `where` (tensor name -> its file) places, one load_file per file;
    names `where` lacks are skipped (left to the caller's own missing-tensor error)."""
    by_file: dict[str | os.PathLike, list[str]] = {}
    for key in keys:
        if key in where:
            by_file.setdefault(where[key], []).append(key)
    return {k: t for f, names in by_file.items() for k, t in load_file(f, device=device, keys=names).items()}


def read_to_gpu(where: Mapping[str, str | os.PathLike], keys: Iterable[str],
                device: str | torch.device) -> dict[str, torch.Tensor]:
    """For a model loader: on a CUDA device, every tensor it needs read straight into GPU memory
    at once (load_keys); the loader pops each as it uses it, so a cast copy replaces the tensor
    instead of doubling it. On any other device {}: the loader reads memory-mapped, one tensor at
    a time."""
    return load_keys(where, keys, device) if torch.device(device).type == "cuda" else {}


def _data_start(path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def _entry(path, header: dict, key: str, data_start: int) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one tensor, absolute file offsets."""
    if key not in header or key == "__metadata__":
        raise ModelFileError(f"{path}: tensor {key} is missing. The file is incomplete or of another model; "
                             "re-download it.")
    info = header[key]
    if info["dtype"] not in _DTYPES:
        raise ModelFileError(f"{path}: tensor {key} has dtype {info['dtype']}, which is not supported.")
    start, end = info["data_offsets"]
    return _DTYPES[info["dtype"]], tuple(info["shape"]), data_start + start, data_start + end


def _read_direct(path, header: dict, device, keys: list[str] | None) -> dict[str, torch.Tensor]:
    """library/device_reader.py's reads: into GPU memory through pinned buffers, or plain reads
    into CPU tensors."""
    start = _data_start(path)
    keys = keys if keys is not None else [k for k in header if k != "__metadata__"]
    size = os.path.getsize(path)
    entries = {k: _entry(path, header, k, start) for k in keys}
    for k, (_, _, _, end) in entries.items():
        if end > size:
            raise ModelFileError(f"{path}: tensor {k} lies past the end of the file ({size} bytes): the download is "
                                 "incomplete; re-download it.")
    return read_tensors(path, entries, torch.device(device))


def save_file_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Serialize to bytes, write to a temporary file beside `path`, fsync, then rename."""
    data = serialize(tensors, metadata)
    write_bytes_atomic(data, path)


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return _serialize(tensors, metadata=metadata)


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise SaveError(f"cannot write to {path.parent}: {e.strerror}. Choose a writable --output_dir.") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs should read like any file
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        hint = "the disk is full; free some space" if e.errno == errno.ENOSPC else e.strerror
        raise SaveError(f"saving {path} failed ({hint}). Any previous version of the file is intact.") from e
