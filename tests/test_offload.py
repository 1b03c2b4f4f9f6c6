"""Block swap (library/offload.py) on the CPU: options and limits, `auto`, the swap schedule
hook by hook, and a swapped tiny FLUX giving the unswapped outputs and LoRA gradients.

On the CPU the swapper runs its real bookkeeping with plain copies. The "offloaded" weights
point at NaN copies (PoisonedSwapper), so any block computed while swapped out would poison
the result: exact equality proves every block was in place when it ran, forward and backward.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from library.errors import ConfigError
from library.flux.sampling import prepare_img_ids, prepare_txt_ids
from library.fp8 import quantize_linears_
from library.offload import (
    GiB,
    BlockSwap,
    BlockSwapper,
    SwapList,
    blocks_per_list,
    check_blocks_to_swap,
    check_offload_options,
    choose_blocks_to_swap,
    estimate_activation_bytes,
    max_blocks_to_swap,
    parse_blocks_to_swap,
    resolve_deprecated_swap_options,
    swappable_bytes,
)
from library.tiny.flux import build_flux_model, tiny_flux_params
from networks import lora_flux

# ---------------------------------------------------------------------------------------------
# Helpers (also used by the GPU and fp8 tests).


class PoisonedSwapper(BlockSwapper):
    def _offloaded(self, home):
        return torch.full_like(home, float("nan"))


def poisoned_block_swap(device, lists) -> BlockSwap:
    swap = BlockSwap(device, [])
    stream = swap.swappers and None
    if swap.device.type == "cuda":
        stream = torch.cuda.Stream(swap.device)
    swap.swappers = [PoisonedSwapper(blocks, n, swap.device, stream=stream) for blocks, n in lists if n > 0]
    return swap


def tiny_flux_with_lora(depth=5, single=6, seed=0, device="cpu", dtype=torch.float32, network_args=None,
                        fp8=False):
    """A tiny FLUX.1-dev (5 double + 6 single blocks by default) with a rank-4 LoRA whose up
    weights are non-zero, so that every LoRA weight gets a gradient; `fp8` stores the block
    Linears in fp8 first (as --fp8_base does, before the LoRA)."""
    params = replace(tiny_flux_params("dev"), depth=depth, depth_single_blocks=single)
    model = build_flux_model(params, device=device, dtype=dtype, seed=seed).requires_grad_(False)
    if fp8:
        quantize_linears_(model, [model.double_blocks, model.single_blocks], compute_dtype=dtype)
    net = lora_flux.create_network(1.0, 4, 1.0, None, None, model, **(network_args or {}))
    net.apply_to(None, model, apply_text_encoder=False)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for m in net.loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=gen) * 0.1)
    net.to(device)
    return params, model, net


def flux_inputs(params, batch=1, h=2, w=2, n_txt=4, seed=1, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = dict(img=torch.randn(batch, h * w, 64, generator=g),
             txt=torch.randn(batch, n_txt, params.context_in_dim, generator=g), timesteps=torch.rand(batch, generator=g), y=torch.randn(batch, params.vec_in_dim, generator=g),
             guidance=torch.full((batch,), 3.5))
    x = {k: v.to(device=device, dtype=dtype) for k, v in x.items()}
    x.update(img_ids=prepare_img_ids(batch, h, w).to(device), txt_ids=prepare_txt_ids(batch, n_txt).to(device))
    return x


def train_step(model, net, x):
    """Forward + backward of a fixed loss; the output and the LoRA gradients."""
    out = model(**x)
    out.float().square().mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    return out.detach(), grads


def max_grad_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ---------------------------------------------------------------------------------------------
# Limits and options.


@pytest.mark.parametrize("depths, expected", [
    ((19, 38), 35),          # FLUX.1 / Chroma
    ((38,), 36),             # SD3.5 Large
    ((24,), 22),             # SD3.5 Medium
    ((26,), 24),             # Lumina Image 2.0 (main layers)
    ((28,), 26), ((36,), 34), ((20,), 18),   # Anima by depth
])
def test_max_blocks_to_swap_per_family(depths, expected):
    assert max_blocks_to_swap(depths) == expected


def test_flux_split_of_n_between_double_and_single_blocks():
    assert blocks_per_list(18, (19, 38)) == (9, 18)
    assert blocks_per_list(35, (19, 38)) == (17, 36)
    assert blocks_per_list(1, (19, 38)) == (0, 2)
    assert blocks_per_list(7, (28,)) == (7,)


def test_check_blocks_to_swap_refuses_too_many_with_the_limit():
    assert check_blocks_to_swap(35, (19, 38), "FLUX.1") == (17, 36)
    with pytest.raises(ConfigError, match=r"--blocks_to_swap 36 is too many for FLUX.1: at most 35"):
        check_blocks_to_swap(36, (19, 38), "FLUX.1")
    with pytest.raises(ConfigError, match="0 or more"):
        check_blocks_to_swap(-1, (28,), "Anima")


def test_parse_blocks_to_swap():
    assert parse_blocks_to_swap("auto") == "auto"
    assert parse_blocks_to_swap(" 12 ") == 12
    assert parse_blocks_to_swap(None) is None
    with pytest.raises(ConfigError, match="number of blocks or 'auto'"):
        parse_blocks_to_swap("many")


def test_deprecated_double_single_blocks_map_to_d_plus_s_half():
    r = resolve_deprecated_swap_options(None, double_blocks_to_swap=6, single_blocks_to_swap=9)
    assert r.blocks_to_swap == 10
    assert "deprecated" in r.messages[0] and "--blocks_to_swap 10" in r.messages[0]
    assert resolve_deprecated_swap_options(10, double_blocks_to_swap=6, single_blocks_to_swap=9).blocks_to_swap == 10
    with pytest.raises(ConfigError, match="conflicts with --blocks_to_swap 12"):
        resolve_deprecated_swap_options(12, double_blocks_to_swap=6, single_blocks_to_swap=9)


def test_deprecated_split_mode_means_18_unless_blocks_to_swap_is_given():
    r = resolve_deprecated_swap_options(None, split_mode=True)
    assert r.blocks_to_swap == 18 and "--split_mode is deprecated" in r.messages[0]
    r = resolve_deprecated_swap_options(8, split_mode=True)
    assert r.blocks_to_swap == 8 and "no effect" in r.messages[0]
    assert resolve_deprecated_swap_options(None) == resolve_deprecated_swap_options(None, split_mode=False)
    assert resolve_deprecated_swap_options(None).blocks_to_swap is None


def test_block_swap_refused_with_offloaded_checkpointing():
    with pytest.raises(ConfigError, match="--blocks_to_swap 8 cannot be used with --cpu_offload_checkpointing"):
        check_offload_options(blocks_to_swap=8, cpu_offload_checkpointing=True)
    with pytest.raises(ConfigError, match="cannot be used with --unsloth_offload_checkpointing"):
        check_offload_options(blocks_to_swap="auto", unsloth_offload_checkpointing=True)
    with pytest.raises(ConfigError, match="keep one"):
        check_offload_options(blocks_to_swap=None, cpu_offload_checkpointing=True, unsloth_offload_checkpointing=True)
    check_offload_options(blocks_to_swap=0, cpu_offload_checkpointing=True)
    check_offload_options(blocks_to_swap=8)


# ---------------------------------------------------------------------------------------------
# --blocks_to_swap auto


FLUX_LISTS = [SwapList(19, 680 * 2**20), SwapList(38, 283 * 2**20)]   # bf16 double / single block matrices


def test_auto_picks_the_smallest_n_that_fits():
    # All blocks: 19 * 680 + 38 * 283 MiB = 23.1 GiB; fixed 0.5, activations 2.5, margin 1 GiB.
    kw = dict(lists=FLUX_LISTS, fixed_bytes=GiB // 2, activation_bytes=5 * GiB // 2, margin_bytes=GiB)
    big = choose_blocks_to_swap(free_bytes=140 * GiB, **kw)
    assert big.blocks_to_swap == 0 and big.fits and "no swap" in big.reason

    card24 = choose_blocks_to_swap(free_bytes=23 * GiB, **kw)
    # Needs 27.1 GiB at 0; each unit of n frees 680 MiB: (27.1 - 23) / 0.664 -> 7 units.
    assert card24.blocks_to_swap == 7 and card24.fits
    need = lambda n: sum((sl.num_blocks - k) * sl.swappable_bytes  # noqa: E731
                         for sl, k in zip(FLUX_LISTS, blocks_per_list(n, (19, 38)))) + 4 * GiB
    assert need(7) <= 23 * GiB < need(6)
    assert card24.reason.startswith("--blocks_to_swap auto: 7 of at most 35")
    assert "free 23.00 GiB" in card24.reason and "activations ~2.50 GiB" in card24.reason

    card12 = choose_blocks_to_swap(free_bytes=11 * GiB, **kw)
    assert card12.fits and need(card12.blocks_to_swap) <= 11 * GiB < need(card12.blocks_to_swap - 1)


def test_auto_says_when_nothing_fits():
    out = choose_blocks_to_swap(free_bytes=4 * GiB, lists=FLUX_LISTS, fixed_bytes=GiB, activation_bytes=3 * GiB)
    assert out.blocks_to_swap == 35 and not out.fits
    assert "even the maximum 35" in out.reason and "--fp8_base" in out.reason


def test_activation_estimate_numbers():
    # FLUX at 1024x1024: 4096 image + 512 text tokens, bf16, 57 blocks.
    kw = dict(batch=1, tokens=4608, hidden=3072, mlp_hidden=12288, num_blocks=57)
    per_block = 4608 * 2 * (12 * 3072 + 2 * 12288)
    assert estimate_activation_bytes(**kw, gradient_checkpointing=False) == 57 * per_block
    ckpt = estimate_activation_bytes(**kw)
    assert ckpt == int(57 * 4608 * 2 * 3072 + 1.25 * per_block)
    # measured on an H200 (docs/benchmarks.md): 2.03 GiB; the estimate stays above it
    assert 2.03 * GiB < ckpt < 2.2 * GiB
    assert estimate_activation_bytes(**(kw | dict(batch=2))) == 2 * ckpt
    # --selective_checkpointing: FLUX keeps two more hidden-wide tensors per block (3 GiB)
    kept = estimate_activation_bytes(**kw, kept_outputs_per_block=2) - ckpt
    assert kept == 2 * 57 * 4608 * 2 * 3072 and 2.9 * GiB < kept < 3.1 * GiB


def test_swappable_bytes_of_a_block_list():
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16)) for _ in range(3))
    assert swappable_bytes(blocks) == 8 * 16 * 4   # the matrix only; bias and norm stay


# ---------------------------------------------------------------------------------------------
# The schedule, hook by hook.


class ToyBlock(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)

    def forward(self, x):
        return x + self.b(torch.tanh(self.a(x)))


class ToyModel(nn.Module):
    def __init__(self, n, ckpt=False):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(ToyBlock() for _ in range(n))
        self.head = nn.Linear(8, 8)
        self.ckpt = ckpt
        self.requires_grad_(False)

    def forward(self, x):
        for block in self.blocks:
            if self.ckpt and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(x)


def _trace(swapper: BlockSwapper, blocks: nn.ModuleList) -> list:
    """Records (phase, block, placement as 'T'/'F' string) when each block starts, after the
    swapper's own hooks (hooks run in the order they were registered)."""
    log = []

    def fmt():
        return "".join("T" if p else "F" for p in swapper.placement())

    for i, block in enumerate(blocks):
        def pre(module, args, i=i):
            phase = "re" if torch._C._current_graph_task_id() != -1 else "fwd"
            log.append((phase, i, fmt()))

        def post(module, args, out, i=i):
            if torch._C._current_graph_task_id() == -1 and out.requires_grad:
                out.register_hook(lambda g, i=i: log.append(("bwd", i, fmt())))

        block.register_forward_pre_hook(pre)
        block.register_forward_hook(post)
    return log


