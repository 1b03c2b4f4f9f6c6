"""Our FLUX LoRA file, read by diffusers' own sd-scripts ("kohya") FLUX LoRA converter and loaded
into diffusers' FluxTransformer2DModel with its own adapter loader, gives the same output as our
model with the LoRA applied. (peft is needed by diffusers' loader.)"""

from __future__ import annotations

import inspect

import pytest
import torch
from safetensors.torch import load_file

from library.flux.model import Flux
from library.tiny.flux import flux_state_dict, tiny_flux_params
from networks import lora_flux
from tests.test_flux_model import _inputs, _run_reference, diffusers_reference

pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def kohya_flux_converter(params):
    """diffusers' converter hard-codes the full-size widths (3072, 12288) to split the single
    blocks' fused linear1; substitute the tiny widths in its source and nothing else."""
    import diffusers.loaders.lora_conversion_utils as lcu

    source = inspect.getsource(lcu._convert_kohya_flux_lora_to_diffusers)
    patched = source.replace("dims=[3072, 3072, 3072, 12288]",
                             f"dims=[{params.hidden_size}] * 3 + [{params.mlp_hidden_dim}]")
    assert patched != source, "diffusers changed its converter; update this test helper"
    namespace = dict(vars(lcu))
    exec(patched, namespace)
    return namespace["_convert_kohya_flux_lora_to_diffusers"]


@pytest.mark.parametrize("network_args", [{}, {"split_qkv": "True"}])
def test_diffusers_loads_our_flux_lora_and_agrees(tmp_path, network_args):
    from diffusers import FluxPipeline

    params = tiny_flux_params("dev")
    state = flux_state_dict("dev", params, seed=11)
    ours = Flux(params).eval()
    ours.load_state_dict(state)
    net = lora_flux.create_network(1.0, 4, 2.0, None, None, ours, **network_args)
    net.apply_to(None, ours, apply_text_encoder=False, apply_unet=True)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in net.loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=gen) * 0.05)
    path = tmp_path / "flux_lora.safetensors"
    net.save_weights(str(path), None, {})

    x = _inputs(params, 1, 4, 4, 7)
    with torch.no_grad():
        with_lora = ours(**x)
        base = _run_reference(diffusers_reference("dev", state), "dev", x)
        ref = diffusers_reference("dev", state)
        converted = kohya_flux_converter(params)(load_file(str(path)))
        FluxPipeline.load_lora_into_transformer(converted, network_alphas=None, transformer=ref)
        expected = _run_reference(ref, "dev", x)
    assert (with_lora - base).abs().max() > 0.05, "the LoRA must change the output for the test to mean anything"
    assert torch.allclose(with_lora, expected, atol=1e-5), float((with_lora - expected).abs().max())
