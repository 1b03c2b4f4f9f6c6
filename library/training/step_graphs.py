"""--cuda_graph: the whole training step (forward, backward, gradient clipping, optimizer update)
recorded once per input shape as a CUDA graph, then replayed.

Why: at batch 1 an eager LoRA step launches ten thousand small kernels, and the GPU waits on
the Python that launches them (FLUX.1-dev on an H200: busy 0.56 of 0.76 s). A replay launches
the recorded kernels in one call: 0.59 s for FLUX, SD3.5 Large 0.66 -> 0.34 s, Anima 0.50 ->
0.17 s (docs/benchmarks.md).

How, per input shape (the latents', text outputs', masks' shapes and dtypes, plus what the
caller adds to the key, e.g. the LoRA multiplier, which the recording keeps as a constant):
  1st step of the shape: eager (it also compiles with --torch_compile, and tunes kernels);
  2nd step: eager again with CUDA's synchronisation check on: anything in the step that waits
     for the GPU (reading a value to Python) cannot be recorded, and would otherwise fail the
     recording obscurely; it turns graphs off with a note naming the place instead;
  3rd step: recorded into static input buffers (one memory pool shared by every shape: shapes
     never run at once, and nothing recorded outlives its replay but the loss, copied out),
     then replayed; from then on each step copies its batch into the buffers and replays.
A recording that fails turns graphs off with a note too; the run goes on eagerly. After
MAX_GRAPHS shapes, new shapes run eagerly.

What the recorded step must not do (the trainer refuses those options up front:
`cuda_graph_problems`): read GPU values to Python, draw random numbers on the CPU, or
change Python-side settings per step. Random numbers drawn on the GPU are fine: each replay
draws new ones from the generator, in the same order as the eager step.
"""

from __future__ import annotations

import argparse
import os
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch

from library.errors import ConfigError

MAX_GRAPHS = 32   # recorded shapes at most; a dataset with more buckets runs the rest eagerly
# --optimizer_type values whose PyTorch optimizer can be recorded (capturable=True)
CAPTURABLE_OPTIMIZERS = ("adamw", "adam", "torch.optim.adamw", "torch.optim.adam")

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cuda_graph_problems(args: argparse.Namespace, family_problems: list[str] = ()) -> list[str]:
    """Why this run's step cannot be recorded, one line each (empty: it can). `family_problems`:
    the family trainer's own (NetworkTrainer.cuda_graph_blockers)."""
    if not getattr(args, "cuda_graph", False):
        return []
    problems = list(family_problems)
    a = lambda name, default=None: getattr(args, name, default)   # noqa: E731 - families differ in options
    checks = [
        (a("mixed_precision") == "fp16" or a("full_fp16"), "fp16 (its loss scaler reads the gradients' finiteness to "
                                                            "Python each step); use --mixed_precision bf16"),
        (a("blocks_to_swap") not in (None, 0, "0"), "--blocks_to_swap (the swap schedule runs in Python)"),
        (a("cpu_offload_checkpointing") or a("unsloth_offload_checkpointing"), "offloaded checkpointing (host copies)"),
        (a("multires_noise_iterations"), "--multires_noise_iterations (draws on the CPU)"),
        (a("noise_offset_random_strength"), "--noise_offset_random_strength (draws on the CPU)"),
        (a("ip_noise_gamma_random_strength"), "--ip_noise_gamma_random_strength (draws on the CPU)"),
        (a("scale_weight_norms"), "--scale_weight_norms"),
        (not (a("cache_latents") or a("cache_latents_to_disk")), "latents encoded each step: add --cache_latents"),
        (not (a("cache_text_encoder_outputs") or a("cache_text_encoder_outputs_to_disk")),
         "text encoded each step: add --cache_text_encoder_outputs (text-encoder LoRA cannot be recorded yet)"),
        ((a("optimizer_type") or "adamw").lower() not in CAPTURABLE_OPTIMIZERS
         or a("use_8bit_adam") or a("use_lion_optimizer"),
         f"--optimizer_type {a('optimizer_type')}: only PyTorch's AdamW and Adam can be recorded"),
        ("module_dropout" in " ".join(a("network_args") or []), "network_args module_dropout (draws on the CPU)"),
        (a("lr_scheduler_type"), "--lr_scheduler_type (a recorded step reads its learning rate from GPU memory, "
                                 "which only the built-in schedules update)"),
    ]
    problems += [why for bad, why in checks if bad]
    return problems