def _schedule(n_blocks, n_swap, *, ckpt=False, grad=True):
    model = ToyModel(n_blocks, ckpt)
    x = torch.randn(2, 8, requires_grad=grad)
    ref = model(x)
    ref.sum().backward() if grad else None
    ref_grad = x.grad.clone() if grad else None
    x.grad = None
    swapper = PoisonedSwapper(model.blocks, n_swap, "cpu")
    swapper.prepare()
    buffers = swapper.device_buffers()
    log = _trace(swapper, model.blocks)
    with torch.set_grad_enabled(grad):
        out = model(x)
        if grad:
            out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    if grad:
        torch.testing.assert_close(x.grad, ref_grad, rtol=0, atol=0)
    assert swapper.placement() == swapper.canonical()
    assert swapper.device_buffers() == buffers          # the same buffers, reused: nothing allocated
    assert swapper.stats.fallback_loads == 0
    return log, swapper


def test_training_schedule_rotates_the_last_n_blocks_through_the_first_ones():
    log, swapper = _schedule(6, 2)
    assert log == [
        ("fwd", 0, "TTTTFF"), ("fwd", 1, "FTTTTF"), ("fwd", 2, "FFTTTT"), ("fwd", 3, "FFTTTT"),
        ("fwd", 4, "FFTTTT"), ("fwd", 5, "FFTTTT"),
        ("bwd", 5, "FFTTTT"), ("bwd", 4, "FTTTTF"), ("bwd", 3, "TTTTFF"), ("bwd", 2, "TTTTFF"),
        ("bwd", 1, "TTTTFF"), ("bwd", 0, "TTTTFF"),
    ]
    assert swapper.stats.loads == 4       # 2N per step: N in forward, N in backward


