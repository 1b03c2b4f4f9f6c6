import argparse
import math
from types import SimpleNamespace

import pytest
import torch

from library.errors import ConfigError
from library.training import flow_matching as fm

FLUX_CHOICES = ["sigma", "uniform", "sigmoid", "shift", "flux_shift"]
N = 200_000  # samples for distribution checks: quantile standard error ~ 0.001


def _parser(**overrides):
    kwargs = dict(
        default_timestep_sampling="sigma",
        default_discrete_flow_shift=3.0,
        default_model_prediction_type="sigma_scaled",
        timestep_sampling_choices=FLUX_CHOICES,
    )
    kwargs.update(overrides)
    parser = argparse.ArgumentParser()
    fm.add_flow_matching_arguments(parser, **kwargs)
    return parser


def _sample(n=N, hw=(128, 128), seed=0, **cfg):
    return fm.sample_sigmas(fm.FlowMatchingConfig(**cfg), n, hw, generator=torch.Generator().manual_seed(seed))


def _quantile(x, q):
    return torch.quantile(x.double()[:100_000], q).item()


def _normal_ppf(q):
    return math.sqrt(2) * torch.erfinv(torch.tensor(2 * q - 1, dtype=torch.float64)).item()


# ---------------------------------------------------------------------------------------------- options


def test_family_defaults_and_choices_come_from_the_caller():
    lumina = _parser(
        default_timestep_sampling="shift",
        default_discrete_flow_shift=6.0,
        default_model_prediction_type="raw",
        timestep_sampling_choices=["sigma", "uniform", "sigmoid", "shift", "nextdit_shift"],
    )
    args = lumina.parse_args([])
    assert (args.timestep_sampling, args.discrete_flow_shift, args.model_prediction_type) == ("shift", 6.0, "raw")
    assert (args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale, args.sigmoid_scale) == (
        "uniform", 0.0, 1.0, 1.29, 1.0,
    )
    with pytest.raises(SystemExit):
        lumina.parse_args(["--timestep_sampling", "flux_shift"])


def test_family_without_prediction_type_option_behaves_as_raw_and_records_nothing():
    parser = _parser(default_timestep_sampling="sigmoid", default_discrete_flow_shift=1.0, default_model_prediction_type=None)
    args = parser.parse_args([])
    assert not hasattr(args, "model_prediction_type")
    cfg = fm.FlowMatchingConfig.from_args(args, always_weight_loss=True)
    assert cfg.prediction_type == "raw" and cfg.weights_loss
    assert "ss_model_prediction_type" not in cfg.metadata()
    assert cfg.metadata()["ss_discrete_flow_shift"] == "1.0"


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--min_snr_gamma", "5"], "--min_snr_gamma is a DDPM"),
        (["--debiased_estimation_loss"], "--debiased_estimation_loss is a DDPM"),
        (["--scale_v_pred_loss_like_noise_pred"], "--scale_v_pred_loss_like_noise_pred is a DDPM"),
        (["--v_pred_like_loss", "0.1"], "--v_pred_like_loss is a DDPM"),
        (["--ip_noise_gamma_random_strength"], "needs --ip_noise_gamma"),
        (["--noise_offset_random_strength"], "needs --noise_offset"),
        (["--adaptive_noise_scale", "0.1"], "needs --noise_offset"),
        (["--multires_noise_iterations", "0"], "--multires_noise_iterations must be >= 1"),
        (["--discrete_flow_shift", "0"], "--discrete_flow_shift must be > 0"),
        (["--model_prediction_type", "raw", "--weighting_scheme", "sigma_sqrt"], "has no effect"),
        (["--timestep_sampling", "shift", "--weighting_scheme", "logit_normal"], "only shapes --timestep_sampling sigma"),
    ],
)
def test_refused_option_combinations(argv, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("-", r"\-")):
        fm.FlowMatchingConfig.from_args(_parser().parse_args(argv))