def check_cuda_graph_args(args: argparse.Namespace, family_problems: list[str] = ()) -> None:
    problems = cuda_graph_problems(args, family_problems)
    if problems:
        raise ConfigError("--cuda_graph records the training step as one CUDA graph; these options prevent that "
                          "(remove them, or remove --cuda_graph):\n  " + "\n  ".join(problems))


def cuda_graph_tip(args: argparse.Namespace, family_problems: list[str], device: torch.device | str,
                   num_processes: int) -> str | None:
    """A one-line tip when a run without --cuda_graph could use it (one CUDA GPU, nothing that
    prevents recording), else None."""
    if args.cuda_graph or torch.device(device).type != "cuda" or num_processes != 1:
        return None
    if cuda_graph_problems(argparse.Namespace(**{**vars(args), "cuda_graph": True}), family_problems):
        return None
    return ("tip: this run can use --cuda_graph, which records the step once and replays it (FLUX.1-dev on an "
            "H200: 0.76 -> 0.59 s/step; docs/cuda_graph.md)")


def learning_rates_on_device(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """A recorded optimizer step reads its learning rate from GPU memory, so that the scheduler's
    changes (made in place: PyTorch's schedulers fill a tensor learning rate) reach the replays.
    Call before the scheduler is built, and again after loading a saved optimizer state. The
    scheduler's base rates stay Python floats (its state, saved with checkpoints, too)."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", float(group["lr"]))
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def learning_rates_on_host(optimizer: torch.optim.Optimizer) -> None:
    """Back to float learning rates (a run without --cuda_graph resuming a state saved with it)."""
    for group in optimizer.param_groups:
        for key in ("lr", "initial_lr"):
            if isinstance(group.get(key), torch.Tensor):
                group[key] = float(group[key])


def _flatten(tree: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        return [(prefix, tree)]
    if isinstance(tree, dict):
        return [item for k in sorted(tree) for item in _flatten(tree[k], f"{prefix}/{k}" if prefix else k)]
    raise TypeError(f"step inputs hold tensors and dicts of them, not {type(tree).__name__} at {prefix or '/'}")


def _rebuild(tree: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    if isinstance(tree, torch.Tensor):
        return tensors[prefix]
    return {k: _rebuild(v, tensors, f"{prefix}/{k}" if prefix else k) for k, v in tree.items()}


def _where_in_our_code(tb) -> str:
    """The innermost frame of the traceback inside this repository: where the step synchronised."""
    ours = [f for f in traceback.extract_tb(tb) if f.filename.startswith(_REPO) and f.filename != __file__]
    if not ours:
        return "inside PyTorch"
    f = ours[-1]
    return f"{os.path.relpath(f.filename, _REPO)}:{f.lineno} ({f.name}: {f.line})"


class CudaRecorder:
    """What StepGraphs asks of CUDA (a test passes a stand-in with the same three methods)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._pool = None

    @contextmanager
    def sync_check(self):
        """Inside: an operation that makes the host wait for the GPU raises RuntimeError."""
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def record(self, fn: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
        """fn's kernels recorded, not run: (replay, fn's outputs, refilled by each replay)."""
        torch.cuda.synchronize(self.device)
        if self._pool is None:
            torch.cuda.empty_cache()   # the eager steps' cached blocks: the recording's pool needs the memory
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = fn()
        return graph.replay, out

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def release(self) -> None:
        """After the recordings are dropped: return their pool's memory."""
        self._pool = None
        torch.cuda.empty_cache()


@dataclass
class _Recorded:
    replay: Callable[[], None]
    inputs: dict[str, torch.Tensor]    # the static buffers each step's batch is copied into
    loss: torch.Tensor


class StepGraphs:
    """`graphs(inputs, key)` runs one training step: `step(inputs, key) -> loss` (the loss after the
    whole update) eagerly or by replaying its recording, as the module docstring says.
    `inputs`: tensors (or dicts of them) the step reads; `key`: hashable values the step bakes
    in. `reset()` is called after a failed check or recording, before the step reruns eagerly
    (e.g. to drop gradients the aborted step left)."""

    def __init__(self, step: Callable[[Any, tuple], torch.Tensor], device: torch.device, *,
                 reset: Callable[[], None] = lambda: None, note: Callable[[str], None] = print,
                 max_graphs: int = MAX_GRAPHS, recorder: Any = None):
        self._step, self._device, self._reset, self._note = step, torch.device(device), reset, note
        self._max = max_graphs
        self._recorder = recorder if recorder is not None else CudaRecorder(self._device)
        self._eager_runs: dict[tuple, int] = {}
        self._recorded: dict[tuple, _Recorded] = {}
        self.disabled_because: str | None = None
        self.replays = 0

    @property
    def recorded_shapes(self) -> int:
        return len(self._recorded)

    def __call__(self, inputs: Any, key: tuple = ()) -> torch.Tensor:
        flat = _flatten(inputs)
        full_key = (tuple(key), tuple((p, tuple(t.shape), t.dtype) for p, t in flat))
        recorded = self._recorded.get(full_key)
        if recorded is not None:
            return self._replay(recorded, flat)
        # On the device before the step: its own copies would be no-ops then, and a blocking copy
        # from the host is not mistaken for the step synchronising in the checked run.
        on_device = {p: t.to(self._device, non_blocking=True) for p, t in flat}
        inputs = _rebuild(inputs, on_device)
        flat = [(p, on_device[p]) for p, _ in flat]
        if self.disabled_because is not None or len(self._recorded) >= self._max:
            return self._step(inputs, key)
        runs = self._eager_runs.get(full_key, 0)
        self._eager_runs[full_key] = runs + 1
        if runs == 0:
            return self._step(inputs, key)
        if runs == 1:
            return self._checked_step(inputs, key)
        recorded = self._record(inputs, key, flat)
        if recorded is None:
            return self._step(inputs, key)
        self._recorded[full_key] = recorded
        return self._replay(recorded, flat)

    # ---- the three ways a step runs ---------------------------------------------------------
    def _checked_step(self, inputs: Any, key: tuple) -> torch.Tensor:
        try:
            with self._recorder.sync_check():
                return self._step(inputs, key)
        except RuntimeError as e:
            if "synchronizing" not in str(e):
                raise
            where = _where_in_our_code(e.__traceback__)
        self.turn_off(f"the step reads a GPU value to Python at {where}, which a recording cannot hold")
        return self._step(inputs, key)

    def _record(self, inputs: Any, key: tuple, flat: list[tuple[str, torch.Tensor]]) -> _Recorded | None:
        static = {p: torch.empty(t.shape, dtype=t.dtype, device=self._device) for p, t in flat}
        for p, t in flat:
            static[p].copy_(t, non_blocking=True)
        try:
            replay, loss = self._recorder.record(lambda: self._step(_rebuild(inputs, static), key))
        except Exception as e:   # noqa: BLE001 - any failure to record: go on eagerly, say why
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.turn_off(f"recording the step failed ({type(e).__name__}: {first}) at "
                           f"{_where_in_our_code(e.__traceback__)}")
            return None
        self._note(f"--cuda_graph: step recorded for input shape {len(self._recorded) + 1} "
                   f"({', '.join(f'{p} {tuple(t.shape)}' for p, t in flat[:2])}, ...)")
        return _Recorded(replay, static, loss)

    def _replay(self, recorded: _Recorded, flat: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
        for p, t in flat:
            recorded.inputs[p].copy_(t, non_blocking=True)
        recorded.replay()
        self.replays += 1
        return recorded.loss.clone()   # the next replay overwrites the recorded loss

    def turn_off(self, why: str) -> None:
        """No more recording or replaying: every later step runs eagerly (reset() is called)."""
        self.disabled_because = why
        self._reset()
        self._recorder.synchronize()
        self._recorded.clear()   # their memory pool goes back to the allocator
        self._recorder.release()
        self._note(f"note: --cuda_graph is off for the rest of the run: {why}. Training goes on without it.")