def test_training_schedule_with_gradient_checkpointing_recomputes_blocks_in_place():
    log, _ = _schedule(6, 2, ckpt=True)
    assert [e for e in log if e[0] == "fwd"][:2] == [("fwd", 0, "TTTTFF"), ("fwd", 1, "FTTTTF")]
    recomputed = [(i, p) for phase, i, p in log if phase == "re"]
    assert [i for i, _ in recomputed] == [5, 4, 3, 2, 1, 0]
    assert all(p[i] == "T" for i, p in recomputed)


def test_swapping_more_than_half_the_blocks():
    log, swapper = _schedule(5, 3)
    assert [p for phase, _, p in log if phase == "fwd"] == ["TTFFF", "FTTFF", "FFTTF", "FFFTT", "FFFTT"]
    assert [p for phase, _, p in log if phase == "bwd"] == ["FFFTT", "FFTTF", "FTTFF", "TTFFF", "TTFFF"]
    assert swapper.stats.loads == 6


def test_forward_only_rotates_back_to_the_canonical_placement():
    log, swapper = _schedule(6, 2, grad=False)
    assert [p for _, _, p in log] == ["TTTTFF", "FTTTTF", "FFTTTT", "FFTTTT", "FFTTTT", "TFTTFT"]
    assert swapper.stats.loads == 4