def test_all_problems_are_reported_at_once():
    args = _parser().parse_args(["--min_snr_gamma", "5", "--noise_offset_random_strength", "--logit_std", "0"])
    with pytest.raises(ConfigError) as info:
        fm.FlowMatchingConfig.from_args(args)
    message = str(info.value)
    assert "--min_snr_gamma" in message and "--noise_offset_random_strength" in message and "--logit_std" in message


def test_weighting_schemes_with_an_effect_are_accepted():
    parse = _parser().parse_args
    fm.FlowMatchingConfig.from_args(parse(["--weighting_scheme", "logit_normal"]))  # shapes sigma sampling
    fm.FlowMatchingConfig.from_args(parse(["--weighting_scheme", "cosmap"]))  # weights sigma_scaled loss
    fm.FlowMatchingConfig.from_args(parse(["--weighting_scheme", "none", "--model_prediction_type", "raw"]))
    anima = parse(["--timestep_sampling", "sigmoid", "--weighting_scheme", "sigma_sqrt", "--model_prediction_type", "raw"])
    fm.FlowMatchingConfig.from_args(anima, always_weight_loss=True)


# ---------------------------------------------------------------------------------------------- σ sampling


def test_sigma_table_matches_flow_match_euler_discrete_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for shift in (1.0, 3.0, 6.0):
        reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).sigmas[:1000]
        assert torch.equal(fm.scheduler_sigma_table(shift), reference.float())


def test_sigma_method_values_lie_on_the_shifted_table_and_discrete_flow_shift_applies():
    table = fm.scheduler_sigma_table(3.0)
    sigmas = _sample(n=4096, timestep_sampling="sigma", discrete_flow_shift=3.0)
    assert torch.isin(sigmas, table).all()
    # uniform u: σ's median is the table value at index 500, i.e. shift(0.5) = 0.75 for S=3
    sigmas = _sample(timestep_sampling="sigma", discrete_flow_shift=3.0)
    assert _quantile(sigmas, 0.5) == pytest.approx(0.75, abs=0.003)
    unshifted = _sample(timestep_sampling="sigma", discrete_flow_shift=1.0)
    assert _quantile(unshifted, 0.5) == pytest.approx(0.5, abs=0.003)


def test_sigma_method_logit_normal_and_mode():
    table = fm.scheduler_sigma_table(1.0).double()
    # logit_normal: u = sigmoid(N(m, s)); σ = 1 − u (unshifted, up to the 1/1000 grid)
    sigmas = _sample(timestep_sampling="sigma", discrete_flow_shift=1.0, weighting_scheme="logit_normal", logit_mean=0.5, logit_std=1.0)
    for q in (0.1, 0.5, 0.9):
        u = 1 / (1 + math.exp(-(0.5 + _normal_ppf(1 - q))))
        assert _quantile(sigmas, q) == pytest.approx(table[int(u * 1000)].item(), abs=0.004)
    # mode: u = f(U), f decreasing for scale 1.29, so σ's q-quantile is table[f(q)·1000]
    def f(u):
        return 1 - u - 1.29 * (math.cos(math.pi * u / 2) ** 2 - 1 + u)

    sigmas = _sample(timestep_sampling="sigma", discrete_flow_shift=1.0, weighting_scheme="mode")
    for q in (0.25, 0.5, 0.75):
        assert _quantile(sigmas, q) == pytest.approx(table[int(f(q) * 1000)].item(), abs=0.004)


def test_uniform_moments():
    sigmas = _sample(timestep_sampling="uniform")
    assert sigmas.mean().item() == pytest.approx(0.5, abs=0.003)
    assert sigmas.var().item() == pytest.approx(1 / 12, abs=0.001)


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_sigmoid_quantiles(scale):
    sigmas = _sample(timestep_sampling="sigmoid", sigmoid_scale=scale)
    assert _quantile(sigmas, 0.5) == pytest.approx(0.5, abs=0.003)
    for q in (0.1, 0.9):
        expected = 1 / (1 + math.exp(-scale * _normal_ppf(q)))
        assert _quantile(sigmas, q) == pytest.approx(expected, abs=0.004)


