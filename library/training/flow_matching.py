"""Training math shared by the flow-matching families (FLUX, Chroma, Lumina, Anima, and SD3's
own timestep sampling and x0 objective at the end of this file).

One convention throughout: σ ∈ [0, 1] is the noise level, x_σ = (1−σ)·x0 + σ·ε, and the
timestep value passed around is t = 1000·σ. Family differences are data on the config
(`reversed_target` for Lumina, `always_weight_loss` for Anima, per-family defaults given to
`add_flow_matching_arguments`), never branches on a family's name.

Decisions where we differ from sd-scripts are listed in docs/compatibility_training.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from library.errors import ConfigError

NUM_TRAIN_TIMESTEPS = 1000

TIMESTEP_SAMPLING_METHODS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift", "nextdit_shift")
MODEL_PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform")

# Weighting schemes that change how u is drawn for `--timestep_sampling sigma`, and those that
# change the loss weight. "none"/"uniform" do neither and are always accepted.
_SAMPLING_SCHEMES = ("logit_normal", "mode")
_LOSS_WEIGHT_SCHEMES = ("sigma_sqrt", "cosmap")

# The resolution-dependent shift of FLUX.1 inference: mu is linear in the packed token count,
# 0.5 at 256 tokens (512² image) and 1.15 at 4096 tokens (1024² image).
_MU_BASE_TOKENS, _MU_BASE = 256, 0.5
_MU_MAX_TOKENS, _MU_MAX = 4096, 1.15
# Lumina clamps σ0 before the time shift so 1/σ0 stays finite; we clamp for every time shift
# (it changes nothing but the impossible σ0 == 0 case).
_TIME_SHIFT_MIN_SIGMA = 1e-7

_SAMPLING_HELP = {
    "sigma": "from the shifted 1000-step scheduler table, u drawn per --weighting_scheme",
    "uniform": "U(0,1)",
    "sigmoid": "sigmoid(scale·N(0,1))",
    "shift": "sigmoid, then --discrete_flow_shift",
    "flux_shift": "sigmoid, then a resolution-dependent shift (the FLUX.1 inference schedule)",
    "nextdit_shift": "U(0,1), then the resolution-dependent shift (Lumina)",
}

# Options that only make sense for DDPM (SD1/2) training. sd-scripts parses them for flow
# families and silently ignores them; we refuse them so a copied command line does not
# pretend to do something it does not.
_DDPM_ONLY_OPTIONS = {
    "min_snr_gamma": "--min_snr_gamma",
    "debiased_estimation_loss": "--debiased_estimation_loss",
    "scale_v_pred_loss_like_noise_pred": "--scale_v_pred_loss_like_noise_pred",
    "v_pred_like_loss": "--v_pred_like_loss",
    "zero_terminal_snr": "--zero_terminal_snr",
}


# ----------------------------------------------------------------------------------------------
# Options


def add_flow_matching_arguments(
    parser: argparse.ArgumentParser,
    *,
    default_timestep_sampling: str,
    default_discrete_flow_shift: float,
    default_model_prediction_type: str | None,
    timestep_sampling_choices: Sequence[str],
) -> None:
    """Declare the flow-matching options with this family's defaults.

    `default_model_prediction_type=None` means the family has no --model_prediction_type
    option (Anima: the prediction is always used raw).
    """
    unknown = [c for c in timestep_sampling_choices if c not in TIMESTEP_SAMPLING_METHODS]
    if unknown or default_timestep_sampling not in timestep_sampling_choices:
        raise ValueError(f"bad timestep sampling choices/default: {timestep_sampling_choices!r}")

    group = parser.add_argument_group("flow matching: timesteps, noise and loss weighting")
    group.add_argument(
        "--timestep_sampling",
        choices=list(timestep_sampling_choices),
        default=default_timestep_sampling,
        help="How the noise level σ is drawn each step. "
        + "; ".join(f"{c}: {_SAMPLING_HELP[c]}" for c in timestep_sampling_choices)
        + f". Default: {default_timestep_sampling}.",
    )
    group.add_argument(
        "--sigmoid_scale",
        type=float,
        default=1.0,
        help="Scale of the normal sample before the sigmoid (sigmoid, shift, flux_shift). Default 1.0.",
    )
    group.add_argument(
        "--discrete_flow_shift",
        type=float,
        default=default_discrete_flow_shift,
        help="Shift S: σ ← S·σ/(1+(S−1)·σ). Used by --timestep_sampling shift and also by sigma "
        "(it shifts the scheduler table, as in sd-scripts). "
        f"Default: {default_discrete_flow_shift}.",
    )
    if default_model_prediction_type is not None:
        group.add_argument(
            "--model_prediction_type",
            choices=list(MODEL_PREDICTION_TYPES),
            default=default_model_prediction_type,
            help="raw: the model output is the velocity (recommended); additive: output + noisy "
            "input; sigma_scaled: turn the output into an x0 estimate (noisy − σ·v), compare it "
            "with x0 and weight the loss by --weighting_scheme (SD3 style). "
            f"Default: {default_model_prediction_type}.",
        )
    group.add_argument(
        "--weighting_scheme",
        choices=list(WEIGHTING_SCHEMES),
        default="uniform",
        help="logit_normal / mode: how u is drawn for --timestep_sampling sigma. sigma_sqrt "
        "(σ⁻²) / cosmap: loss weight, applied with --model_prediction_type sigma_scaled"
        " (or always, for families that always weight the loss). A scheme that would have no "
        "effect with the chosen options is an error. Default: uniform.",
    )
    group.add_argument("--logit_mean", type=float, default=0.0, help="Mean for logit_normal. Default 0.0.")
    group.add_argument("--logit_std", type=float, default=1.0, help="Std for logit_normal. Default 1.0.")
    group.add_argument("--mode_scale", type=float, default=1.29, help="Scale for the mode scheme. Default 1.29.")
    add_flow_noise_arguments(group)
    add_ddpm_only_arguments(parser)


def add_flow_noise_arguments(group: argparse._ActionsContainer) -> None:
    """Declare the noise options every flow family honours (ip noise, noise offset, pyramid
    noise) on `group` (a parser or an argument group)."""
    group.add_argument(
        "--ip_noise_gamma",
        type=float,
        default=None,
        help="Input perturbation: noise the input with ε + γ·ξ (ξ ~ N(0,1)) while the target "
        "keeps the clean ε. About 0.1 is typical. Default: off.",
    )
    group.add_argument(
        "--ip_noise_gamma_random_strength",
        action="store_true",
        help="Use γ·U(0,1) (one draw per batch) instead of γ. Needs --ip_noise_gamma.",
    )
    group.add_argument(
        "--noise_offset",
        type=float,
        default=None,
        help="Add offset·N(0,1) per sample and channel to the noise (constant over the image), "
        "which lets the model learn overall brightness shifts. Applied to the noise used for "
        "both the input and the target. About 0.05-0.1. Default: off.",
    )
    group.add_argument(
        "--noise_offset_random_strength",
        action="store_true",
        help="Use offset·U(0,1) (one draw per batch) instead of offset. Needs --noise_offset.",
    )
    group.add_argument(
        "--adaptive_noise_scale",
        type=float,
        default=None,
        help="Add scale·|mean of each latent channel| to the noise offset (clamped at 0). "
        "Needs --noise_offset.",
    )
    group.add_argument(
        "--multires_noise_iterations",
        type=int,
        default=None,
        help="Pyramid ('multi-resolution') noise: add this many upsampled lower-resolution noise "
        "levels, then renormalise to unit std. 6-10 is typical. Default: off.",
    )
    group.add_argument(
        "--multires_noise_discount",
        type=float,
        default=0.3,
        help="Weight of level i is discount**i (has no effect without "
        "--multires_noise_iterations). Default 0.3.",
    )


def add_ddpm_only_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the DDPM-only loss options so that old command lines get a clear refusal
    (`ddpm_only_option_problems`) instead of an argparse error."""
    ddpm = parser.add_argument_group(
        "DDPM-only loss options (declared so old command lines get a clear error; "
        "setting any of them is refused for flow-matching models)"
    )
    ddpm.add_argument("--min_snr_gamma", type=float, default=None, help="DDPM only: refused here.")
    ddpm.add_argument("--debiased_estimation_loss", action="store_true", help="DDPM only: refused here.")
    ddpm.add_argument("--scale_v_pred_loss_like_noise_pred", action="store_true", help="DDPM only: refused here.")
    ddpm.add_argument("--v_pred_like_loss", type=float, default=None, help="DDPM only: refused here.")


