"""Read a GPU scalar one step late, so the host never waits for the step it just queued.

`.item()` on a CUDA tensor blocks until everything queued so far has run, which stops the CPU
from queueing the next step while the GPU works. Instead we copy the loss into pinned host
memory without blocking, record an event, and read the value a step later, when the copy has
long finished.
"""

from __future__ import annotations

import math

import torch


class LaggedScalar:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pending: list[tuple[int, torch.Tensor, object]] = []

    def push(self, step: int, value: torch.Tensor | float) -> None:
        if not isinstance(value, torch.Tensor):   # already on the host
            self._pending.append((step, float(value), None))
            return
        value = value.detach().float()
        if self.cuda and value.is_cuda:
            host = torch.empty((), dtype=torch.float32, pin_memory=True)
            host.copy_(value, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((step, host, event))
        else:
            self._pending.append((step, value, None))

    def pop_ready(self, keep_last: bool = True) -> list[tuple[int, float]]:
        """Values whose copy has finished; with keep_last the newest one waits for the next call."""
        out = []
        while self._pending and (len(self._pending) > 1 or not keep_last):
            step, host, event = self._pending.pop(0)
            if event is not None:
                event.synchronize()
            out.append((step, float(host)))
        return out


def is_bad_loss(value: float) -> bool:
    return math.isnan(value) or math.isinf(value)