def test_shift_quantiles():
    shift = 3.1582
    sigmas = _sample(timestep_sampling="shift", discrete_flow_shift=shift)
    assert _quantile(sigmas, 0.5) == pytest.approx(shift / (1 + shift), abs=0.003)
    s0 = 1 / (1 + math.exp(-_normal_ppf(0.2)))
    assert _quantile(sigmas, 0.2) == pytest.approx(shift * s0 / (1 + (shift - 1) * s0), abs=0.004)


def test_resolution_mu():
    assert fm.resolution_mu((128, 128)) == pytest.approx(1.15)  # 1024² image
    assert fm.resolution_mu((32, 32)) == pytest.approx(0.5)  # 256 tokens
    assert fm.resolution_mu((64, 64)) == pytest.approx(0.5 + 768 * 0.65 / 3840)  # 512² image
    assert fm.resolution_mu((129, 129)) == pytest.approx(1.15)  # the packed token count floors odd sizes


def test_flux_shift_at_1024_squared():
    sigmas = _sample(timestep_sampling="flux_shift", hw=(128, 128))
    mu = 1.15
    assert _quantile(sigmas, 0.5) == pytest.approx(math.exp(mu) / (math.exp(mu) + 1), abs=0.003)  # sigmoid(1.15)
    s0 = 1 / (1 + math.exp(-_normal_ppf(0.9)))
    assert _quantile(sigmas, 0.9) == pytest.approx(math.exp(mu) / (math.exp(mu) + 1 / s0 - 1), abs=0.004)
    smaller = _sample(timestep_sampling="flux_shift", hw=(32, 32))
    assert _quantile(smaller, 0.5) == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.003)


def test_nextdit_shift_quantiles_and_zero_is_finite():
    sigmas = _sample(timestep_sampling="nextdit_shift", hw=(128, 128), discrete_flow_shift=6.0)
    for q in (0.25, 0.5, 0.75):
        expected = math.exp(1.15) / (math.exp(1.15) + 1 / q - 1)
        assert _quantile(sigmas, q) == pytest.approx(expected, abs=0.004)
    assert torch.isfinite(fm.time_shift(1.15, torch.zeros(3))).all()


@pytest.mark.parametrize("method", fm.TIMESTEP_SAMPLING_METHODS)
def test_every_method_is_float32_in_unit_interval_and_reproducible(method):
    a = _sample(n=1000, timestep_sampling=method, seed=3)
    b = _sample(n=1000, timestep_sampling=method, seed=3)
    assert a.dtype == torch.float32 and a.shape == (1000,)
    assert torch.equal(a, b)
    assert (a >= 0).all() and (a <= 1).all()


def test_timesteps_and_validation_sigmas():
    assert torch.equal(fm.timesteps_from_sigmas(torch.tensor([0.25, 1.0])), torch.tensor([250.0, 1000.0]))
    assert torch.allclose(fm.validation_sigmas(), torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9]))
    assert fm.validation_sigmas(1).tolist() == [pytest.approx(0.5)]
    with pytest.raises(ConfigError):
        fm.validation_sigmas(0)


# ---------------------------------------------------------------------------------------------- noise


def test_noisy_input_and_targets():
    cfg = fm.FlowMatchingConfig()
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sigmas = torch.tensor([0.25, 0.75])
    noisy = fm.make_noisy_input(cfg, x0, eps, sigmas)
    assert torch.allclose(noisy[0], 0.75 * x0[0] + 0.25 * eps[0])
    assert torch.allclose(noisy[1], 0.25 * x0[1] + 0.75 * eps[1])
    assert torch.equal(fm.flow_target(x0, eps), eps - x0)
    assert torch.equal(fm.flow_target(x0, eps, reversed=True), x0 - eps)


