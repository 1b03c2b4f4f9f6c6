"""The rectified-flow half of the trainer contract, shared by FLUX, Chroma, Lumina and Anima.

A family that trains with flow matching subclasses FlowMatchingTrainer and sets the class
attributes that differ between them (FORMATS.md 3.3):
  - `reversed_time`: the model is fed 1 - sigma (Lumina) instead of sigma;
  - `reversed_target`: the velocity target is x0 - noise (Lumina) instead of noise - x0;
  - `always_weight_loss`: the weighting scheme applies whatever the prediction type (Anima).
"""

from __future__ import annotations

import torch

from library.training import flow_matching as fm
from library.training.losses import LossConfig
from library.training.trainer import NetworkTrainer, NoisyInput


class FlowMatchingTrainer(NetworkTrainer):
    reversed_time: bool = False
    reversed_target: bool = False
    always_weight_loss: bool = False

    def flow_config(self, args) -> fm.FlowMatchingConfig:
        if getattr(self, "_flow_cfg", None) is None:
            self._flow_cfg = fm.FlowMatchingConfig.from_args(
                args, reversed_target=self.reversed_target, always_weight_loss=self.always_weight_loss)
        return self._flow_cfg

    def noisy_input(self, args, latents: torch.Tensor, noise: torch.Tensor) -> NoisyInput:
        cfg = self.flow_config(args)
        b, _, h, w = latents.shape
        sigmas = fm.sample_sigmas(cfg, b, (h, w), device=latents.device)
        noise = fm.offset_noise(cfg, noise, latents=latents)
        noisy = fm.make_noisy_input(cfg, latents, noise, sigmas)
        target = fm.loss_target(cfg, latents, noise)
        return NoisyInput(noisy=noisy, timesteps=sigmas * 1000.0, sigmas=sigmas, target=target)

    def noisy_input_at(self, args, latents: torch.Tensor, noise: torch.Tensor, sigma: float) -> NoisyInput:
        cfg = self.flow_config(args)
        sigmas = torch.full((latents.shape[0],), float(sigma), device=latents.device)
        noisy = fm.make_noisy_input(cfg, latents, noise, sigmas)
        return NoisyInput(noisy=noisy, timesteps=sigmas * 1000.0, sigmas=sigmas,
                          target=fm.loss_target(cfg, latents, noise))

    def model_time(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The time value the network is fed."""
        return 1.0 - sigmas if self.reversed_time else sigmas

    def loss_terms(self, args, model_pred: torch.Tensor, noisy: NoisyInput):
        pred, weighting = fm.apply_model_prediction_type(self.flow_config(args), model_pred, noisy.noisy, noisy.sigmas)
        return pred, weighting

    def loss_config(self, args) -> LossConfig:
        return LossConfig.from_args(args, flow=True)

    def flow_metadata(self, args) -> dict:
        return self.flow_config(args).metadata()
