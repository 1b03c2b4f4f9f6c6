"""How a family's load_models reads its model files, shared by every DiT family.

    where = memory.load_device(args, device, files)       # the GPU when all the files fit, else the CPU
    return load_with_cpu_fallback(args, where, lambda where: load_dit_beside(
        where, lambda: load_dit(..., device=where), lambda: (load_vae(..., device=where), ...),
        dit_files=[dit_path], other_files=[vae_path, text_encoder_path]))

`load_dit_beside` reads the DiT on a thread of its own (its file reads and GPU copies release
the GIL) while the caller builds the autoencoder and text encoders, whose files are prefetched
into GPU memory meanwhile. `load_with_cpu_fallback` retries on the CPU when the GPU runs out of
memory on the straight-to-GPU route (another process took memory after load_device looked).
"""

from __future__ import annotations

import gc
import os
from concurrent import futures
from typing import Callable, Sequence, TypeVar

import torch

from library.device_reader import run_beside
from library.safetensors_io import drop_prefetched, prefetch

T = TypeVar("T")
D = TypeVar("D")
O = TypeVar("O")

FALLBACK_NOTE = ("note: the GPU ran out of memory while the models were read straight into it (does another process "
                 "use it?); loading them into CPU memory instead")


def load_with_cpu_fallback(args, where: torch.device | str, load: Callable[[torch.device | str], T]) -> T:
    """load(where); when that runs out of GPU memory on the straight-to-GPU route, a note and
    load("cpu") once the half-loaded models are freed. With --lowram (the GPU was asked for) or
    already on the CPU, the error stands."""
    try:
        return load(where)
    except torch.cuda.OutOfMemoryError:
        if torch.device(where).type != "cuda" or args.lowram:
            raise
    # Out here, not in the except block: its traceback holds the half-loaded models on the GPU.
    print(FALLBACK_NOTE)
    gc.collect()
    torch.cuda.empty_cache()
    return load("cpu")


def load_dit_beside(where: torch.device | str, load_dit: Callable[[], D], load_others: Callable[[], O], *,
                    dit_files: Sequence[str | os.PathLike | None] = (),
                    other_files: Sequence[str | os.PathLike | None] = ()) -> tuple[D, O]:
    """(load_dit(), load_others()), the DiT read on a thread of its own while `load_others` runs
    (mostly Python: imports, building modules). On a GPU each of `other_files` is prefetched
    first (safetensors_io.prefetch), except one the DiT reads too or that several of them name:
    the first load_file of a prefetched file takes all of it. When `load_others` fails, the DiT's
    reads end before the error goes on (a retry needs their memory) and unused prefetches are
    dropped."""
    for path in _prefetchable(dit_files, other_files):   # on a GPU: read while the modules are built
        prefetch(path, where)
    dit_job = run_beside(load_dit, where)
    try:
        others = load_others()
    except BaseException:
        futures.wait([dit_job])
        raise
    finally:
        drop_prefetched()   # a file refused before its read was taken must not hold GPU memory
    return dit_job.result(), others


def _prefetchable(dit_files, other_files) -> list[str | os.PathLike]:
    """The regular files among `other_files` named once and not by the DiT (a missing file or a
    folder is left to its loader, which says what is wrong)."""
    dit = {os.path.realpath(p) for p in dit_files if p is not None}
    others = [(p, os.path.realpath(p)) for p in other_files if p is not None]
    named = [real for _, real in others]
    return [p for p, real in others if os.path.isfile(p) and real not in dit and named.count(real) == 1]