def test_an_interrupted_pass_is_put_right_at_the_next_one():
    model = ToyModel(6)
    x = torch.randn(2, 8, requires_grad=True)
    ref = model(x)
    swapper = PoisonedSwapper(model.blocks, 2, "cpu")
    swapper.prepare()
    model(x)                      # forward with grad, never backpropagated
    assert swapper.placement() != swapper.canonical()
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    assert swapper.stats.restores == 1 and swapper.stats.fallback_loads == 0


def test_trainable_weights_in_swapped_blocks_are_refused():
    model = ToyModel(4)
    model.blocks[3].a.weight.requires_grad_(True)
    with pytest.raises(ConfigError, match=r"a.weight in block 3 is trainable"):
        BlockSwapper(model.blocks, 1, "cpu").prepare()


def test_blocks_that_differ_keep_their_odd_tensors_resident():
    model = ToyModel(4)
    model.blocks[3].extra = nn.Linear(8, 8).requires_grad_(False)   # only the last block has it
    x = torch.randn(2, 8)
    ref = model(x)
    swapper = PoisonedSwapper(model.blocks, 2, "cpu")
    swapper.prepare()
    assert swapper.names == ["a.weight", "b.weight"]
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_remove_leaves_weights_on_the_cpu_copies_and_unhooks():
    model = ToyModel(4)
    x = torch.randn(2, 8)
    ref = model(x)
    swapper = BlockSwapper(model.blocks, 2, "cpu")
    swapper.prepare()
    swapper.remove()
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    assert swapper.stats.loads == 0
    assert all(len(b._forward_pre_hooks) == 0 and len(b._forward_hooks) == 0 for b in model.blocks)


