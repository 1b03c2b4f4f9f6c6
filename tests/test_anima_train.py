"""anima_train_network.py without running a training: option defaults and their resolution, the
per-component learning rates on a real (tiny) Anima LoRA, and the metadata the family adds."""

from __future__ import annotations

import argparse

import pytest
import torch

from anima_train_network import COMPONENT_LRS, AnimaNetworkTrainer, apply_component_lrs, component_of
from library.errors import ConfigError
from library.tiny.anima import build_anima_model, tiny_anima_params
from networks import lora_anima

REQUIRED = ["--pretrained_model_name_or_path", "dit.safetensors", "--qwen3", "q", "--vae", "v", "--output_dir", "o",
            "--network_module", "networks.lora_anima"]


def checked(*argv: str) -> argparse.Namespace:
    trainer = AnimaNetworkTrainer()
    args = trainer.parse_args([*REQUIRED, *argv])
    trainer.check_args(args)
    return args


def test_defaults_are_the_guides():
    args = checked()
    assert (args.timestep_sampling, args.discrete_flow_shift, args.sigmoid_scale, args.weighting_scheme) == \
        ("sigmoid", 1.0, 1.0, "uniform")
    assert (args.qwen3_max_token_length, args.t5_max_token_length, args.attn_mode) == (512, 512, "torch")
    assert not hasattr(args, "model_prediction_type")          # Anima always uses the raw prediction
    with pytest.raises(SystemExit):                             # nextdit_shift is Lumina's
        AnimaNetworkTrainer().parse_args([*REQUIRED, "--timestep_sampling", "nextdit_shift"])


def test_xformers_flag_means_attn_mode_xformers_unless_attn_mode_is_given(capsys):
    args = checked("--xformers", "--split_attn")
    assert args.attn_mode == "xformers"
    assert checked("--xformers", "--attn_mode", "torch").attn_mode == "torch"
    assert "--xformers: Anima's attention follows --attn_mode" in capsys.readouterr().out


def test_cached_text_outputs_train_the_dit_lora_only(capsys):
    args = checked("--cache_text_encoder_outputs")
    assert args.network_train_unet_only is True
    assert "only the DiT LoRA is trained" in capsys.readouterr().out
    assert checked().network_train_unet_only is False           # Qwen3 LoRA is trained live by default


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        checked("--v2", "--v_parameterization", "--mlp_lr", "-1", "--attn_mode", "xformers", "--qwen3_max_token_length",
                "0")
    text = str(e.value)
    for part in ("--v2 is for Stable Diffusion 2.x", "--v_parameterization", "--mlp_lr must be 0", "--split_attn",
                 "--qwen3_max_token_length must be at least 1"):
        assert part in text, part
    with pytest.raises(ConfigError, match="--fused_backward_pass is not available for LoRA"):
        checked("--fused_backward_pass")