def test_ip_noise_gamma_perturbs_only_the_input():
    gamma = 0.3
    cfg = fm.FlowMatchingConfig(ip_noise_gamma=gamma)
    x0, eps = torch.randn(4, 4, 64, 64), torch.randn(4, 4, 64, 64)
    sigmas = torch.full((4,), 0.5)
    noisy = fm.make_noisy_input(cfg, x0, eps, sigmas, generator=torch.Generator().manual_seed(0))
    clean = 0.5 * x0 + 0.5 * eps
    xi = (noisy - clean) / 0.5
    assert xi.std().item() == pytest.approx(gamma, rel=0.03)
    random_strength = fm.FlowMatchingConfig(ip_noise_gamma=gamma, ip_noise_gamma_random_strength=True)
    stds = [
        ((fm.make_noisy_input(random_strength, x0, eps, sigmas, generator=torch.Generator().manual_seed(s)) - clean) / 0.5).std().item()
        for s in range(8)
    ]
    assert max(stds) <= gamma * 1.03 and min(stds) < gamma * 0.9


def test_sample_noise_plain_equals_randn_with_the_same_generator():
    latents = torch.zeros(2, 4, 8, 8)
    noise = fm.sample_noise(fm.FlowMatchingConfig(), latents, generator=torch.Generator().manual_seed(5))
    assert torch.equal(noise, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)))
    assert fm.offset_noise(fm.FlowMatchingConfig(), noise) is noise


def test_offset_noise_on_given_noise_keeps_dtype_and_needs_latents_for_adaptive_scale():
    noise = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)
    shifted = fm.offset_noise(fm.FlowMatchingConfig(noise_offset=0.1), noise, generator=torch.Generator().manual_seed(0))
    assert shifted.dtype == torch.bfloat16 and not torch.equal(shifted, noise)
    with pytest.raises(ValueError):
        fm.offset_noise(fm.FlowMatchingConfig(noise_offset=0.1, adaptive_noise_scale=1.0), noise)


def test_noise_offset_shifts_each_channel_by_a_constant():
    latents = torch.zeros(64, 4, 32, 32)
    g = torch.Generator().manual_seed(0)
    plain = fm.sample_noise(fm.FlowMatchingConfig(), latents, generator=g).mean(dim=(2, 3)).std().item()
    offset = fm.sample_noise(fm.FlowMatchingConfig(noise_offset=0.5), latents, generator=g).mean(dim=(2, 3)).std().item()
    assert plain == pytest.approx(1 / 32, rel=0.15)
    assert offset == pytest.approx(math.sqrt(0.5**2 + 1 / 32**2), rel=0.15)


def test_adaptive_noise_scale_grows_with_the_latent_mean():
    g = torch.Generator().manual_seed(0)
    cfg = fm.FlowMatchingConfig(noise_offset=0.01, adaptive_noise_scale=1.0)
    bright = fm.sample_noise(cfg, torch.full((64, 4, 16, 16), 2.0), generator=g).mean(dim=(2, 3)).std().item()
    assert bright == pytest.approx(2.01, rel=0.2)


def test_pyramid_noise_is_unit_std_spatially_correlated_and_rank_agnostic():
    g = torch.Generator().manual_seed(0)
    cfg = fm.FlowMatchingConfig(multires_noise_iterations=6, multires_noise_discount=0.8)
    noise = fm.sample_noise(cfg, torch.zeros(4, 4, 64, 64), generator=g)
    assert noise.shape == (4, 4, 64, 64)
    assert noise.std().item() == pytest.approx(1.0, abs=1e-4)

    def neighbour_corr(x):
        a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()

    assert neighbour_corr(noise) > 0.2 > abs(neighbour_corr(torch.randn(4, 4, 64, 64)))
    video = fm.sample_noise(cfg, torch.zeros(2, 4, 3, 32, 32), generator=g)
    assert video.shape == (2, 4, 3, 32, 32)


# ---------------------------------------------------------------------------------------------- prediction types


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    sigmas = torch.tensor([0.2, 0.5, 0.9])
    return x0, eps, sigmas, fm.make_noisy_input(fm.FlowMatchingConfig(), x0, eps, sigmas)