@dataclass(frozen=True)
class FlowMatchingConfig:
    """Everything the flow-matching math needs, validated.

    `model_prediction_type` None means the family has no such option (it behaves as raw).
    `reversed_target`: the model predicts the velocity from noise towards data (Lumina), so
    the velocity target is x0 − ε (the family also feeds the model 1 − σ).
    `always_weight_loss`: the loss is multiplied by the weighting scheme whatever the
    prediction type (Anima).
    """

    timestep_sampling: str = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    model_prediction_type: str | None = "raw"
    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    reversed_target: bool = False
    always_weight_loss: bool = False

    def __post_init__(self) -> None:
        problems = _config_problems(dataclasses.asdict(self))
        if problems:
            raise ConfigError(_format_problems(problems))

    @property
    def prediction_type(self) -> str:
        """The effective model prediction type ("raw" when the family has no option)."""
        return self.model_prediction_type or "raw"

    @property
    def weights_loss(self) -> bool:
        """Whether the loss is multiplied by compute_loss_weighting(weighting_scheme, σ)."""
        return self.always_weight_loss or self.prediction_type == "sigma_scaled"

    @classmethod
    def from_args(
        cls, args: Any, *, reversed_target: bool = False, always_weight_loss: bool = False
    ) -> "FlowMatchingConfig":
        """Build from parsed arguments; reports every problem at once as one ConfigError."""
        problems = ddpm_only_option_problems(args)
        defaults = cls.__dataclass_fields__
        values = {
            name: getattr(args, name, field.default)
            for name, field in defaults.items()
            if name not in ("reversed_target", "always_weight_loss")
        }
        # A family without the option has no attribute: it behaves as raw and records nothing.
        values["model_prediction_type"] = getattr(args, "model_prediction_type", None)
        values["ip_noise_gamma_random_strength"] = bool(values["ip_noise_gamma_random_strength"])
        values["noise_offset_random_strength"] = bool(values["noise_offset_random_strength"])
        values["reversed_target"] = reversed_target
        values["always_weight_loss"] = always_weight_loss
        problems += _config_problems(values)
        if problems:
            raise ConfigError(_format_problems(problems))
        return cls(**values)

    def metadata(self) -> dict[str, str]:
        """The ss_* keys that describe these options (family extras in the LoRA file)."""
        meta = {
            "ss_weighting_scheme": self.weighting_scheme,
            "ss_logit_mean": self.logit_mean,
            "ss_logit_std": self.logit_std,
            "ss_mode_scale": self.mode_scale,
            "ss_timestep_sampling": self.timestep_sampling,
            "ss_sigmoid_scale": self.sigmoid_scale,
            "ss_model_prediction_type": self.model_prediction_type,
            "ss_discrete_flow_shift": self.discrete_flow_shift,
        }
        if self.model_prediction_type is None:
            del meta["ss_model_prediction_type"]
        return {k: str(v) for k, v in meta.items()}