def test_blocks_to_swap_range():
    with pytest.raises(ValueError, match=r"in \[0, 3\]"):
        BlockSwapper(ToyModel(4).blocks, 4, "cpu")


# ---------------------------------------------------------------------------------------------
# A whole tiny FLUX with LoRA: swapped == unswapped.


@pytest.mark.parametrize("ckpt", [True, False], ids=["grad_ckpt", "no_ckpt"])
def test_swapped_flux_matches_unswapped_outputs_and_lora_grads(ckpt):
    params, model, net = tiny_flux_with_lora()
    if ckpt:
        model.enable_gradient_checkpointing()
    x = flux_inputs(params)
    ref_out, ref_grads = train_step(model, net, x)
    with torch.no_grad():
        ref_sample = model(**x)

    swap = poisoned_block_swap("cpu", [(model.double_blocks, 2), (model.single_blocks, 4)])
    swap.prepare(model)
    for _ in range(2):                                   # the second step starts where the first ended
        out, grads = train_step(model, net, x)
        assert torch.equal(out, ref_out)
        assert max_grad_diff(grads, ref_grads) == 0.0
        assert all(s.placement() == s.canonical() for s in swap.swappers)
    with torch.no_grad():                                # sampling / validation: forward only
        for _ in range(2):
            assert torch.equal(model(**x), ref_sample)
    stats = swap.stats
    assert stats.fallback_loads == 0 and stats.restores == 0
    # 2 steps x 2N loads per list + 2 forward-only passes x rotating blocks (4 double, 6 single).
    assert stats.loads == 2 * (4 + 8) + 2 * (4 + 6)


def test_lora_only_on_single_blocks_runs_double_blocks_forward_only():
    params, model, net = tiny_flux_with_lora(network_args={"train_blocks": "single"})
    model.enable_gradient_checkpointing()
    x = flux_inputs(params)
    ref_out, ref_grads = train_step(model, net, x)
    swap = poisoned_block_swap("cpu", [(model.double_blocks, 2), (model.single_blocks, 4)])
    swap.prepare(model)
    out, grads = train_step(model, net, x)
    assert torch.equal(out, ref_out) and max_grad_diff(grads, ref_grads) == 0.0
    double, single = swap.swappers
    assert double.stats.loads == 4 and single.stats.loads == 8    # double: one rotation, no backward
    assert swap.stats.fallback_loads == 0


def test_prepare_moves_everything_but_the_rotating_weights():
    params, model, _ = tiny_flux_with_lora()
    swap = BlockSwap("cpu", [(model.double_blocks, 2), (model.single_blocks, 4)])
    swap.prepare(model)
    double = swap.swappers[0]
    assert double.rotating == [0, 1, 3, 4] and double.window == 2
    assert "img_attn.qkv.weight" in double.names and "img_attn.qkv.bias" not in double.names
    # Each rotating block keeps a CPU copy; the GPU holds the first B - N blocks' buffers.
    assert swap.pinned_bytes() == 4 * swappable_bytes(model.double_blocks) + 6 * swappable_bytes(model.single_blocks)
    assert len(double.device_buffers()) == 2 * len(double.names)
