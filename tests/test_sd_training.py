"""The SD 1.x / 2.x trainer hooks without a training run: option checks before anything
loads, what noisy_input / noisy_input_at / loss_terms hand the loop (ε and v targets, SNR
weights), the snr Huber schedule reaching the shared loss, and the metadata per model kind."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from library.errors import ConfigError
from library.training import ddpm
from library.training.losses import compute_per_sample_loss
from train_network import SDNetworkTrainer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models are dominated by per-op overhead: one thread is faster on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def checked(*argv: str, model: str = "model.safetensors"):
    trainer = SDNetworkTrainer()
    args = trainer.build_parser().parse_args(["--pretrained_model_name_or_path", model, "--output_dir", "out",
                                              "--network_module", "networks.lora", *argv])
    trainer.check_args(args)
    return trainer, args


@pytest.fixture
def model_file(tmp_path):
    """A path that exists; a .ckpt is only inspected when loaded, so the option checks run alone."""
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"")
    return str(path)


@pytest.mark.parametrize("argv, message", [
    (("--clip_skip", "0"), "--clip_skip must be at least 1"),
    (("--sample_sampler", "fancy"), "unknown sampler"),
    (("--text_encoder_lr", "1e-4", "2e-4"), "takes one value"),
    (("--cache_text_encoder_outputs",), "add --network_train_unet_only"),
    (("--network_train_unet_only", "--text_encoder_lr", "1e-4"), "has no effect"),
    (("--torch_compile",), "--torch_compile is not supported"),
    (("--blocks_to_swap", "4"), "--blocks_to_swap is not supported"),
    (("--fp8_base", "--mixed_precision", "bf16"), "--fp8_base / --fp8_base_unet"),
    (("--scale_v_pred_loss_like_noise_pred",), "needs --v_parameterization"),
    (("--xformers",), "xformers package"),
])
def test_options_are_checked_before_loading(model_file, argv, message):
    if argv == ("--xformers",):
        import importlib.util

        if importlib.util.find_spec("xformers") is not None:
            pytest.skip("xformers is installed here")
    with pytest.raises(ConfigError, match=message):
        checked(*argv, model=model_file)


def test_missing_model_and_mem_eff_attn(model_file, capsys):
    with pytest.raises(ConfigError, match="file not found"):
        checked(model="/nonexistent/sd15.safetensors")
    checked("--mem_eff_attn", model=model_file)
    assert "SDPA" in capsys.readouterr().out


@pytest.mark.parametrize("v_pred", [False, True])
def test_noisy_input_targets_and_weights(model_file, v_pred):
    trainer, args = checked(*(["--v_parameterization"] if v_pred else []), "--min_snr_gamma", "5", model=model_file)
    schedule = ddpm.DDPMSchedule.sd()
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    noisy = trainer.noisy_input(args, latents, noise)
    t = noisy.timesteps
    assert t.dtype == torch.long and noisy.sigmas.tolist() == pytest.approx((t.float() / 1000).tolist())
    assert torch.allclose(noisy.noisy, schedule.add_noise(latents, noise, t), atol=1e-6)
    expected = schedule.velocity(latents, noise, t) if v_pred else noise
    assert torch.allclose(noisy.target, expected, atol=1e-6)
    pred, weight = trainer.loss_terms(args, torch.zeros_like(latents), noisy)
    snr = schedule.snr(t)
    assert torch.allclose(weight, snr.clamp(max=5) / (snr + 1 if v_pred else snr))
    at = trainer.noisy_input_at(args, latents, noise, 0.3)
    assert at.timesteps.tolist() == [300, 300, 300]
    assert torch.allclose(at.noisy, schedule.add_noise(latents, noise, at.timesteps), atol=1e-6)


def test_noise_options_reach_the_input_only_through_the_noise(model_file):
    trainer, args = checked("--ip_noise_gamma", "0.5", "--zero_terminal_snr", "--v_parameterization",
                            model=model_file)
    latents, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    torch.manual_seed(0)
    noisy = trainer.noisy_input(args, latents, noise)
    schedule = ddpm.DDPMSchedule.sd(zero_terminal_snr=True)
    # the target keeps the clean noise; only the input is perturbed
    assert torch.allclose(noisy.target, schedule.velocity(latents, noise, noisy.timesteps), atol=1e-6)
    assert not torch.allclose(noisy.noisy, schedule.add_noise(latents, noise, noisy.timesteps), atol=1e-3)


def test_snr_huber_reaches_the_shared_loss(model_file):
    trainer, args = checked("--loss_type", "huber", "--huber_schedule", "snr", model=model_file)
    cfg = trainer._loss_config
    t = torch.tensor([0, 999])
    pred = torch.ones(2, 4, 4, 4)
    loss = compute_per_sample_loss(cfg, pred, torch.zeros_like(pred), timesteps=t, sigmas=t / 1000)
    assert loss[0] > loss[1] > 0          # c near 1 at t = 0 (L2-like), near huber_c at t = 999


@pytest.mark.parametrize("v2, v_pred, base, arch, resolution", [
    (False, False, "sd_v1", "stable-diffusion-v1", 512),
    (False, True, "sd_v1_v", "stable-diffusion-v1", 512),
    (True, False, "sd_v2", "stable-diffusion-v2-512", 512),
    (True, True, "sd_v2_v", "stable-diffusion-v2-768-v", 768),
])
def test_metadata_per_model_kind(v2, v_pred, base, arch, resolution):
    trainer = SDNetworkTrainer()
    args = SimpleNamespace(v_parameterization=v_pred)
    models = SimpleNamespace(info=SimpleNamespace(v2=v2))
    version, family, spec = trainer.metadata_extras(args, models)
    assert version == base and family == {}
    assert spec == {"architecture": f"{arch}/lora", "implementation": "diffusers",
                    "prediction_type": "v" if v_pred else "epsilon", "default_resolution": resolution}


@pytest.mark.parametrize("mode", ["checkpointing", "cpu_offload"])
def test_gradient_checkpointing_gives_the_same_gradients(mode):
    from library.sd.model import SDUNet
    from library.tiny import sd as tiny_sd
    from networks import lora

    torch.manual_seed(0)
    unet = SDUNet(tiny_sd.build_unet(False, seed=4)).requires_grad_(False)
    net = lora.create_network(1.0, 4, 4.0, None, None, unet)
    net.apply_to(None, unet)
    with torch.no_grad():
        for m in net.loras:
            m.lora_up.weight.normal_(0, 0.1)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.randn(2, 77, tiny_sd.TINY_TEXT_WIDTH)

    def grads():
        net.zero_grad(set_to_none=True)
        unet(x, t, c).square().mean().backward()
        return [p.grad.clone() for p in net.parameters()]

    plain = grads()
    unet.enable_gradient_checkpointing(cpu_offload=mode == "cpu_offload")
    again = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, again))
    assert unet.unet.is_gradient_checkpointing