def ddpm_only_option_problems(args: Any) -> list[str]:
    """One message per DDPM-only option that is set (they have no flow-matching meaning)."""
    return [
        f"{flag} is a DDPM (SD1/2) option and has no meaning for flow-matching models; remove it."
        for attr, flag in _DDPM_ONLY_OPTIONS.items()
        if getattr(args, attr, None) not in (None, False)
    ]


def _config_problems(v: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    if v["timestep_sampling"] not in TIMESTEP_SAMPLING_METHODS:
        problems.append(f"--timestep_sampling {v['timestep_sampling']!r}: choose one of {', '.join(TIMESTEP_SAMPLING_METHODS)}.")
    mpt = v["model_prediction_type"]
    if mpt is not None and mpt not in MODEL_PREDICTION_TYPES:
        problems.append(f"--model_prediction_type {mpt!r}: choose one of {', '.join(MODEL_PREDICTION_TYPES)}.")
    scheme = v["weighting_scheme"]
    if scheme not in WEIGHTING_SCHEMES:
        problems.append(f"--weighting_scheme {scheme!r}: choose one of {', '.join(WEIGHTING_SCHEMES)}.")
    else:
        shapes_sampling = v["timestep_sampling"] == "sigma" and scheme in _SAMPLING_SCHEMES
        weights = v["always_weight_loss"] or (mpt or "raw") == "sigma_scaled"
        shapes_loss = weights and scheme in _LOSS_WEIGHT_SCHEMES
        if scheme not in ("none", "uniform") and not (shapes_sampling or shapes_loss):
            if scheme in _SAMPLING_SCHEMES:
                fix = "it only shapes --timestep_sampling sigma"
            else:
                fix = "it only weights the loss with --model_prediction_type sigma_scaled"
            problems.append(f"--weighting_scheme {scheme} has no effect with these options ({fix}); remove it or change them.")
    if not v["discrete_flow_shift"] > 0:
        problems.append(f"--discrete_flow_shift must be > 0 (got {v['discrete_flow_shift']}).")
    if not v["sigmoid_scale"] > 0:
        problems.append(f"--sigmoid_scale must be > 0 (got {v['sigmoid_scale']}).")
    if not v["logit_std"] > 0:
        problems.append(f"--logit_std must be > 0 (got {v['logit_std']}).")
    return problems + noise_option_problems(v)


def noise_option_problems(v: dict[str, Any]) -> list[str]:
    """The checks of the noise options that flow matching and DDPM share (--noise_offset,
    --ip_noise_gamma, their random strengths, --adaptive_noise_scale, multires noise)."""
    problems = []
    for name in ("ip_noise_gamma", "noise_offset"):
        value = v[name]
        if value is not None and value < 0:
            problems.append(f"--{name} must be >= 0 (got {value}).")
        if v[f"{name}_random_strength"] and not value:
            problems.append(f"--{name}_random_strength needs --{name}.")
    if v["adaptive_noise_scale"] is not None and not v["noise_offset"]:
        problems.append("--adaptive_noise_scale needs --noise_offset.")
    iterations = v["multires_noise_iterations"]
    if iterations is not None and iterations < 1:
        problems.append(f"--multires_noise_iterations must be >= 1 (got {iterations}); leave it out to disable.")
    if not 0 < v["multires_noise_discount"] <= 1:
        problems.append(f"--multires_noise_discount must be in (0, 1] (got {v['multires_noise_discount']}).")
    return problems


def _format_problems(problems: list[str]) -> str:
    return "Invalid flow-matching options:\n" + "\n".join(f"  - {p}" for p in problems)


# ----------------------------------------------------------------------------------------------
# Random draws


def _rand(shape: Sequence[int], generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    where = generator.device if generator is not None else device
    return torch.rand(tuple(shape), generator=generator, device=where, dtype=torch.float32).to(device)


def _randn(
    shape: Sequence[int], generator: torch.Generator | None, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> Tensor:
    where = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=where, dtype=dtype).to(device)


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against `like` of any rank."""
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


# ----------------------------------------------------------------------------------------------
# σ sampling


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """The discrete flow shift S·σ / (1 + (S−1)·σ)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def resolution_mu(latent_hw: tuple[int, int]) -> float:
    """mu of the resolution-dependent shift from the packed (2×2) token count of the latent."""
    tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)
    slope = (_MU_MAX - _MU_BASE) / (_MU_MAX_TOKENS - _MU_BASE_TOKENS)
    return slope * tokens + (_MU_BASE - slope * _MU_BASE_TOKENS)


def time_shift(mu: float, sigmas: Tensor) -> Tensor:
    """e^mu / (e^mu + (1/σ − 1)), the FLUX.1 time shift (exponent 1)."""
    sigmas = sigmas.clamp(min=_TIME_SHIFT_MIN_SIGMA)
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def scheduler_sigma_table(shift: float) -> Tensor:
    """σ for indices 0..999 of a 1000-step FlowMatchEulerDiscrete scheduler with this shift.

    Index 0 is the noisiest (σ = 1), index 999 the cleanest (σ = shift(0.001)). Computed in
    float32 like the scheduler, so sampled values are bit-identical to sd-scripts'.
    """
    base = torch.linspace(1, NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS, dtype=torch.float32).flip(0)
    return shift_sigmas(base / NUM_TRAIN_TIMESTEPS, shift)


def sample_density_u(
    scheme: str,
    batch_size: int,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """u (B,) drawn from the timestep density of a weighting scheme (SD3 paper, section 3.1):
    logit_normal sigmoid(N(logit_mean, logit_std)); mode 1 − u − mode_scale·(cos²(πu/2) − 1 + u)
    with u ~ U(0,1); anything else U(0,1)."""
    if scheme == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * _randn((batch_size,), generator, device))
    u = _rand((batch_size,), generator, device)
    if scheme == "mode":
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def _sample_u_for_sigma_method(cfg: FlowMatchingConfig, batch_size: int, generator, device) -> Tensor:
    return sample_density_u(cfg.weighting_scheme, batch_size, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                            mode_scale=cfg.mode_scale, generator=generator, device=device)


def sample_sigmas(
    cfg: FlowMatchingConfig,
    batch_size: int,
    latent_hw: tuple[int, int],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Draw σ for a batch, shape (B,) float32 in [0, 1]. `latent_hw` is the latent (h, w)."""
    method = cfg.timestep_sampling
    if method == "sigma":
        u = _sample_u_for_sigma_method(cfg, batch_size, generator, device)
        # u == 1 cannot come from U[0,1) but the mode scheme maps u=0 to exactly 1; clamp
        # instead of indexing past the table.
        index = (u * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
        return scheduler_sigma_table(cfg.discrete_flow_shift).to(device)[index]
    if method == "uniform":
        return _rand((batch_size,), generator, device)
    if method == "nextdit_shift":
        return time_shift(resolution_mu(latent_hw), _rand((batch_size,), generator, device))
    sigmas = torch.sigmoid(cfg.sigmoid_scale * _randn((batch_size,), generator, device))
    if method == "sigmoid":
        return sigmas
    if method == "shift":
        return shift_sigmas(sigmas, cfg.discrete_flow_shift)
    if method == "flux_shift":
        return time_shift(resolution_mu(latent_hw), sigmas)
    raise ConfigError(f"unknown --timestep_sampling {method!r}")


def timesteps_from_sigmas(sigmas: Tensor) -> Tensor:
    """t = 1000·σ, the float timestep value logged and used by schedules such as Huber's."""
    return sigmas * NUM_TRAIN_TIMESTEPS


def validation_sigmas(num: int = 5, *, low: float = 0.1, high: float = 0.9) -> Tensor:
    """Fixed, evenly spread σ values for the validation loss (default 0.1, 0.3, ..., 0.9).

    Validation loss is computed at fixed noise levels (and a fixed seed) so that it moves
    only when the model does. The values ignore the family's shift on purpose: the same
    levels for every run make runs comparable.
    """
    if num < 1:
        raise ConfigError(f"validation needs at least one noise level (got {num}).")
    if num == 1:
        return torch.tensor([(low + high) / 2], dtype=torch.float32)
    return torch.linspace(low, high, num, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Noise and noisy input


def pyramid_noise(noise: Tensor, iterations: int, discount: float, *, generator: torch.Generator | None = None) -> Tensor:
    """Multi-resolution noise: noise + Σ_i discount^i · upsample(N(0,1) at size/r_i), r ∈ [2,4).

    The last two dims are spatial; all others are folded together, so 4-D and 5-D latents
    work alike. The result is renormalised to unit std over the whole tensor.
    """
    *lead, h, w = noise.shape
    out = noise.float().reshape(-1, 1, h, w).clone()
    for i in range(iterations):
        r = 2 + 2 * float(_rand((1,), generator, "cpu"))
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        level = _randn((out.shape[0], 1, hn, wn), generator, noise.device)
        out += F.interpolate(level, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if hn == 1 or wn == 1:
            break
    out = out / out.std()
    return out.reshape(*lead, h, w).to(noise.dtype)


def sample_noise(cfg: FlowMatchingConfig, latents: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """ε for a batch: N(0,1) shaped like `latents`, then the noise options (`offset_noise`).

    The result is used for the noisy input and for the target alike.
    """
    noise = _randn(latents.shape, generator, latents.device, latents.dtype)
    return offset_noise(cfg, noise, latents=latents, generator=generator)


def offset_noise(
    cfg: FlowMatchingConfig,
    noise: Tensor,
    *,
    latents: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Apply --noise_offset (with random strength and adaptive scale), then pyramid noise.

    The offset is offset·N(0,1) per sample and channel, constant over the other dims; one
    U(0,1) per batch scales it with random strength. `latents` are needed only for
    --adaptive_noise_scale. Returns `noise` itself when no option is set.
    """
    if cfg.noise_offset:
        offset: Tensor | float = cfg.noise_offset
        if cfg.noise_offset_random_strength:
            offset = offset * float(_rand((1,), generator, "cpu"))
        per_channel_shape = (*noise.shape[:2], *([1] * (noise.ndim - 2)))
        if cfg.adaptive_noise_scale is not None:
            if latents is None:
                raise ValueError("offset_noise needs the latents for --adaptive_noise_scale")
            spatial = tuple(range(2, latents.ndim))
            channel_mean = latents.float().mean(dim=spatial, keepdim=True).abs()
            offset = (offset + cfg.adaptive_noise_scale * channel_mean).clamp(min=0.0)
        shift = offset * _randn(per_channel_shape, generator, noise.device, torch.float32)
        noise = (noise + shift).to(noise.dtype)
    if cfg.multires_noise_iterations:
        noise = pyramid_noise(noise, cfg.multires_noise_iterations, cfg.multires_noise_discount, generator=generator)
    return noise


def make_noisy_input(
    cfg: FlowMatchingConfig,
    latents: Tensor,
    noise: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """x_σ = (1−σ)·x0 + σ·(ε + γ·ξ); γ = --ip_noise_gamma (× one U(0,1) per batch with random strength).

    Only the input is perturbed: build the target from the clean ε (`flow_target`).
    """
    s = _per_sample(sigmas, latents)
    if cfg.ip_noise_gamma:
        gamma = cfg.ip_noise_gamma
        if cfg.ip_noise_gamma_random_strength:
            gamma = gamma * float(_rand((1,), generator, "cpu"))
        xi = _randn(latents.shape, generator, latents.device, noise.dtype)
        noise = noise + gamma * xi
    return (1 - s) * latents + s * noise


def flow_target(latents: Tensor, noise: Tensor, *, reversed: bool = False) -> Tensor:
    """The velocity target ε − x0, or x0 − ε for models that point from noise to data (Lumina)."""
    return latents - noise if reversed else noise - latents


# ----------------------------------------------------------------------------------------------
# Prediction, target and loss weighting


def compute_loss_weighting(scheme: str, sigmas: Tensor) -> Tensor:
    """Per-sample loss weight: sigma_sqrt σ⁻², cosmap 2/(π(1−2σ+2σ²)), anything else 1."""
    if scheme == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if scheme == "cosmap":
        return (2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))).float()
    return torch.ones_like(sigmas, dtype=torch.float32)


class ProcessedPrediction(NamedTuple):
    """The prediction the loss compares with `loss_target`, and the per-sample weight (B,) or None."""

    pred: Tensor
    weighting: Tensor | None


def loss_target(cfg: FlowMatchingConfig, latents: Tensor, noise: Tensor) -> Tensor:
    """What the processed prediction is compared with.

    x0 for sigma_scaled (the prediction becomes an x0 estimate), else the velocity target
    (`flow_target`, reversed for Lumina-style models). Use the clean ε, not the ip-perturbed one.
    """
    if cfg.prediction_type == "sigma_scaled":
        return latents
    return flow_target(latents, noise, reversed=cfg.reversed_target)


def apply_model_prediction_type(
    cfg: FlowMatchingConfig, model_pred: Tensor, noisy: Tensor, sigmas: Tensor
) -> ProcessedPrediction:
    """Turn the model output into the prediction the loss compares with `loss_target`.

    raw: v̂. additive: v̂ + x_σ (as in sd-scripts). sigma_scaled: x_σ − σ·v, with v̂ turned
    into the ε − x0 convention first, which is an x0 estimate; `loss_target` gives x0 for it.
    sd-scripts compares this x0 estimate with the velocity, a bug (docs/compatibility_training.md).
    Since x0̂ − x0 = σ·(v − v̂), the x0 loss is the velocity loss scaled by σ, and with sigma_sqrt
    weighting exactly the velocity L2 loss. The weighting is returned when the loss is weighted
    (sigma_scaled, or always for families with `always_weight_loss`).
    """
    kind = cfg.prediction_type
    if kind == "raw":
        pred = model_pred
    elif kind == "additive":
        pred = model_pred + noisy
    elif kind == "sigma_scaled":
        velocity = -model_pred if cfg.reversed_target else model_pred
        pred = noisy - _per_sample(sigmas, noisy) * velocity
    else:
        raise ConfigError(f"unknown --model_prediction_type {kind!r}")
    weighting = compute_loss_weighting(cfg.weighting_scheme, sigmas) if cfg.weights_loss else None
    return ProcessedPrediction(pred=pred, weighting=weighting)


# ----------------------------------------------------------------------------------------------
# SD3 / SD3.5 (FORMATS 3.3): the one flow family that does not draw σ with --timestep_sampling.
# u comes from the weighting scheme's density, is shifted by --training_shift and becomes an
# integer timestep t in [--min_timestep, --max_timestep]; σ = t/1000. The prediction is turned
# into an x0 estimate x_σ − σ·v̂, compared with x0 and weighted by the scheme (σ⁻² or cosmap).

SD3_WEIGHTING_SCHEMES = ("uniform", "none", "logit_normal", "mode", "sigma_sqrt", "cosmap")
_NOISE_FIELDS = (
    "ip_noise_gamma", "ip_noise_gamma_random_strength", "noise_offset", "noise_offset_random_strength",
    "adaptive_noise_scale", "multires_noise_iterations", "multires_noise_discount",
)  # fmt: skip


def add_sd3_timestep_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare SD3's timestep, weighting and noise options (sd-scripts' names and defaults)."""
    group = parser.add_argument_group("SD3 timesteps, noise and loss weighting")
    group.add_argument(
        "--weighting_scheme",
        choices=list(SD3_WEIGHTING_SCHEMES),
        default="uniform",
        help="uniform/none: t uniform, loss unweighted. logit_normal (--logit_mean, --logit_std) and mode "
        "(--mode_scale): how t is drawn. sigma_sqrt (loss × σ⁻²) and cosmap (loss × 2/(π(1−2σ+2σ²))): "
        "t uniform, loss weighted. Default: uniform.",
    )
    group.add_argument("--logit_mean", type=float, default=0.0, help="Mean for logit_normal. Default 0.0.")
    group.add_argument("--logit_std", type=float, default=1.0, help="Std for logit_normal. Default 1.0.")
    group.add_argument("--mode_scale", type=float, default=1.29, help="Scale for the mode scheme. Default 1.29.")
    group.add_argument(
        "--training_shift",
        type=float,
        default=1.0,
        help="Shift S of the drawn u: S·u/(1+(S−1)·u). Above 1 samples the noisy side more (overall "
        "structure), below 1 the clean side (details). Default 1.0 (no shift).",
    )
    group.add_argument(
        "--min_timestep", type=int, default=None, help="Smallest timestep t (0-999) to train on. Default 0."
    )
    group.add_argument(
        "--max_timestep", type=int, default=None, help="Largest timestep t (1-1000) to train on. Default 1000."
    )
    add_flow_noise_arguments(group)
    add_ddpm_only_arguments(parser)


@dataclass(frozen=True)
class SD3FlowConfig:
    """SD3's timestep sampling and loss weighting, plus the shared noise options (`noise`)."""

    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    training_shift: float = 1.0
    min_timestep: int | None = None
    max_timestep: int | None = None
    noise: FlowMatchingConfig = dataclasses.field(
        default_factory=lambda: FlowMatchingConfig(timestep_sampling="uniform", model_prediction_type=None)
    )

    def __post_init__(self) -> None:
        problems = _sd3_problems(self)
        if problems:
            raise ConfigError(_format_problems(problems))

    @property
    def timestep_range(self) -> tuple[int, int]:
        return (
            0 if self.min_timestep is None else self.min_timestep,
            NUM_TRAIN_TIMESTEPS if self.max_timestep is None else self.max_timestep,
        )

    @property
    def weights_loss(self) -> bool:
        return self.weighting_scheme in _LOSS_WEIGHT_SCHEMES

    @classmethod
    def from_args(cls, args: Any) -> "SD3FlowConfig":
        """Build from parsed arguments; reports every problem (DDPM-only options, timestep and
        noise options) at once as one ConfigError."""
        problems = ddpm_only_option_problems(args)
        noise_defaults = FlowMatchingConfig.__dataclass_fields__
        noise = {name: getattr(args, name, noise_defaults[name].default) for name in _NOISE_FIELDS}
        noise["ip_noise_gamma_random_strength"] = bool(noise["ip_noise_gamma_random_strength"])
        noise["noise_offset_random_strength"] = bool(noise["noise_offset_random_strength"])
        noise_values = {
            **{name: f.default for name, f in noise_defaults.items()},
            **noise,
            "timestep_sampling": "uniform",
            "model_prediction_type": None,
            "weighting_scheme": "uniform",
        }
        problems += _config_problems(noise_values)
        own = {
            name: getattr(args, name, field.default)
            for name, field in cls.__dataclass_fields__.items()
            if name != "noise"
        }
        problems += _sd3_problems(SimpleNamespace(**own))
        if problems:
            raise ConfigError(_format_problems(problems))
        return cls(**own, noise=FlowMatchingConfig(**noise_values))

    def metadata(self) -> dict[str, str]:
        """sd-scripts' SD3 ss_* keys, plus ss_training_shift."""
        meta = {
            "ss_weighting_scheme": self.weighting_scheme,
            "ss_logit_mean": self.logit_mean,
            "ss_logit_std": self.logit_std,
            "ss_mode_scale": self.mode_scale,
            "ss_training_shift": self.training_shift,
        }
        return {k: str(v) for k, v in meta.items()}


def _sd3_problems(c: Any) -> list[str]:
    problems: list[str] = []
    if c.weighting_scheme not in SD3_WEIGHTING_SCHEMES:
        problems.append(f"--weighting_scheme {c.weighting_scheme!r}: choose one of {', '.join(SD3_WEIGHTING_SCHEMES)}.")
    if not c.training_shift > 0:
        problems.append(f"--training_shift must be > 0 (got {c.training_shift}).")
    if not c.logit_std > 0:
        problems.append(f"--logit_std must be > 0 (got {c.logit_std}).")
    t_min = 0 if c.min_timestep is None else c.min_timestep
    t_max = NUM_TRAIN_TIMESTEPS if c.max_timestep is None else c.max_timestep
    if not 0 <= t_min < t_max <= NUM_TRAIN_TIMESTEPS:
        problems.append(
            f"--min_timestep {t_min} / --max_timestep {t_max}: need 0 <= min_timestep < max_timestep <= "
            f"{NUM_TRAIN_TIMESTEPS}."
        )
    return problems


def sample_sd3_timesteps(
    cfg: SD3FlowConfig,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Integer timesteps t (B,) as float32: u from the weighting scheme's density, shifted by
    --training_shift, then floor(u·(t_max − t_min) + t_min). σ = t / 1000.

    sd-scripts casts t to the weight dtype (bf16 rounds t above 256 to even numbers and above
    512 to multiples of 4); we keep exact integers in float32.
    """
    u = sample_density_u(
        cfg.weighting_scheme,
        batch_size,
        logit_mean=cfg.logit_mean,
        logit_std=cfg.logit_std,
        mode_scale=cfg.mode_scale,
        generator=generator,
        device=device,
    )
    u = shift_sigmas(u, cfg.training_shift)
    t_min, t_max = cfg.timestep_range
    # the mode map can leave [0, 1] by a rounding error; keep t inside the asked range
    return torch.floor(u * (t_max - t_min) + t_min).clamp(t_min, t_max)


def sd3_loss_weighting(scheme: str, sigmas: Tensor) -> Tensor:
    """compute_loss_weighting, but 0 where σ = 0 (t = 0). There the x0 estimate x_σ − σ·v̂ is
    x0 exactly, so the sample has no loss and no gradient under any scheme; sigma_sqrt's σ⁻²
    would turn that 0 into 0·inf = NaN (as it does in sd-scripts)."""
    weighting = compute_loss_weighting(scheme, sigmas)
    return torch.where(sigmas > 0, weighting, torch.zeros_like(weighting))


def sd3_x0_prediction(model_pred: Tensor, noisy: Tensor, sigmas: Tensor) -> Tensor:
    """The MMDiT predicts the velocity v̂ (ε − x0 direction); x0 estimate = x_σ − σ·v̂."""
    return noisy - _per_sample(sigmas, noisy) * model_pred
