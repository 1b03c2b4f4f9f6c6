"""--torch_compile with --selective_checkpointing for SD3, Lumina, Anima and Chroma (FLUX is in
tests/test_block_checkpointing.py): each family's blocks, compiled as its trainer compiles them,
run through library/block_checkpointing.py's compiled checkpoint, whose policy must see the
traced matmuls (it keeps the width-reducing ones) and change neither the output nor the LoRA
gradients of plain checkpointing. Tiny float32 models with a LoRA on the CPU; aot_eager runs
the same selective-checkpoint graph transformation as inductor, without its slow codegen."""

from __future__ import annotations

import functools
import importlib
from dataclasses import replace

import pytest
import torch
from torch.utils.checkpoint import create_selective_checkpoint_contexts

from library import block_checkpointing as bc
from library.tiny.anima import build_anima_model, tiny_anima_params
from library.tiny.flux import build_flux_model, tiny_flux_params
from library.tiny.lumina import build_lumina_model, tiny_lumina_params
from library.tiny.sd3 import build_mmdit, tiny_sd3_params
from library.training.trainer import FamilyModels, compile_blocks
from networks import lora_anima, lora_flux, lora_lumina, lora_sd3
from tests.test_lora_lumina import randomize as nonzero_lora_ups
from tests.test_lumina_model import _inputs as lumina_inputs
from tests.test_offload import flux_inputs, max_grad_diff, train_step
from tests.test_sd3_model import _inputs as sd3_inputs

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _sd3():
    # 2 joint blocks: one with x_block.attn2 (SD3.5 M), the last one's context stream pre-only
    params = replace(tiny_sd3_params("5-medium"), depth=2, x_block_self_attn_layers=(0,))
    model = build_mmdit(params)
    return model, lora_sd3, sd3_inputs(params, 1, 8, 8, 5, seed=1)


def _lumina():
    # the refiners stay outside the block lists (eager selective checkpoints) beside the compiled layers
    params = replace(tiny_lumina_params(), n_refiner_layers=1)
    model = build_lumina_model(params)
    x, t, cap, mask = lumina_inputs(params, 1, 4, 4, 6, [4], seed=1)
    return model, lora_lumina, dict(x=x, t=t, cap_feats=cap, cap_mask=mask)


def _anima():
    params = tiny_anima_params(num_blocks=2)
    model = build_anima_model(params)
    g = torch.Generator().manual_seed(1)
    x = dict(x=torch.randn(1, params.in_channels, 4, 4, generator=g), timesteps=torch.rand(1, generator=g),
             context=torch.randn(1, 5, params.crossattn_emb_channels, generator=g))
    return model, lora_anima, x


def _chroma():
    # run_block passes Chroma's double blocks a keyword argument (txt_first=False)
    params = replace(tiny_flux_params("chroma"), depth=1, depth_single_blocks=1)
    model = build_flux_model(params, chroma=True)
    return model, lora_flux, flux_inputs(params)


FAMILIES = {   # the tiny model and the trainer whose block_lists --torch_compile compiles
    "sd3": (_sd3, "sd3_train_network", "SD3NetworkTrainer"),
    "lumina": (_lumina, "lumina_train_network", "LuminaNetworkTrainer"),
    "anima": (_anima, "anima_train_network", "AnimaNetworkTrainer"),
    "chroma": (_chroma, "flux_train_network", "FluxNetworkTrainer"),
}


def tiny_with_lora(family):
    build, module, trainer = FAMILIES[family]
    model, lora_module, x = build()
    model.requires_grad_(False)
    net = lora_module.create_network(1.0, 4, 1.0, None, None, model)
    net.apply_to(None, model, apply_text_encoder=False, apply_unet=True)
    nonzero_lora_ups(net)   # a zero up weight leaves every down weight without a gradient
    lists = getattr(importlib.import_module(module), trainer)().block_lists(FamilyModels(model, [], None))
    return model, net, x, lists


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compiled_selective_checkpoint_keeps_down_projections_and_changes_nothing(family, monkeypatch):
    import torch._dynamo

    model, net, x, lists = tiny_with_lora(family)
    assert 0 < sum(len(blocks) for blocks in lists) <= 2 * len(lists)
    model.enable_gradient_checkpointing()
    out_plain, grads_plain = train_step(model, net, x)

    torch._dynamo.reset()
    compile_blocks(lists, "aot_eager")
    model.enable_gradient_checkpointing(selective=True)
    kept = []

    def spy(ctx, op, *args, **kwargs):
        policy = bc.selective_policy(ctx, op, *args, **kwargs)
        # traced ops only: Lumina's refiners, outside its block lists, call the policy from their
        # eager checkpoints' dispatch mode
        kept.append(op) if policy.name == "MUST_SAVE" and torch.compiler.is_compiling() else None
        return policy

    monkeypatch.setattr(bc, "_selective_contexts_fn", functools.partial(create_selective_checkpoint_contexts, spy))
    bc._compiled_selective_checkpoint.cache_clear()   # its compiled graphs were traced with the real policy
    try:
        out, grads = train_step(model, net, x)
    finally:
        bc._compiled_selective_checkpoint.cache_clear()   # nor may later tests get the spy's graphs
        torch._dynamo.reset()

    # compiled code calls its matmuls past any dispatch mode: only the traced graph can keep them
    assert bc._ADDMM in kept or bc._MM in kept
    torch.testing.assert_close(out, out_plain, rtol=0, atol=1e-5)
    assert max_grad_diff(grads, grads_plain) < 1e-5
    assert any(bool(g.any()) for g in grads.values())
