"""Block swap: keep the weights of some transformer blocks in pinned CPU memory and bring them
to the GPU just before they are used (`--blocks_to_swap N`), for any nn.ModuleList of blocks.

How it works (FORMATS 7 gives sd-scripts' schedule; this is our own implementation of it):

- A list of B blocks with N swapped keeps B - N blocks' weights on the GPU at any time. Before
  a forward pass blocks 0..B-N-1 are on the GPU ("canonical placement"). After block i < N has
  run, its weights leave and block B-N+i's arrive in the same GPU buffers, so the copy of a
  block starts B-N-1 blocks before it is needed and overlaps their compute. Backward runs the
  rotation in reverse and ends in the canonical placement again, ready for the next step.
- Frozen base weights never change, so each block that ever leaves the GPU keeps a permanent
  pinned CPU copy: "leaving" is a pointer change, and only host-to-device copies are made (no
  device-to-host traffic, half the bus time of an exchange). Host memory: one pinned copy of
  the min(2N, B) blocks that rotate. GPU buffers are allocated once, in `prepare`, and reused.
- Copies run on a side CUDA stream; the compute stream waits on a per-block event right before
  the block runs (no host synchronisation), and a copy into a buffer waits for the compute that
  last read it.
- Everything is driven by hooks on the blocks, so model code is unchanged: a forward pre-hook
  (wait for the block), a forward hook (start the next copy; mark the outputs for backward), and
  tensor hooks on the block outputs, which fire when backward reaches a block (at that point
  the block after it has finished its backward: the autograd engine runs a later-created node
  first). An autograd end-of-backward callback completes the rotation.
- Gradient checkpointing (non-reentrant, per block) recomputes a block during backward, after
  the block was brought back. Without checkpointing, tensors autograd saves that alias a
  swapped weight (e.g. the transposed weight of a Linear) are saved as references and
  re-materialised from the block's current buffers in backward.
- Forward-only passes (sampling, validation, or a list with nothing trainable upstream) rotate
  every swapped block through, so each forward ends where the next one starts.
- Correctness never depends on the schedule: a block that is not on the GPU when it is needed
  is loaded on the spot (counted in `stats.fallback_loads`; the tests assert it stays 0).

Only frozen matrices (parameters and buffers with ndim >= 2 and requires_grad False) are swapped.
Vectors (biases, norm scales, fp8 scales) stay on the GPU: well under 1% of the bytes, and each
would cost a copy launch. LoRA modules patch a Linear's forward from outside the block, so their
parameters are never touched. A trainable parameter inside a swapped block is refused.

Also here: the per-family maximum N, the deprecated FLUX options, the refusal with offloaded
checkpointing, and `--blocks_to_swap auto` (the smallest N that fits the free VRAM).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from library.errors import ConfigError

logger = logging.getLogger(__name__)

GiB = 1024 ** 3


# ---------------------------------------------------------------------------------------------
# Options: limits, deprecated flags, incompatible combinations.

def blocks_per_list(n: int, depths: Sequence[int]) -> tuple[int, ...]:
    """How `--blocks_to_swap n` spreads over a model's block lists.

    One list (SD3 joint_blocks, Lumina layers, Anima blocks): all n from it. Two lists (FLUX and
    Chroma: double_blocks, single_blocks): a single block holds about half the weights of a
    double block, so one unit of n is one double block or two single blocks; sd-scripts takes
    n // 2 double and (n - n // 2) * 2 single blocks."""
    if len(depths) == 1:
        return (n,)
    if len(depths) == 2:
        return (n // 2, (n - n // 2) * 2)
    raise ValueError(f"block swap knows how to split over 1 or 2 block lists, got {len(depths)}")


def max_blocks_to_swap(depths: Sequence[int]) -> int:
    """The largest n for which every list keeps at least two blocks on the GPU (one running,
    one arriving): FLUX 19 + 38 blocks -> 35; SD3.5 Large 38 -> 36, Medium 24 -> 22; Lumina
    26 -> 24; Anima 28 -> 26, 36 -> 34, 20 -> 18."""
    best = 0
    for n in range(1, 2 * sum(depths) + 1):
        if all(k <= d - 2 for k, d in zip(blocks_per_list(n, depths), depths)):
            best = n
    return best


def check_blocks_to_swap(n: int, depths: Sequence[int], model_name: str) -> tuple[int, ...]:
    """Validate a number from the command line; returns the per-list split."""
    limit = max_blocks_to_swap(depths)
    if n < 0:
        raise ConfigError(f"--blocks_to_swap must be 0 or more, got {n}")
    if n > limit:
        raise ConfigError(f"--blocks_to_swap {n} is too many for {model_name}: at most {limit} "
                          f"(block lists of {', '.join(map(str, depths))} keep two blocks each on the GPU). "
                          f"Use --blocks_to_swap {limit} or 'auto'.")
    return blocks_per_list(n, depths)


def parse_blocks_to_swap(value: str | int | None) -> int | str | None:
    """argparse type for --blocks_to_swap: an integer >= 0 or 'auto'."""
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    try:
        n = int(text)
    except ValueError:
        raise ConfigError(f"--blocks_to_swap takes a number of blocks or 'auto', got {value!r}") from None
    if n < 0:
        raise ConfigError(f"--blocks_to_swap must be 0 or more, got {n}")
    return n


@dataclass(frozen=True)
class ResolvedSwap:
    blocks_to_swap: int | str | None   # None: no swap
    messages: tuple[str, ...]          # deprecation notes to log as warnings


def resolve_deprecated_swap_options(blocks_to_swap: int | str | None, *, double_blocks_to_swap: int | None = None,
                                    single_blocks_to_swap: int | None = None,
                                    split_mode: bool = False) -> ResolvedSwap:
    """Map FLUX's deprecated options onto --blocks_to_swap (README_sd_scripts, FLUX.1 fine-tuning):
    --double_blocks_to_swap D / --single_blocks_to_swap S mean D + S // 2; --split_mode means 18
    when --blocks_to_swap is not given. A conflict with an explicit --blocks_to_swap is an error
    (we never silently pick one of two numbers the user gave)."""
    messages = []
    n = blocks_to_swap
    if double_blocks_to_swap or single_blocks_to_swap:
        mapped = (double_blocks_to_swap or 0) + (single_blocks_to_swap or 0) // 2
        given = " ".join(f"--{k} {v}" for k, v in (("double_blocks_to_swap", double_blocks_to_swap),
                                                   ("single_blocks_to_swap", single_blocks_to_swap)) if v)
        if n is not None and n != mapped:
            raise ConfigError(f"{given} (= --blocks_to_swap {mapped}) conflicts with --blocks_to_swap {n}. "
                              "These options are deprecated: keep only --blocks_to_swap.")
        n = mapped
        messages.append(f"{given} is deprecated; it means --blocks_to_swap {mapped}. Use that instead.")
    if split_mode:
        if n is None:
            n = 18
            messages.append("--split_mode is deprecated; it now means --blocks_to_swap 18. Use that instead.")
        else:
            messages.append(f"--split_mode is deprecated and has no effect with --blocks_to_swap {n}; remove it.")
    return ResolvedSwap(n, tuple(messages))


def check_offload_options(*, blocks_to_swap: int | str | None, cpu_offload_checkpointing: bool = False,
                          unsloth_offload_checkpointing: bool = False) -> None:
    """Block swap and the two offloaded-checkpointing options exclude each other (flux, lumina
    and anima guides): both move data over the same bus at the same moments."""
    swap = blocks_to_swap not in (None, 0)
    swap_text = f"--blocks_to_swap {blocks_to_swap}"
    if swap and cpu_offload_checkpointing:
        raise ConfigError(f"{swap_text} cannot be used with --cpu_offload_checkpointing. "
                          "Keep one: block swap saves more memory; offloaded checkpointing is faster.")
    if swap and unsloth_offload_checkpointing:
        raise ConfigError(f"{swap_text} cannot be used with --unsloth_offload_checkpointing. Keep one of them.")
    if cpu_offload_checkpointing and unsloth_offload_checkpointing:
        raise ConfigError("--cpu_offload_checkpointing and --unsloth_offload_checkpointing are the same idea; "
                          "keep one (--unsloth_offload_checkpointing is the faster, asynchronous one).")


# ---------------------------------------------------------------------------------------------
# --blocks_to_swap auto

@dataclass(frozen=True)
class SwapList:
    """What one block list costs on the GPU: `swappable_bytes` per block (the matrices that
    move) and `num_blocks`."""

    num_blocks: int
    swappable_bytes: int


@dataclass(frozen=True)
class AutoSwap:
    blocks_to_swap: int
    fits: bool
    reason: str


# One block's working set during its backward, in units of its activations (see below).
RECOMPUTE_WORKING_SETS = 1.25


def estimate_activation_bytes(*, batch: int, tokens: int, hidden: int, mlp_hidden: int, num_blocks: int,
                              dtype_bytes: int = 2, gradient_checkpointing: bool = True,
                              streams_per_block: float = 1.0, kept_outputs_per_block: int = 0) -> int:
    """Activation memory of one training step of a DiT, from its dimensions.

    A transformer block keeps about 12 hidden-wide and 2 mlp-wide tensors per token for its
    backward (norm inputs, modulated inputs, q/k/v, roped q/k, attention output, residuals, MLP
    up and activation). With per-block checkpointing only each block's input is kept, plus one
    block's working set while its backward runs: its recomputed activations and the gradients
    alive with them, which its backward frees as it goes (FLUX.1-dev on an H200, 2026-12-02:
    2.03 GiB measured at 1024x1024 under 16 GiB caps with 18, 19 and 20 blocks swapped, against
    2.56 GiB when this counted the working set twice; RECOMPUTE_WORKING_SETS = 1.25 gives 2.16).
    `streams_per_block` > 1 for blocks whose input is several token-wide tensors;
    `kept_outputs_per_block`: hidden-wide tensors each block keeps beside its input under
    --selective_checkpointing (one per attention and one per MLP down-projection)."""
    tok = batch * tokens * dtype_bytes
    per_block = tok * (12 * hidden + 2 * mlp_hidden)
    if not gradient_checkpointing:
        return num_blocks * per_block
    inputs = num_blocks * tok * hidden * (streams_per_block + kept_outputs_per_block)
    return int(inputs + RECOMPUTE_WORKING_SETS * per_block)


def choose_blocks_to_swap(*, free_bytes: int, lists: Sequence[SwapList], fixed_bytes: int, activation_bytes: int,
                          margin_bytes: int = GiB, max_n: int | None = None) -> AutoSwap:
    """The smallest --blocks_to_swap that fits, with the reason in words.

    Needed at n = fixed (everything that never moves: embedders, vectors, LoRA and optimizer
    state) + activations + the block weights that stay on the GPU + a margin for allocator
    fragmentation and library workspaces. `free_bytes` is what the process may still allocate."""
    depths = [sl.num_blocks for sl in lists]
    limit = max_blocks_to_swap(depths) if max_n is None else max_n

    def resident(n: int) -> int:
        return sum((sl.num_blocks - k) * sl.swappable_bytes for sl, k in zip(lists, blocks_per_list(n, depths)))

    def need(n: int) -> int:
        return fixed_bytes + activation_bytes + resident(n) + margin_bytes

    def gib(b: int) -> str:
        return f"{b / GiB:.2f} GiB"

    common = (f"fixed {gib(fixed_bytes)} + activations ~{gib(activation_bytes)} + margin {gib(margin_bytes)}; "
              f"free {gib(free_bytes)}")
    for n in range(limit + 1):
        if need(n) <= free_bytes:
            if n == 0:
                reason = (f"--blocks_to_swap auto: 0 (no swap): all block weights fit ({gib(resident(0))}); {common}")
            else:
                reason = (f"--blocks_to_swap auto: {n} of at most {limit}: block weights on the GPU "
                          f"{gib(resident(n))} (at {n - 1}: {gib(resident(n - 1))}, {gib(need(n - 1) - free_bytes)} "
                          f"too much); {common}")
            return AutoSwap(n, True, reason)
    reason = (f"--blocks_to_swap auto: even the maximum {limit} needs {gib(need(limit))} ({common}); it will "
              "probably run out of memory. Lower the resolution or batch size, or add --fp8_base.")
    return AutoSwap(limit, False, reason)


# ---------------------------------------------------------------------------------------------
# The swapper.

@dataclass
class SwapStats:
    loads: int = 0              # blocks copied to the GPU
    bytes_loaded: int = 0
    fallback_loads: int = 0     # loads not made ahead of time (0 when the schedule works)
    restores: int = 0           # passes that began away from the canonical placement


@dataclass(eq=False)
class _Block:
    index: int
    module: nn.Module
    tensors: list[Tensor] = field(default_factory=list)   # the parameters / buffers that move
    home: list[Tensor] = field(default_factory=list)      # their permanent (pinned) CPU copies
    resident: bool = True
    ready: object | None = None                           # CUDA event: its last load finished


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class BlockSwapper:
    """Block swap for one nn.ModuleList. Usually made by `BlockSwap`, which handles a model's
    lists together; use this directly for a single list.

    `device` is the compute device. On a CPU device the same bookkeeping runs with plain copies
    (used by the tests); on CUDA the copies are asynchronous on `stream`."""

    def __init__(self, blocks: nn.ModuleList, blocks_to_swap: int, device: torch.device | str, *,
                 stream: "torch.cuda.Stream | None" = None):
        n_blocks = len(blocks)
        if not 0 <= blocks_to_swap < n_blocks:
            raise ValueError(f"blocks_to_swap must be in [0, {n_blocks - 1}] for a list of {n_blocks} blocks, "
                             f"got {blocks_to_swap}")
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        if self.is_cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.n = blocks_to_swap
        self.stats = SwapStats()
        # Blocks that ever leave the GPU, in rotation order; the first `window` of them are on
        # the GPU in the canonical placement.
        self.rotating = sorted(set(range(blocks_to_swap)) | set(range(n_blocks - blocks_to_swap, n_blocks)))
        self.window = len(self.rotating) - blocks_to_swap
        self.position = {b: k for k, b in enumerate(self.rotating)}
        self.blocks = [_Block(i, m) for i, m in enumerate(blocks)]
        self.names: list[str] = []
        self.stream = stream
        self.compute_stream = None
        self._handles: list = []
        self._bwd_last: int | None = None
        self._bwd_callback_queued = False
        self._prepared = False

    # -- setup --------------------------------------------------------------------------

    def swappable_names(self) -> list[str]:
        """Names of the tensors that move: frozen matrices present with the same shape and dtype
        in every rotating block (blocks of one list may differ a little, e.g. SD3's last)."""
        if not self.rotating:
            return []
        common = None
        for b in self.rotating:
            sig = {}
            for name, t in _named_tensors(self.blocks[b].module):
                if t.ndim < 2:
                    continue
                if t.requires_grad:
                    raise ConfigError(f"block swap moves frozen weights only, but {name} in block {b} is trainable. "
                                      "Train a LoRA (the base model frozen) or remove --blocks_to_swap.")
                sig[name] = (tuple(t.shape), t.dtype)
            common = sig if common is None else {k: v for k, v in common.items() if sig.get(k) == v}
        return sorted(common)

    def owned_tensors(self) -> set[int]:
        """ids of the tensors this swapper places (everything else is the caller's to move)."""
        return {id(t) for b in self.rotating for t in self.blocks[b].tensors}

    def prepare(self) -> None:
        """Make the permanent CPU copies and the GPU buffers and install the hooks. Tensors of
        the rotating blocks that do not move are left where they are (see `BlockSwap`)."""
        if self._prepared:
            raise RuntimeError("this block swapper is already prepared")
        self.names = self.swappable_names()
        pin = self.is_cuda
        if self.is_cuda and self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        for k, b in enumerate(self.rotating):
            block = self.blocks[b]
            tensors = dict(_named_tensors(block.module))
            block.tensors = [tensors[n] for n in self.names]
            block.home = [_host_copy(t, pin) for t in block.tensors]
            block.resident = k < self.window
            for t, home in zip(block.tensors, block.home):
                if block.resident:
                    if t.device != self.device or not _owns_storage(t):
                        t.data = home.to(self.device, non_blocking=pin, copy=True)
                    # else: the tensor already on the device becomes this block's buffer
                else:
                    t.data = self._offloaded(home)
        if self.is_cuda:
            torch.cuda.current_stream(self.device).synchronize()
        self._install_hooks()
        self._prepared = True

    def _install_hooks(self) -> None:
        for block in self.blocks:
            self._handles.append(block.module.register_forward_pre_hook(self._pre_hook(block.index), with_kwargs=True))
            self._handles.append(block.module.register_forward_hook(self._post_hook(block.index), with_kwargs=True,
                                                                     always_call=True))

    def remove(self) -> None:
        """Remove the hooks and leave every moving weight on the CPU (its pinned copy), so the
        caller may place the model freely."""
        self.synchronize()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for b in self.rotating:
            block = self.blocks[b]
            for t, home in zip(block.tensors, block.home):
                t.data = home
            block.resident = False
        self._prepared = False

    def _offloaded(self, home: Tensor) -> Tensor:
        """What an offloaded weight points at: its CPU copy (a test may substitute a poison)."""
        return home

    # -- queries ------------------------------------------------------------------------

    def placement(self) -> list[bool]:
        """Per block: True when its moving weights are on the compute device."""
        return [self.blocks[i].resident if i in self.position else True for i in range(len(self.blocks))]

    def canonical(self) -> list[bool]:
        return [i not in self.position or self.position[i] < self.window for i in range(len(self.blocks))]

    def device_buffers(self) -> set[int]:
        """data_ptrs of the GPU buffers in use (constant over a run: buffers are reused)."""
        return {t.data_ptr() for b in self.rotating if self.blocks[b].resident for t in self.blocks[b].tensors}

    def synchronize(self) -> None:
        if self.is_cuda and self.stream is not None:
            self.stream.synchronize()

    # -- moving -------------------------------------------------------------------------

    def _move(self, out_index: int, in_index: int) -> None:
        """Block out_index leaves the GPU; block in_index is copied into its buffers."""
        out_b, in_b = self.blocks[out_index], self.blocks[in_index]
        assert out_b.resident and not in_b.resident, (out_index, in_index)
        buffers = [t.data for t in out_b.tensors]
        for t, home in zip(out_b.tensors, out_b.home):
            t.data = self._offloaded(home)
        out_b.resident = False
        if self.is_cuda:
            compute = self.compute_stream or torch.cuda.current_stream(self.device)
            self.stream.wait_stream(compute)  # the compute that read the buffers is done first
            with torch.cuda.stream(self.stream):
                for buf, home in zip(buffers, in_b.home):
                    buf.copy_(home, non_blocking=True)
                if in_b.ready is None:
                    in_b.ready = torch.cuda.Event()
                in_b.ready.record(self.stream)
        else:
            for buf, home in zip(buffers, in_b.home):
                buf.copy_(home)
        for t, buf in zip(in_b.tensors, buffers):
            t.data = buf
        in_b.resident = True
        self.stats.loads += 1
        self.stats.bytes_loaded += sum(h.numel() * h.element_size() for h in in_b.home)

    def _try_move(self, out_index: int, in_index: int) -> None:
        """A scheduled move; skipped when the placement is not what the schedule expects (a
        pass that ended early): `_wait` and `_begin_pass` put things right then."""
        if self.blocks[out_index].resident and not self.blocks[in_index].resident:
            self._move(out_index, in_index)

    def _wait(self, index: int) -> None:
        """The compute stream waits until block `index` is on the GPU; loads it if it is not."""
        block = self.blocks[index]
        if index not in self.position:
            return
        if not block.resident:
            self.stats.fallback_loads += 1
            self._move(self._victim(index), index)
        if self.is_cuda and block.ready is not None:
            (self.compute_stream or torch.cuda.current_stream(self.device)).wait_event(block.ready)

    def _victim(self, needed: int) -> int:
        """A block to make room for `needed`, least likely to be needed soon."""
        resident = [b for b in self.rotating if self.blocks[b].resident and b != needed]
        if _in_backward():  # backward walks down: blocks above `needed` are done
            above = [b for b in resident if b > needed]
            return max(above) if above else min(resident)
        below = [b for b in resident if b < needed]
        return min(below) if below else max(resident)

    def restore_canonical(self) -> None:
        """Bring the placement back to the canonical one (asynchronously)."""
        want = [b for b in self.rotating[: self.window] if not self.blocks[b].resident]
        spare = [b for b in self.rotating[self.window:] if self.blocks[b].resident]
        for out_index, in_index in zip(spare, want):
            self._move(out_index, in_index)

    # -- hooks --------------------------------------------------------------------------

    def _pre_hook(self, index: int):
        def hook(module, args, kwargs):
            if _in_backward():           # recomputation for gradient checkpointing
                self._wait(index)
                return None
            if index == 0:
                self._begin_pass()
            self._wait(index)
            if torch.is_grad_enabled() and torch._C._autograd._top_saved_tensors_default_hooks(False) is None:
                # Not checkpointed: what autograd saves must not pin this block's buffers.
                ctx = torch.autograd.graph.saved_tensors_hooks(*self._saved_weight_hooks(index))
                ctx.__enter__()
                module._block_swap_saved_hooks = ctx
            return None
        return hook

    def _post_hook(self, index: int):
        def hook(module, args, kwargs, output):
            ctx = module.__dict__.pop("_block_swap_saved_hooks", None)
            if ctx is not None:
                ctx.__exit__(None, None, None)
            if _in_backward():
                return None
            outputs = [t for t in tree_flatten(output)[0] if isinstance(t, Tensor) and t.requires_grad]
            for t in outputs:
                t.register_hook(self._backward_hook(index))
            if index in self.position:
                k = self.position[index]
                total = len(self.rotating)
                if k < self.n:
                    self._try_move(index, self.rotating[k + self.window])
                elif not outputs:  # forward-only: rotate on so the next pass starts canonical
                    self._try_move(index, self.rotating[(k + self.window) % total])
            return None
        return hook

    def _backward_hook(self, index: int):
        def hook(grad):
            self._on_backward_reached(index)
            return None
        return hook

    def _begin_pass(self) -> None:
        if self.is_cuda:
            self.compute_stream = torch.cuda.current_stream(self.device)
        self._bwd_last = None
        self._bwd_callback_queued = False
        if self.placement() != self.canonical():
            self.stats.restores += 1
            self.restore_canonical()

    def _on_backward_reached(self, index: int) -> None:
        """Backward has reached block `index`: every block after it is done with its weights."""
        if self._bwd_last == index:
            return  # a second output of the same block
        if not self._bwd_callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._bwd_callback_queued = True
        if self._bwd_last is not None and self._bwd_last > index:
            self._release_after_backward(self._bwd_last)
        self._bwd_last = index
        self._wait(index)

    def _release_after_backward(self, index: int) -> None:
        k = self.position.get(index)
        if k is not None and k >= self.window:
            self._try_move(index, self.rotating[k - self.window])

    def _end_of_backward(self) -> None:
        if self._bwd_last is not None:
            self._release_after_backward(self._bwd_last)
        self._bwd_last = None
        self._bwd_callback_queued = False
        self.restore_canonical()  # backward may stop early (no trainable layer below some block)

    def _saved_weight_hooks(self, index: int) -> tuple[Callable, Callable]:
        """saved_tensors_hooks that store a view of one of this block's moving weights as a
        reference, re-made from the block's buffers when backward unpacks it."""
        block = self.blocks[index]
        if index not in self.position:
            return (lambda t: t), (lambda t: t)
        storages = {t.untyped_storage().data_ptr(): j for j, t in enumerate(block.tensors)}

        def pack(t: Tensor):
            j = storages.get(t.untyped_storage().data_ptr()) if t.device == self.device else None
            if j is None:
                return t
            base = block.tensors[j].data
            return _WeightRef(j, tuple(t.shape), tuple(t.stride()), t.storage_offset() - base.storage_offset())

        def unpack(saved):
            if not isinstance(saved, _WeightRef):
                return saved
            base = block.tensors[saved.tensor].data
            return base.as_strided(saved.shape, saved.stride, base.storage_offset() + saved.offset)

        return pack, unpack


@dataclass(frozen=True)
class _WeightRef:
    tensor: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


class BlockSwap:
    """Block swap over a model's block lists, with one copy stream shared by all of them.

        swap = BlockSwap(device, [(model.double_blocks, 9), (model.single_blocks, 18)])
        swap.prepare(model)   # model (on the CPU) -> device, except the rotating weights
        ...                   # train / sample as usual: hooks do the rest
        swap.remove()

    Do not call `model.to(device)` afterwards (that would copy every block to the GPU).
    """

    def __init__(self, device: torch.device | str, lists: Sequence[tuple[nn.ModuleList, int]]):
        self.device = torch.device(device)
        stream = None
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            stream = torch.cuda.Stream(self.device)
        self.swappers = [BlockSwapper(blocks, n, self.device, stream=stream) for blocks, n in lists if n > 0]

    @property
    def stats(self) -> SwapStats:
        total = SwapStats()
        for s in self.swappers:
            for f in ("loads", "bytes_loaded", "fallback_loads", "restores"):
                setattr(total, f, getattr(total, f) + getattr(s.stats, f))
        return total

    def prepare(self, model: nn.Module | None = None) -> None:
        for s in self.swappers:
            s.prepare()
        if model is not None:
            owned = set().union(*(s.owned_tensors() for s in self.swappers))
            move_except(model, self.device, owned)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def remove(self) -> None:
        for s in self.swappers:
            s.remove()

    def synchronize(self) -> None:
        for s in self.swappers:
            s.synchronize()

    def pinned_bytes(self) -> int:
        return sum(h.numel() * h.element_size() for s in self.swappers for b in s.rotating for h in s.blocks[b].home)


def move_except(model: nn.Module, device: torch.device, skip: set[int]) -> None:
    """Move every parameter and buffer of `model` to `device` except those whose id is in
    `skip`, one tensor at a time (no second full copy of the model on either side)."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and id(p) not in skip and p.device != device:
                p.data = p.data.to(device)
        for name, b in module._buffers.items():
            if b is not None and id(b) not in skip and b.device != device:
                module._buffers[name] = b.to(device)


def _named_tensors(module: nn.Module) -> Iterable[tuple[str, Tensor]]:
    yield from module.named_parameters(recurse=True)
    yield from module.named_buffers(recurse=True)


def _owns_storage(t: Tensor) -> bool:
    """True when `t` is the whole of its storage (safe to reuse as a block buffer)."""
    return t.is_contiguous() and t.storage_offset() == 0 and \
        t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _host_copy(t: Tensor, pin: bool) -> Tensor:
    copy = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
    copy.copy_(t.detach())
    return copy


def swappable_bytes(blocks: nn.ModuleList) -> int:
    """Bytes of one block's frozen matrices (what moves per block), for `choose_blocks_to_swap`."""
    return max(sum(t.numel() * t.element_size() for _, t in _named_tensors(b) if t.ndim >= 2) for b in blocks)


__all__ = [
    "AutoSwap", "BlockSwap", "BlockSwapper", "ResolvedSwap", "SwapList", "SwapStats", "blocks_per_list",
    "check_blocks_to_swap", "check_offload_options", "choose_blocks_to_swap", "estimate_activation_bytes",
    "max_blocks_to_swap", "move_except", "parse_blocks_to_swap", "resolve_deprecated_swap_options",
    "swappable_bytes",
]
