"""Model-file hashes for the LoRA metadata, computed in a background thread.

Hashing a 22 GB checkpoint takes minutes; starting it at launch and collecting the result
when the first file is saved keeps it off the critical path. hashlib releases the GIL on
large updates, so the thread does not slow the training loop's Python code.
"""

from __future__ import annotations

import hashlib
import os
import threading

_LEGACY_OFFSET = 0x100000  # A1111's old "model hash": 64 KiB at 1 MiB, first 8 hex chars
_LEGACY_LENGTH = 0x10000
_CHUNK = 8 * 1024 * 1024


def legacy_model_hash(path: str) -> str:
    """The old A1111 hash: sha256 of the 64 KiB at offset 1 MiB, first 8 hex chars.

    Files shorter than 1 MiB hash the empty string, as in A1111.
    """
    with open(path, "rb") as f:
        f.seek(_LEGACY_OFFSET)
        return hashlib.sha256(f.read(_LEGACY_LENGTH)).hexdigest()[:8]


def full_sha256(path: str, cancelled: threading.Event | None = None) -> str | None:
    """sha256 of the whole file, hex; None if `cancelled` was set before it finished."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while True:
            if cancelled is not None and cancelled.is_set():
                return None
            n = f.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
    return digest.hexdigest()


class BackgroundFileHash:
    """Hash `path` in a daemon thread; `.result()` gives the metadata keys.

    kind "sd_model" gives ss_sd_model_hash / ss_new_sd_model_hash; kind "vae" gives
    ss_vae_hash / ss_new_vae_hash. A path that is not an existing file (a folder, a hub id,
    None) gives no keys.
    """

    def __init__(self, path: str | os.PathLike | None, *, kind: str = "sd_model") -> None:
        self.path = os.fspath(path) if path is not None else None
        self.kind = kind
        self._cancelled = threading.Event()
        self._result: dict[str, str] = {}
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if self.path is not None and os.path.isfile(self.path):
            self._thread = threading.Thread(target=self._run, name=f"hash-{kind}", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            legacy = legacy_model_hash(self.path)
            full = full_sha256(self.path, self._cancelled)
            if full is not None:
                self._result = {f"ss_{self.kind}_hash": legacy, f"ss_new_{self.kind}_hash": full}
        except OSError as e:  # unreadable file: report it when the result is asked for
            self._error = e

    def result(self, timeout: float | None = None) -> dict[str, str]:
        """The hash keys, waiting up to `timeout` seconds (None: until done).

        Raises TimeoutError if not finished in time, OSError if the file could not be read.
        """
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"hashing {self.path} is still running")
        if self._error is not None:
            raise self._error
        return dict(self._result)

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def cancel(self) -> None:
        """Stop early (e.g. on a failed launch); result() then gives no keys."""
        self._cancelled.set()