def test_raw_and_additive():
    x0, eps, sigmas, noisy = _batch()
    pred = torch.randn_like(x0)
    raw = fm.FlowMatchingConfig()
    processed = fm.apply_model_prediction_type(raw, pred, noisy, sigmas)
    assert processed.pred is pred and processed.weighting is None
    assert torch.equal(fm.loss_target(raw, x0, eps), eps - x0)
    additive = fm.FlowMatchingConfig(model_prediction_type="additive")
    pred_out, weighting = fm.apply_model_prediction_type(additive, pred, noisy, sigmas)  # unpacks like a tuple
    assert torch.equal(pred_out, pred + noisy) and weighting is None
    assert torch.equal(fm.loss_target(additive, x0, eps), eps - x0)
    lumina = fm.FlowMatchingConfig(reversed_target=True)
    assert torch.equal(fm.loss_target(lumina, x0, eps), x0 - eps)


@pytest.mark.parametrize("reversed_target", [False, True])
def test_sigma_scaled_compares_an_x0_estimate_with_x0(reversed_target):
    """The perfect velocity prediction must give zero loss (sd-scripts' velocity target makes it nonzero)."""
    x0, eps, sigmas, noisy = _batch()
    cfg = fm.FlowMatchingConfig(model_prediction_type="sigma_scaled", reversed_target=reversed_target)
    perfect = fm.flow_target(x0, eps, reversed=reversed_target)
    processed = fm.apply_model_prediction_type(cfg, perfect, noisy, sigmas)
    assert torch.allclose(processed.pred, x0, atol=1e-5)
    assert torch.equal(fm.loss_target(cfg, x0, eps), x0)
    assert torch.equal(processed.weighting, torch.ones(3))


def test_sigma_scaled_with_sigma_sqrt_weighting_is_the_velocity_l2_loss():
    x0, eps, sigmas, noisy = _batch()
    pred = torch.randn_like(x0)
    cfg = fm.FlowMatchingConfig(model_prediction_type="sigma_scaled", weighting_scheme="sigma_sqrt")
    processed = fm.apply_model_prediction_type(cfg, pred, noisy, sigmas)
    weighted = (processed.pred - fm.loss_target(cfg, x0, eps)) ** 2 * processed.weighting.view(-1, 1, 1, 1)
    assert torch.allclose(weighted, (pred - (eps - x0)) ** 2, rtol=1e-4, atol=1e-5)


def test_always_weight_loss_weights_raw_predictions():
    x0, eps, sigmas, noisy = _batch()
    cfg = fm.FlowMatchingConfig(timestep_sampling="sigmoid", weighting_scheme="cosmap", always_weight_loss=True)
    processed = fm.apply_model_prediction_type(cfg, torch.zeros_like(x0), noisy, sigmas)
    assert torch.allclose(processed.weighting, fm.compute_loss_weighting("cosmap", sigmas))


def test_compute_loss_weighting():
    sigmas = torch.tensor([0.25, 0.5, 1.0])
    assert torch.allclose(fm.compute_loss_weighting("sigma_sqrt", sigmas), torch.tensor([16.0, 4.0, 1.0]))
    expected = torch.tensor([2 / (math.pi * (1 - 0.5 + 0.125)), 2 / (math.pi * 0.5), 2 / math.pi])
    assert torch.allclose(fm.compute_loss_weighting("cosmap", sigmas), expected)
    for scheme in ("logit_normal", "mode", "none", "uniform"):
        assert torch.equal(fm.compute_loss_weighting(scheme, sigmas), torch.ones(3))


def test_from_args_with_a_namespace_missing_optional_attributes():
    args = SimpleNamespace(timestep_sampling="uniform", model_prediction_type="raw")
    cfg = fm.FlowMatchingConfig.from_args(args, reversed_target=True)
    assert cfg.reversed_target and cfg.discrete_flow_shift == 3.0 and cfg.noise_offset is None