def test_prompt_options_of_other_families_are_refused(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat --w 512 --l 4 --fs 3 --n dog\na dog --g 3.5 --ctr 0.25\n")
    with pytest.raises(ConfigError) as e:
        checked("--sample_prompts", str(prompts))
    text = str(e.value)
    assert "prompt 1 ('a dog'): --g (FLUX's embedded guidance), --ctr (Lumina) is not used by Anima" in text
    assert "prompt 0" not in text
    prompts.write_text("a cat --w 512 --l 4 --fs 3 --n dog --s 20 --d 1\n")
    checked("--sample_prompts", str(prompts))


def test_component_of_names():
    assert component_of("blocks.3.self_attn.q_proj").option == "self_attn_lr"
    assert component_of("blocks.3.cross_attn.output_proj").option == "cross_attn_lr"
    assert component_of("blocks.3.mlp.layer2").option == "mlp_lr"
    assert component_of("blocks.3.adaln_modulation_mlp.1").option == "mod_lr"
    # the adapter's blocks have attention and MLPs of their own: they belong to the adapter
    assert component_of("llm_adapter.blocks.0.self_attn.q_proj").option == "llm_adapter_lr"
    assert component_of("llm_adapter.blocks.1.mlp.0").option == "llm_adapter_lr"
    for name in ("final_layer.linear", "final_layer.adaln_modulation.1", "x_embedder.proj.1", "t_embedder.1.linear_1"):
        assert component_of(name) is None, name
    assert [c.option for c in COMPONENT_LRS] == ["llm_adapter_lr", "self_attn_lr", "cross_attn_lr", "mlp_lr", "mod_lr"]


@pytest.fixture(scope="module")
def dit():
    return build_anima_model(tiny_anima_params(), seed=1).requires_grad_(False)


def lrs_namespace(**values) -> argparse.Namespace:
    return argparse.Namespace(network_module="networks.lora_anima",
                              **{c.option: values.get(c.option) for c in COMPONENT_LRS})


def test_component_lrs_set_module_lrs_and_zero_freezes(dit, capsys):
    network = lora_anima.create_network(
        1.0, 4, 1.0, None, None, dit, train_llm_adapter="True",
        include_patterns="['.*adaln_modulation_mlp.*', '.*final_layer.linear']",
        network_reg_lrs="blocks\\.0\\.self_attn\\..*=7e-4")
    counts = apply_component_lrs(lrs_namespace(self_attn_lr=1e-5, cross_attn_lr=0.0, mlp_lr=2e-5, mod_lr=3e-5,
                                               llm_adapter_lr=4e-5), network, dit)
    lr = {m.lora_name: m.lr for m in network.loras}
    assert lr["lora_unet_blocks_0_self_attn_q_proj"] == 7e-4            # network_reg_lrs wins
    assert lr["lora_unet_blocks_1_self_attn_q_proj"] == 1e-5
    assert lr["lora_unet_blocks_1_cross_attn_v_proj"] == 0.0
    assert lr["lora_unet_blocks_0_mlp_layer1"] == 2e-5
    assert lr["lora_unet_blocks_0_adaln_modulation_mlp_2"] == 3e-5
    assert lr["lora_unet_llm_adapter_blocks_0_self_attn_q_proj"] == 4e-5
    assert lr["lora_unet_llm_adapter_blocks_1_mlp_0"] == 4e-5
    assert lr["lora_unet_final_layer_linear"] is None                   # no component: --unet_lr / --learning_rate
    assert counts == {"self_attn_lr": 8, "cross_attn_lr": 8, "mlp_lr": 4, "mod_lr": 4, "llm_adapter_lr": 20}
    assert "note: 4 of these modules keep the learning rate network_reg_lrs gives them" in capsys.readouterr().out

    network.apply_to(None, dit, apply_text_encoder=False)
    groups, _ = network.prepare_optimizer_params(text_encoder_lr=None, unet_lr=5e-4, default_lr=1e-4)
    in_groups = {id(p) for g in groups for p in g["params"]}
    frozen = [m for m in network.loras if "_cross_attn_" in m.lora_name and "llm_adapter" not in m.lora_name]
    assert frozen and all(not p.requires_grad and id(p) not in in_groups for m in frozen for p in m.parameters())
    assert sorted({g["lr"] for g in groups}) == [1e-5, 2e-5, 3e-5, 4e-5, 5e-4, 7e-4]
    network.restore()


def test_a_component_lr_without_modules_is_refused(dit):
    network = lora_anima.create_network(1.0, 4, 1.0, None, None, dit)
    with pytest.raises(ConfigError) as e:
        apply_component_lrs(lrs_namespace(mod_lr=1e-4, llm_adapter_lr=0.0, mlp_lr=1e-4), network, dit)
    text = str(e.value)
    assert "--mod_lr: the LoRA has no AdaLN modulation module" in text and "include_patterns" in text
    assert "--llm_adapter_lr" in text and "train_llm_adapter=True" in text and "--mlp_lr" not in text


def test_metadata_extras_are_the_guides_keys():
    trainer = AnimaNetworkTrainer()
    args = trainer.parse_args(REQUIRED + ["--timestep_sampling", "shift", "--discrete_flow_shift", "3.0"])
    version, family, modelspec = trainer.metadata_extras(args, None)
    assert version == "anima"
    assert family == {"ss_weighting_scheme": "uniform", "ss_logit_mean": "0.0", "ss_logit_std": "1.0",
                      "ss_mode_scale": "1.29", "ss_timestep_sampling": "shift", "ss_sigmoid_scale": "1.0",
                      "ss_discrete_flow_shift": "3.0"}
    assert modelspec == {"architecture": "anima-preview/lora", "implementation":
                         "https://huggingface.co/circlestone-labs/Anima", "prediction_type": None,
                         "default_resolution": 1024}


def test_block_lists_and_activation_estimate(dit):
    from library.training.trainer import FamilyModels

    trainer = AnimaNetworkTrainer()
    models = FamilyModels(denoiser=dit, text_encoders=[None], vae=None)
    assert trainer.block_lists(models) == [dit.blocks]
    assert trainer.model_name(models) == "Anima (2 blocks)"
    args = argparse.Namespace(gradient_checkpointing=True)
    small = trainer.activation_bytes_estimate(args, models, 1, 512, 512)
    assert 0 < small < trainer.activation_bytes_estimate(args, models, 1, 1024, 1024)


def test_denoise_feeds_sigma_and_the_adapter_inputs(dit):
    """The DiT runs the adapter from the cached Qwen3 states + T5 ids; σ stays float32."""
    from library.training.trainer import FamilyModels, NoisyInput

    trainer = AnimaNetworkTrainer()
    models = FamilyModels(denoiser=dit, text_encoders=[None], vae=None, extra={"compute_dtype": torch.float32})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 4, 6, generator=g)
    sigmas = torch.tensor([0.3])
    mask = torch.tensor([[1, 1, 1, 0]])
    text = {"prompt_embeds": torch.randn(1, 4, 256, generator=g), "attn_mask": mask,
            "t5_input_ids": torch.tensor([[5, 9, 1, 0]]), "t5_attn_mask": mask}
    with torch.no_grad():
        got = trainer.denoise(None, models, NoisyInput(x, sigmas * 1000, sigmas, x), text)
        context = dit.encode_context(text["prompt_embeds"], text["t5_input_ids"], mask, mask)
        expected = dit(x, sigmas, context)
    assert got.shape == x.shape and torch.equal(got, expected)


def test_network_args_and_component_lrs_are_checked_right_after_loading(dit):
    """Before caching (which can take minutes), not when the LoRA is created after it."""
    def args(*network_args, **lrs):
        return argparse.Namespace(dim_from_weights=False, network_dim=4, network_args=list(network_args),
                                  **vars(lrs_namespace(**lrs)))

    AnimaNetworkTrainer.check_network_args_early(args(mlp_lr=0.0), dit)
    AnimaNetworkTrainer.check_network_args_early(args("include_patterns=['.*adaln_modulation_mlp.*']", mod_lr=1e-4), dit)
    with pytest.raises(ConfigError, match="--mod_lr: the LoRA has no AdaLN modulation module"):
        AnimaNetworkTrainer.check_network_args_early(args(mod_lr=1e-4), dit)
    with pytest.raises(ConfigError, match="--mlp_lr"):
        AnimaNetworkTrainer.check_network_args_early(args("exclude_patterns=['.*mlp.*']", mlp_lr=1e-4), dit)
    with pytest.raises(ConfigError, match="exclude_patterns"):
        AnimaNetworkTrainer.check_network_args_early(args("exclude_patterns=[.*"), dit)
