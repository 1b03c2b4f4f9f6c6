"""Low-level helpers for our cache files: names, integrity checks and source-image stamps.

Cache files are safetensors written atomically next to each image. A file that cannot be parsed
or whose data section is shorter than its header says is "corrupt" and is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass

from library.data.buckets import Size

MISSING = "missing"
CORRUPT = "corrupt"
OK = "ok"


@dataclass(frozen=True)
class CacheFileState:
    status: str                      # MISSING, CORRUPT or OK
    tensor_names: frozenset[str] = frozenset()
    metadata: dict | None = None


def inspect_cache_file(path: str, *, check_length: bool = True) -> CacheFileState:
    """Parse the header without reading tensor data; with `check_length`, also verify that the
    file is as long as the header says (catches truncated writes and damaged copies)."""
    try:
        file_size = os.path.getsize(path)
    except OSError:
        return CacheFileState(MISSING)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return CacheFileState(CORRUPT)
            (n,) = struct.unpack("<Q", head)
            if n <= 1 or n > min(100 * 1024 * 1024, file_size - 8):
                return CacheFileState(CORRUPT)
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            return CacheFileState(CORRUPT)
        metadata = header.pop("__metadata__", None) or {}
        end = 0
        for info in header.values():
            start, stop = info["data_offsets"]
            end = max(end, int(stop))
        if check_length and 8 + n + end != file_size:
            return CacheFileState(CORRUPT)
        return CacheFileState(OK, frozenset(header), metadata)
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return CacheFileState(CORRUPT)


def short_hash(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(str(p).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def encoder_suffix(encoder: object, kind: str) -> str:
    """The encoder's `file_suffix` (e.g. "_flux") or one derived from its identity."""
    suffix = getattr(encoder, "file_suffix", None)
    if suffix:
        suffix = str(suffix)
        if os.sep in suffix or "/" in suffix:
            raise ValueError(f"encoder file_suffix {suffix!r} must not contain a path separator")
        return suffix
    return f"_{kind}_{short_hash(getattr(encoder, 'identity'))[:8]}"


def latent_cache_path(image_path: str, original_size: Size, suffix: str) -> str:
    stem = os.path.splitext(image_path)[0]
    return f"{stem}_{original_size[0]:04d}x{original_size[1]:04d}{suffix}.safetensors"


def text_cache_path(image_path: str, suffix: str) -> str:
    return f"{os.path.splitext(image_path)[0]}{suffix}.safetensors"


def empty_caption_cache_path(directory: str, suffix: str) -> str:
    # Shared by every image of the folder whose caption may be dropped; it could only collide with
    # the text cache of an image literally named "__empty_caption__".
    return os.path.join(directory, f"__empty_caption__{suffix}.safetensors")


# ------------------------------------------------------------------------------------ source stamps

@dataclass(frozen=True)
class SourceStamp:
    """What identifies an image file's content: size and mtime (cheap) plus a sha256 (robust)."""

    size: int
    mtime_ns: int
    sha256: str

    def as_metadata(self) -> dict[str, str]:
        return {"source_size": str(self.size), "source_mtime_ns": str(self.mtime_ns), "source_sha256": self.sha256}


def stamp_from_bytes(path: str, data: bytes) -> SourceStamp:
    st = os.stat(path)
    return SourceStamp(len(data), st.st_mtime_ns, hashlib.sha256(data).hexdigest())


def source_unchanged(path: str, metadata: dict) -> bool:
    """True if the image still has the content recorded in a cache file. Size+mtime equal is
    enough; if only the mtime differs (a copy, a touch) the bytes are hashed and compared."""
    try:
        st = os.stat(path)
        size, mtime = int(metadata["source_size"]), int(metadata["source_mtime_ns"])
        recorded_hash = metadata["source_sha256"]
    except (OSError, KeyError, ValueError):
        return False
    if st.st_size != size:
        return False
    if st.st_mtime_ns == mtime:
        return True
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest() == recorded_hash
    except OSError:
        return False
