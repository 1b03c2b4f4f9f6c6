"""NetworkTrainer: the one training loop every family shares.

A family subclasses it and implements the REQUIRED hooks (each raises NotImplementedError
naming itself until it does). `train()` reads like a table of contents; each phase is a small
method that takes the run's state object.

Required hooks (family):
    add_family_arguments(parser)        its own options (model files, text settings, ...)
    load_models(args, device)           -> FamilyModels (denoiser + encoders, frozen)
    latent_encoder(args, models)        -> LatentCacheEncoder (images -> scaled latents)
    text_encoding(args, models)         -> TextCacheEncoder (captions -> per-caption dicts)
    noisy_input(args, latents, noise)   -> NoisyInput (noising, timesteps, target)
    denoise(args, models, noisy, text)  -> model prediction in latent layout
    loss_terms(args, pred, noisy)       -> (prediction for the loss, weighting or None)
    loss_config(args)                   -> LossConfig (element loss, Huber schedule)
    generate_sample(args, models, prompt, text_conds, device) -> PIL image
    metadata_extras(args, models)       -> (base_model_version, family ss_* dict, modelspec dict)
Optional hooks: validate_family_args, reso_step_multiple, default_resolution,
    prepare_models_for_training, on_models_loaded.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import random
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from library.data import add_dataset_arguments, build_datasets, data_loader_workers, group_metadata, group_report
from library.errors import ConfigError, UserError
from library.training import args as common_args
from library.training import checkpoints as ckpt
from library.training.config_file import parse_args_with_config, write_config_file
from library.training.file_hashes import BackgroundFileHash
from library.training.losses import add_loss_arguments, LossConfig, compute_per_sample_loss, resize_mask_to_latent
from library.training.lr_schedulers import add_lr_scheduler_arguments, build_lr_scheduler
from library.training import memory
from library.training import trackers
from library.training import metadata as meta_lib
from library.training.optimizers import add_optimizer_arguments, build_optimizer
from library.training.sample_gallery import SampleRow, write_gallery
from library.training.sample_prompts import SamplePrompt, load_sample_prompts
from library.training.startup_time import report_startup_time
from library.training.step_graphs import (StepGraphs, check_cuda_graph_args, cuda_graph_tip,
                                          learning_rates_on_device, learning_rates_on_host)
from library.training.step_metrics import LaggedScalar, is_bad_loss
from library.training import validation as val_lib


@dataclass
class FamilyModels:
    """The frozen models a family loads. `denoiser` is what the LoRA is injected into."""
    denoiser: torch.nn.Module
    text_encoders: list[torch.nn.Module | None]
    vae: torch.nn.Module | None
    info: object = None                     # e.g. the checkpoint inspection result
    extra: dict = field(default_factory=dict)


@dataclass
class NoisyInput:
    noisy: torch.Tensor       # model input, latent layout
    timesteps: torch.Tensor   # (B,) in the family's convention, for logging and schedules
    sigmas: torch.Tensor      # (B,) noise level in [0,1]
    target: torch.Tensor      # what the prediction is compared with


@dataclass
class RunState:
    """Everything the phases of a run share, instead of 20-argument calls."""
    args: argparse.Namespace
    accelerator: object
    device: torch.device
    weight_dtype: torch.dtype
    models: FamilyModels
    train_group: object
    loader: object
    network: torch.nn.Module
    optimizer: object
    lr_scheduler: object
    num_epochs: int
    max_steps: int
    steps_per_epoch: int
    metadata: dict
    session_id: str
    global_step: int = 0
    epoch: int = 0
    sample_prompts: list[SamplePrompt] = field(default_factory=list)
    sample_conds: dict = field(default_factory=dict)
    sample_rows: list[SampleRow] = field(default_factory=list)
    metrics_file: Path | None = None
    optimizer_info: object = None           # BuiltOptimizer: name, description, schedule-free flag
    val_loader: object = None               # EpochLoader over the validation split, or None
    last_val_loss: float | None = None
    last_val_step: int | None = None
    trained_text_encoders: frozenset = frozenset()   # indices of text encoders with LoRA modules
    progress: object = None                 # the tqdm bar
    postfix: dict = field(default_factory=dict)   # what the bar shows after the step count
    block_swap: object = None               # library.offload.BlockSwap with --blocks_to_swap, else None
    step_graphs: StepGraphs | None = None   # with --cuda_graph


class NetworkTrainer:
    """Base class of the family trainers. See the module docstring for the hook contract."""

    # ---- required hooks ---------------------------------------------------------------------
    def add_family_arguments(self, parser: argparse.ArgumentParser) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement add_family_arguments")

    def load_models(self, args, device: torch.device, weight_dtype: torch.dtype) -> FamilyModels:
        raise NotImplementedError(f"{type(self).__name__} must implement load_models")

    def latent_encoder(self, args, models: FamilyModels, device: torch.device):
        raise NotImplementedError(f"{type(self).__name__} must implement latent_encoder")

    def text_encoding(self, args, models: FamilyModels, device: torch.device):
        raise NotImplementedError(f"{type(self).__name__} must implement text_encoding")

    def noisy_input(self, args, latents: torch.Tensor, noise: torch.Tensor) -> NoisyInput:
        raise NotImplementedError(f"{type(self).__name__} must implement noisy_input")

    def noisy_input_at(self, args, latents: torch.Tensor, noise: torch.Tensor, sigma: float) -> NoisyInput:
        """Like noisy_input, at one fixed noise level σ in (0, 1) for the whole batch (validation)."""
        raise NotImplementedError(f"{type(self).__name__} must implement noisy_input_at")

    def denoise(self, args, models: FamilyModels, noisy: NoisyInput, text: dict) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement denoise")

    def loss_terms(self, args, model_pred: torch.Tensor, noisy: NoisyInput):
        raise NotImplementedError(f"{type(self).__name__} must implement loss_terms")

    def loss_config(self, args) -> LossConfig:
        raise NotImplementedError(f"{type(self).__name__} must implement loss_config")

    def generate_sample(self, args, models: FamilyModels, prompt: SamplePrompt, conds: dict,
                        device: torch.device, dtype: torch.dtype):
        raise NotImplementedError(f"{type(self).__name__} must implement generate_sample")

    def metadata_extras(self, args, models: FamilyModels) -> tuple[str, dict, dict]:
        raise NotImplementedError(f"{type(self).__name__} must implement metadata_extras")

    # ---- optional hooks ---------------------------------------------------------------------
    reso_step_multiple: int = 64
    default_resolution: int = 512
    # Options the shared checks refuse as unsupported, which this family implements itself.
    handled_options: frozenset = frozenset()

    def validate_family_args(self, args) -> None:
        """Refuse impossible option combinations before anything is loaded."""

    def block_lists(self, models: FamilyModels) -> list[torch.nn.ModuleList]:
        """The denoiser's lists of transformer blocks, in execution order: what --torch_compile
        compiles one by one, --blocks_to_swap swaps and --fp8_base stores in fp8."""
        return []

    def cuda_graph_blockers(self, args) -> list[str]:
        """Why this family's training step, with these options, cannot be recorded as a CUDA graph
        (--cuda_graph): per-step draws on the CPU, values read back to Python. Empty: it can."""
        return []

    def model_name(self, models: FamilyModels) -> str:
        """How messages name the loaded denoiser (e.g. "FLUX.1 dev")."""
        return type(models.denoiser).__name__

    def activation_bytes_estimate(self, args, models: FamilyModels, batch: int, height: int, width: int) -> int | None:
        """Activation memory of one training step for a batch of `batch` images of height x width
        pixels (for --blocks_to_swap auto); None when the family has no estimate."""
        return None

    def encode_text_for_training(self, args, models: FamilyModels, captions: list[str], cached: dict | None,
                                 trained: frozenset, device: torch.device) -> dict:
        """Text-encoder LoRA training: run the trained encoders (indices in `trained`) on the
        captions with gradients and return the same dict as a cached batch. `cached` holds the
        frozen encoders' outputs when they are cached (it may be None): reuse those parts."""
        raise NotImplementedError(f"{type(self).__name__} does not support text-encoder LoRA training yet")

    def encode_prompts_for_sampling(self, args, models: FamilyModels, prompts: list[SamplePrompt],
                                    device: torch.device) -> dict:
        """Encode sample prompts once at start (text encoders may be dropped afterwards)."""
        encoder = self.text_encoding(args, models, device)
        texts = sorted({p.prompt for p in prompts} | {p.negative_prompt or "" for p in prompts})
        with torch.no_grad():
            return dict(zip(texts, encoder.encode(texts)))

    # ---- argument parsing ---------------------------------------------------------------------
    def build_parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        common_args.add_config_arguments(parser)
        common_args.add_model_io_arguments(parser)
        common_args.add_training_arguments(parser)
        common_args.add_network_arguments(parser)
        common_args.add_sampling_arguments(parser)
        common_args.add_logging_arguments(parser)
        memory.add_memory_arguments(parser)
        add_dataset_arguments(parser)
        add_optimizer_arguments(parser)
        add_lr_scheduler_arguments(parser)
        add_loss_arguments(parser)
        val_lib.add_validation_arguments(parser)
        meta_lib.add_metadata_arguments(parser)
        self.add_family_arguments(parser)
        return parser

    def parse_args(self, argv: list[str] | None = None) -> argparse.Namespace:
        parser = self.build_parser()
        args = parse_args_with_config(parser, argv)
        if args.output_config:
            if not args.config_file:
                raise ConfigError("--output_config writes to the --config_file path: give --config_file too")
            path = write_config_file(args, parser, args.config_file)
            print(f"wrote {path}")
            raise SystemExit(0)
        return args

    def check_args(self, args) -> None:
        common_args.check_common_args(args)
        common_args.refuse_unsupported(args, handled=self.handled_options)
        meta_lib.check_metadata_args(args)
        self.validate_family_args(args)
        if args.cuda_graph:
            check_cuda_graph_args(args, self.cuda_graph_blockers(args))
        for note in memory.check_memory_args(args):
            print(f"note: {note}")
        if args.ddp_gradient_as_bucket_view or args.ddp_static_graph:
            print("note: --ddp_gradient_as_bucket_view / --ddp_static_graph have no effect here: the LoRA's "
                  "gradients are averaged across GPUs directly, without a DDP wrapper")
        self._loss_config = self.loss_config(args)

    # ---- the run ------------------------------------------------------------------------------
    def train(self, args: argparse.Namespace) -> Path | None:
        """Prepare, cache, build the network, loop, save. Returns the final LoRA path."""
        self.check_args(args)
        if args.seed is None:
            args.seed = random.randint(0, 2**31 - 1)
        accelerator = self.make_accelerator(args)
        device = accelerator.device
        if args.cuda_graph and (device.type != "cuda" or accelerator.num_processes > 1):
            raise ConfigError(f"--cuda_graph records the training step as a CUDA graph: it needs one CUDA GPU, and this "
                              f"run has {accelerator.num_processes} process(es) on {device.type}; remove --cuda_graph")
        weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]

        train_group, val_group = build_datasets(args, reso_step_multiple=self.reso_step_multiple,
                                                default_resolution=self.default_resolution)
        val_lib.check_validation_args(args, val_group is not None)
        if args.masked_loss and not (train_group.has_alpha_masks or train_group.has_mask_images):
            raise ConfigError("--masked_loss needs masks: set alpha_mask = true in the dataset config's subsets "
                              "(or pass --alpha_mask) to use the images' alpha channel, or give a subset "
                              "conditioning_data_dir = \"folder of mask images\" (same file names, red channel).")
        if train_group.has_mask_images and not args.masked_loss:
            raise ConfigError("a subset has conditioning_data_dir (mask images), which only the masked loss uses: "
                              "add --masked_loss, or remove conditioning_data_dir")
        if accelerator.is_main_process:   # one report, not one per GPU
            print(group_report(train_group))
            if val_group is not None:
                print("validation set:\n" + group_report(val_group))
        if args.dataset_report:
            return None

        set_seed(args.seed)
        # hashing a 22 GB checkpoint takes ~30 s: do it beside the run, not before it
        self._model_hash = BackgroundFileHash(args.pretrained_model_name_or_path)
        phase = time.perf_counter()
        models = self.load_models(args, device, weight_dtype)
        self._report_phase("models loaded", phase, accelerator)
        phase = time.perf_counter()
        for group in (train_group, val_group):
            if group is not None:
                self.cache(args, models, group, device)
        self._report_phase("caching done", phase, accelerator)
        phase = time.perf_counter()
        state = self.prepare_run(args, accelerator, device, weight_dtype, models, train_group, val_group)
        self._report_phase("network built, models placed", phase, accelerator)
        self.loop(state)
        return self.finish(state)

    @staticmethod
    def _report_phase(what: str, since: float, accelerator) -> None:
        """One line per setup phase with its duration: where the time before the first step goes."""
        if accelerator.is_main_process:
            print(f"{what} in {time.perf_counter() - since:.1f} s")

    def make_accelerator(self, args):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import ProjectConfiguration

        # A second run in the same process (tests, notebooks) with another --mixed_precision: accelerate
        # keeps its settings process-wide and refuses the change; forget them (the distributed setup,
        # PartialState, stays).
        state = AcceleratorState._shared_state
        if state and state.get("_mixed_precision") not in (None, args.mixed_precision):
            AcceleratorState._reset_state(reset_partial_state=False)

        logging_dir, log_with = trackers.logging_setup(args)
        project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir)
        handlers = []
        if getattr(args, "ddp_timeout", None):
            from datetime import timedelta

            from accelerate.utils import InitProcessGroupKwargs

            handlers.append(InitProcessGroupKwargs(timeout=timedelta(minutes=args.ddp_timeout)))
        return Accelerator(mixed_precision=args.mixed_precision, log_with=log_with, project_config=project,
                           kwargs_handlers=handlers)

    def cache(self, args, models: FamilyModels, group, device) -> None:
        """Encode latents and captions once (to memory or disk) when asked."""
        if args.cache_latents or args.cache_latents_to_disk:
            group.cache_latents(self.latent_encoder(args, models, device), to_disk=bool(args.cache_latents_to_disk),
                                batch_size=args.vae_batch_size, skip_check=args.skip_cache_check)
        if args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk:
            group.cache_text_outputs(self.text_encoding(args, models, device),
                                     to_disk=bool(args.cache_text_encoder_outputs_to_disk),
                                     batch_size=args.text_encoder_batch_size or args.train_batch_size or 1,
                                     skip_check=args.skip_cache_check)

    def create_network(self, args, models: FamilyModels) -> torch.nn.Module:
        try:
            module = importlib.import_module(args.network_module)
        except ImportError as e:
            raise ConfigError(f"--network_module {args.network_module}: cannot import it ({e}).") from e
        net_kwargs = parse_network_args(args.network_args)
        if args.dim_from_weights:
            network, _ = module.create_network_from_weights(1.0, args.network_weights, models.vae,
                                                            models.text_encoders, models.denoiser, **net_kwargs)
        else:
            network = module.create_network(1.0, args.network_dim, args.network_alpha, models.vae,
                                            models.text_encoders, models.denoiser,
                                            neuron_dropout=args.network_dropout, **net_kwargs)
        network.apply_to(models.text_encoders, models.denoiser, apply_text_encoder=not args.network_train_unet_only,
                         apply_unet=not args.network_train_text_encoder_only)
        if args.network_weights:
            print(network.load_weights(args.network_weights))
        return network

    def prepare_run(self, args, accelerator, device, weight_dtype, models: FamilyModels, group,
                    val_group=None) -> RunState:
        for m in [models.denoiser, *models.text_encoders, models.vae]:
            if m is not None:
                m.requires_grad_(False)
        swapping = args.blocks_to_swap not in (None, 0)
        if args.fp8_base:   # before the LoRA: it must wrap the fp8 forward
            print(memory.quantize_base(models.denoiser, self.block_lists(models), device, weight_dtype,
                                       model_name=self.model_name(models), keep_on_device=not swapping))
        network = self.create_network(args, models)
        trained_tes = frozenset(m.text_encoder_index for m in network.text_encoder_loras)
        network.to(device)
        if args.full_bf16:
            network.to(torch.bfloat16)
        if args.gradient_checkpointing:
            selective = {"selective": True} if getattr(args, "selective_checkpointing", False) else {}
            models.denoiser.enable_gradient_checkpointing(cpu_offload=memory.offloads_checkpoints(args), **selective)

        te_lr = args.text_encoder_lr
        params, _descriptions = network.prepare_optimizer_params(
            text_encoder_lr=te_lr, unet_lr=args.unet_lr, default_lr=args.learning_rate)
        opt = build_optimizer(args.optimizer_type, args.optimizer_args or [], params, args.learning_rate,
                              use_8bit_adam=args.use_8bit_adam, use_lion_optimizer=args.use_lion_optimizer,
                              capturable=args.cuda_graph)
        if args.cuda_graph:
            learning_rates_on_device(opt.optimizer, device)

        # Each process (one per GPU) gets its own share of every epoch; the step counter the captions
        # see (token warm-up) is the optimizer step.
        loader = group.loader(seed=args.seed, num_workers=data_loader_workers(args),
                              persistent_workers=args.persistent_data_loader_workers,
                              pin_memory=device.type == "cuda", num_processes=accelerator.num_processes,
                              process_index=accelerator.process_index,
                              gradient_accumulation_steps=args.gradient_accumulation_steps)
        steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
        if args.max_train_epochs:
            max_steps = steps_per_epoch * args.max_train_epochs
        else:
            max_steps = args.max_train_steps
        num_epochs = math.ceil(max_steps / steps_per_epoch)
        lr_scheduler = build_lr_scheduler(args, opt.optimizer, num_training_steps=max_steps,
                                          num_processes=accelerator.num_processes)
        optimizer, lr_scheduler = accelerator.prepare(opt.optimizer, lr_scheduler)
        accelerator.register_for_checkpointing(network)

        session_id = uuid.uuid4().hex
        started = time.time()
        base_version, family_meta, modelspec_info = self.metadata_extras(args, models)
        metadata = meta_lib.training_metadata(
            args, session_id=session_id, training_started_at=started, num_train_images=group.num_train_images,
            num_reg_images=group.num_reg_images,
            num_validation_images=val_group.num_train_images if val_group is not None else 0,
            num_batches_per_epoch=len(loader), num_epochs=num_epochs, optimizer_description=opt.description,
            base_model_version=base_version, dataset_metadata=group_metadata(group),
            network_module=args.network_module, network_dim=args.network_dim, network_alpha=args.network_alpha,
            network_args=parse_network_args(args.network_args) or None, model_file_hashes={},
            family_metadata=family_meta)
        metadata.update(meta_lib.modelspec_from_args(args, timestamp=started, **modelspec_info))

        state = RunState(args=args, accelerator=accelerator, device=device, weight_dtype=weight_dtype,
                         models=models, train_group=group, loader=loader, network=network, optimizer=optimizer,
                         lr_scheduler=lr_scheduler, num_epochs=num_epochs, max_steps=max_steps,
                         steps_per_epoch=steps_per_epoch, metadata=metadata, session_id=session_id,
                         metrics_file=Path(args.output_dir) / f"{args.output_name or 'training'}_log.jsonl",
                         optimizer_info=opt, trained_text_encoders=trained_tes)
        if args.cuda_graph:
            state.step_graphs = StepGraphs(lambda inputs, key: self.recordable_step(state, inputs, key), device,
                                           reset=lambda: state.optimizer.zero_grad(set_to_none=True))
        elif accelerator.is_main_process:
            tip = cuda_graph_tip(args, self.cuda_graph_blockers(args), device, accelerator.num_processes)
            if tip:
                print(tip)
        if val_group is not None:
            # its own seed: the validation batches never depend on the training seed's data order
            state.val_loader = val_group.loader(seed=self.validation_seed(args), num_workers=0,
                                                pin_memory=device.type == "cuda")
        if args.sample_prompts:
            state.sample_prompts = load_sample_prompts(args.sample_prompts)
            state.sample_conds = self.encode_prompts_for_sampling(args, models, state.sample_prompts, device)
        self.after_caching(args, models, device, keep=trained_tes)
        if trained_tes:
            self.text_encoding(args, models, device)   # puts the encoders on the device
        self.place_denoiser(state, group)
        if accelerator.is_main_process:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            trackers.init_trackers(accelerator, args)
        return state

    def after_caching(self, args, models: FamilyModels, device, keep: frozenset = frozenset()) -> None:
        """Free what the cache made unnecessary. Text encoders whose outputs are all cached, except
        the trained ones in `keep`, are never run again: their weights are dropped, not copied
        back to the CPU as sd-scripts does (T5-XXL's 9 GB take ~8 s to copy, and the copy would
        only hold host memory). The VAE goes to the CPU unless samples need it. --highvram keeps
        everything where it is."""
        if args.highvram:
            return
        if args.cache_latents or args.cache_latents_to_disk:
            if models.vae is not None and not args.sample_prompts:
                models.vae.to("cpu")
        if args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk:
            for index, te in enumerate(models.text_encoders):
                if te is not None and index not in keep:
                    memory.release_module(te, "its outputs are cached")

    def place_denoiser(self, state: RunState, group) -> None:
        """The denoiser onto the device, with --blocks_to_swap when asked (then per-block
        compile is refused at argument checking), and --torch_compile."""
        args, models = state.args, state.models
        lists = self.block_lists(models)
        batch, height, width = memory.largest_batch_pixels(group)
        placement = memory.place_denoiser(
            models.denoiser, lists, state.device, args.blocks_to_swap, model_name=self.model_name(models),
            auto_fixed_bytes=lambda: memory.bytes_outside_blocks(models.denoiser, lists,
                                                                 state.network.get_trainable_params()),
            auto_activation_bytes=lambda: self.activation_bytes_estimate(args, models, batch, height, width))
        state.block_swap = placement.swap
        if placement.message:
            print(placement.message)
        if args.torch_compile:
            compile_blocks(lists, args.dynamo_backend)
            print(f"--torch_compile: {sum(len(b) for b in lists)} blocks compile ({args.dynamo_backend}) as they first run, "
                  "so the first step takes longer (FLUX.1-dev on an H200: about 35 s, then 0.55 s per step against "
                  "0.70-0.75 s without; docs/benchmarks.md)")

    # ---- the loop -----------------------------------------------------------------------------
    def loop(self, state: RunState) -> None:
        args, acc = state.args, state.accelerator
        start_epoch, skip_batches = 0, 0
        if args.resume:
            start_epoch, skip_batches = self.resume(state)
            # the loaded optimizer state brings its learning rates, as tensors or floats
            if state.step_graphs is not None:
                learning_rates_on_device(state.optimizer, state.device)
            else:
                learning_rates_on_host(state.optimizer)
        elif args.initial_epoch or args.initial_step:
            start_epoch, skip_batches = self.initial_position(state)

        progress = tqdm(total=state.max_steps, initial=state.global_step, desc="steps", smoothing=0,
                        disable=not acc.is_main_process, dynamic_ncols=True)
        state.progress = progress
        losses = LaggedScalar(state.device)
        lrs = LaggedScalar(state.device)   # with --cuda_graph the learning rate is a GPU tensor: read it lagged too
        recent: list[float] = []
        if args.sample_at_first and state.global_step == 0:
            self.sample(state, label_step=0)

        state.network.train()
        accum = args.gradient_accumulation_steps
        startup_reported = False
        for epoch in range(start_epoch, state.num_epochs):
            state.epoch = epoch
            pending = 0
            batches_done = skip_batches
            for batch in state.loader.epoch(epoch + 1, skip_batches=skip_batches):  # the loader counts from 1
                pending += 1
                batches_done += 1
                updates = pending == accum or batches_done == len(state.loader)
                if state.step_graphs is not None:   # backward and update recorded with the forward
                    loss = self.recorded_step(state, batch, updates)
                else:
                    loss = self.training_step(state, batch) / accum
                    acc.backward(loss)
                    if updates:
                        self.update_weights(state)
                if updates:
                    self.after_weight_update(state)
                    pending = 0
                    state.global_step += 1
                    if not startup_reported and acc.is_main_process:   # this process's first step (resumes too)
                        report_startup_time(state.device)
                    startup_reported = True
                    losses.push(state.global_step, loss * accum)
                    lrs.push(state.global_step, state.lr_scheduler.get_last_lr()[0])
                    self.report_losses(state, losses.pop_ready(), lrs.pop_ready(), recent, progress)
                    progress.update(1)
                    self.after_step(state, batches_done)
                    if state.global_step >= state.max_steps:
                        break
            skip_batches = 0
            self.report_losses(state, losses.pop_ready(keep_last=False), lrs.pop_ready(keep_last=False), recent,
                               progress)
            if state.global_step >= state.max_steps and batches_done < len(state.loader):
                break
            self.after_epoch(state, epoch + 1)
        self.report_losses(state, losses.pop_ready(keep_last=False), lrs.pop_ready(keep_last=False), recent, progress)
        progress.close()

    def training_step(self, state: RunState, batch: dict) -> torch.Tensor:
        latents = self.batch_latents(state, batch)
        text = self.batch_text(state, batch)
        noise = torch.randn_like(latents)
        noisy = self.noisy_input(state.args, latents, noise)
        return self.batch_loss(state, batch, noisy, text)

    # --cuda_graph: the step from the batch's tensors to the updated weights, as one function
    @staticmethod
    def recordable_inputs(batch: dict) -> dict:
        """The batch's tensors the step reads (cached latents and text outputs, loss weights, masks)."""
        inputs = {"latents": batch["latents"], "text": batch["text"], "loss_weights": batch["loss_weights"]}
        for key in ("conditioning_masks", "alpha_masks"):
            if batch.get(key) is not None:
                inputs[key] = batch[key]
        return inputs

    def recorded_step(self, state: RunState, batch: dict, updates: bool) -> torch.Tensor:
        """One micro-batch through state.step_graphs; the recording keeps as constants the LoRA
        multiplier of the batch's subset and whether the optimizer steps after it."""
        graphs = state.step_graphs
        # With accumulation, the recorded micro-steps add into the gradient tensors that the
        # recorded update reads: a recording that gave a parameter a new gradient tensor would
        # break that link, so recording stops then (that window's gradients are dropped).
        watch = state.args.gradient_accumulation_steps > 1 and graphs.disabled_because is None
        recorded, before = graphs.recorded_shapes, self._gradient_addresses(state) if watch else None
        loss = graphs(self.recordable_inputs(batch), key=(float(batch["network_multipliers"][0]), updates))
        if watch and graphs.recorded_shapes != recorded and None not in before:
            if self._gradient_addresses(state) != before:
                graphs.turn_off("a recording replaced the gradient tensors that accumulation adds into")
        return loss

    def recordable_step(self, state: RunState, inputs: dict, key: tuple) -> torch.Tensor:
        multiplier, updates = key
        loss = self.training_step(state, dict(inputs, network_multipliers=[multiplier]))
        loss = loss / state.args.gradient_accumulation_steps
        state.accelerator.backward(loss)
        if updates:
            self.update_weights(state)
        return loss.detach()

    @staticmethod
    def _gradient_addresses(state: RunState) -> list:
        return [None if p.grad is None else p.grad.data_ptr() for p in state.network.get_trainable_params()]

    def batch_loss(self, state: RunState, batch: dict, noisy: NoisyInput, text: dict) -> torch.Tensor:
        """The loss of one batch at the given noisy input (training and validation alike)."""
        args, device = state.args, state.device
        state.network.set_multiplier(float(batch["network_multipliers"][0]))
        with state.accelerator.autocast():
            model_pred = self.denoise(args, state.models, noisy, text)
        pred, weighting = self.loss_terms(args, model_pred.float(), noisy)
        per_sample = compute_per_sample_loss(
            self._loss_config, pred, noisy.target.float(), timesteps=noisy.timesteps, sigmas=noisy.sigmas,
            weighting=weighting, mask=self.loss_mask(state, batch, pred),
            loss_weights=batch["loss_weights"].to(device))
        return per_sample.mean()

    def loss_mask(self, state: RunState, batch: dict, pred: torch.Tensor) -> torch.Tensor | None:
        """The per-pixel loss mask at latent size: the mask images (conditioning_data_dir, with
        --masked_loss) first, else the alpha channel when alpha_mask is on (sd-scripts applies it
        with or without --masked_loss), else none."""
        masks = batch.get("conditioning_masks")
        if masks is None:
            masks = batch.get("alpha_masks")
        if masks is None:
            return None
        return resize_mask_to_latent(masks.to(state.device, non_blocking=True), tuple(pred.shape[-2:]))

    # ---- validation ---------------------------------------------------------------------------
    @staticmethod
    def validation_seed(args) -> int:
        return args.validation_seed if args.validation_seed is not None else args.seed

    def validate(self, state: RunState) -> float:
        """Mean loss over the validation batches at the fixed noise levels (see validation.py)."""
        args = state.args
        limit = args.max_validation_steps or len(state.val_loader)
        seed = self.validation_seed(args)
        total, count = 0.0, 0
        with preserved_rng(state.device), self.eval_mode(state), torch.no_grad():
            for index, batch in enumerate(state.val_loader.epoch(1)):
                if index >= limit:
                    break
                latents = self.batch_latents(state, batch)
                text = self.batch_text(state, batch)
                noise = val_lib.validation_noise(latents, seed, index)
                for sigma in val_lib.VALIDATION_SIGMAS:
                    noisy = self.noisy_input_at(args, latents, noise, sigma)
                    total += float(self.batch_loss(state, batch, noisy, text))
                    count += 1
        return total / max(count, 1)

    def run_validation(self, state: RunState) -> None:
        if state.last_val_step == state.global_step:   # e.g. a step multiple that is also an epoch end
            return
        value = self.validate(state)
        state.last_val_loss, state.last_val_step = value, state.global_step
        if not state.accelerator.is_main_process:
            return
        with open(state.metrics_file, "a") as f:
            f.write(json.dumps({"step": state.global_step, "epoch": state.epoch + 1, "val_loss": value}) + "\n")
        if state.accelerator.log_with:
            state.accelerator.log({"loss/validation": value}, step=state.global_step)
        state.postfix["val_loss"] = f"{value:.4f}"
        if state.progress is not None:
            state.progress.set_postfix(state.postfix)

    def batch_latents(self, state: RunState, batch: dict) -> torch.Tensor:
        if "latents" in batch:
            return batch["latents"].to(state.device, non_blocking=True)
        encoder = self.latent_encoder(state.args, state.models, state.device)
        with torch.no_grad():
            return encoder.encode(batch["images"]).to(state.device)

    def batch_text(self, state: RunState, batch: dict) -> dict:
        cached = {k: v.to(state.device, non_blocking=True) for k, v in batch["text"].items()} if "text" in batch else None
        if state.trained_text_encoders:
            with state.accelerator.autocast():
                return self.encode_text_for_training(state.args, state.models, batch["captions"], cached,
                                                     state.trained_text_encoders, state.device)
        if cached is not None:
            return cached
        encoder = self.text_encoding(state.args, state.models, state.device)
        with torch.no_grad():
            return stack_text_outputs(encoder.encode(batch["captions"]), state.device)

    def update_weights(self, state: RunState) -> None:
        """Gradients (averaged across GPUs) to weights: what --cuda_graph records with the step."""
        args, acc = state.args, state.accelerator
        params = state.network.get_trainable_params()
        if acc.num_processes > 1:
            # the network is not wrapped in DDP (its forward is never called), so average by hand
            for p in params:
                if p.grad is not None:
                    p.grad = acc.reduce(p.grad, reduction="mean")
        state.network.before_optimizer_step()
        if args.max_grad_norm and args.max_grad_norm > 0:
            acc.clip_grad_norm_(params, args.max_grad_norm)
        state.optimizer.step()
        # With recorded accumulation the gradients stay where the recordings add into (zeroed).
        state.optimizer.zero_grad(set_to_none=state.step_graphs is None or args.gradient_accumulation_steps == 1)

    def after_weight_update(self, state: RunState) -> None:
        """The Python side of an optimizer step: the next learning rate, max-norm regularisation."""
        args = state.args
        state.lr_scheduler.step()
        if args.scale_weight_norms:
            state.network.apply_max_norm_regularization(args.scale_weight_norms, state.device)

    def report_losses(self, state: RunState, ready: list[tuple[int, float]], ready_lrs: list[tuple[int, float]],
                      recent: list[float], progress) -> None:
        """Log the losses whose values reached the host, each with the learning rate after its step."""
        if not ready:
            return
        lr_at = dict(ready_lrs)
        for step, value in ready:
            if is_bad_loss(value):
                raise TrainingDiverged(
                    f"the loss became {value} at step {step}. Nothing was saved from this point; the last "
                    "saved LoRA is intact. Try a lower --learning_rate, --max_grad_norm 1.0, or "
                    "--mixed_precision bf16 instead of fp16.")
            recent.append(value)
        if state.accelerator.is_main_process:   # one log for the run (the main process's losses, as sd-scripts)
            with open(state.metrics_file, "a") as f:
                for step, value in ready:
                    lr = lr_at[step]
                    f.write(json.dumps({"step": step, "epoch": state.epoch + 1, "loss": value, "lr": lr}) + "\n")
                    if state.accelerator.log_with:
                        state.accelerator.log({"loss/current": value, "lr/unet": lr}, step=step)
        del recent[:-100]
        state.postfix.update(loss=f"{ready[-1][1]:.4f}", avr_loss=f"{sum(recent) / len(recent):.4f}",
                             lr=f"{lr_at[ready[-1][0]]:.2e}")
        progress.set_postfix(state.postfix)

    def after_step(self, state: RunState, batches_done: int) -> None:
        args, step = state.args, state.global_step
        if state.val_loader is not None and val_lib.should_validate_at_step(args, step):
            self.run_validation(state)
        if args.sample_every_n_steps and step % args.sample_every_n_steps == 0 and not args.sample_every_n_epochs:
            self.sample(state, label_step=step)
        if args.save_every_n_steps and step % args.save_every_n_steps == 0 and step < state.max_steps:
            stem = ckpt.step_stem(args.output_name, step)
            self.save_lora(state, stem)
            if args.save_state:
                self.save_state(state, stem, batches_done)
            ckpt.rotate_step_outputs(args.output_dir, args.output_name, args.save_model_as, step,
                                     args.save_last_n_steps, args.save_last_n_steps_state)

    def after_epoch(self, state: RunState, epoch: int) -> None:
        args = state.args
        if state.val_loader is not None and val_lib.should_validate_at_epoch(args, epoch):
            self.run_validation(state)
        if args.sample_every_n_epochs and epoch % args.sample_every_n_epochs == 0:
            self.sample(state, label_epoch=epoch)
        if args.save_every_n_epochs and epoch % args.save_every_n_epochs == 0 and epoch < state.num_epochs:
            stem = ckpt.epoch_stem(args.output_name, epoch)
            self.save_lora(state, stem)
            if args.save_state:
                self.save_state(state, stem, len(state.loader))
            ckpt.rotate_epoch_outputs(args.output_dir, args.output_name, args.save_model_as, epoch,
                                      args.save_every_n_epochs, args.save_last_n_epochs,
                                      args.save_last_n_epochs_state)

    def finish(self, state: RunState) -> Path:
        args = state.args
        stem = ckpt.final_stem(args.output_name)
        path = self.save_lora(state, stem, final=True)
        if args.save_state_on_train_end:
            self.save_state(state, stem, len(state.loader))
        if state.accelerator.log_with:
            state.accelerator.end_training()
        if state.accelerator.is_main_process:
            print(f"saved the LoRA: {path}")
        return path

    # ---- saving / resuming --------------------------------------------------------------------
    def save_lora(self, state: RunState, stem: str, final: bool = False) -> Path:
        args = state.args
        path = ckpt.lora_path(args.output_dir, stem, args.save_model_as)
        if not state.accelerator.is_main_process:
            return path
        dtype = {None: None, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.save_precision]
        meta = None
        if args.save_model_as == "safetensors":
            meta = meta_lib.with_save_time(state.metadata, steps=state.global_step, epoch=state.epoch + 1)
            # intermediate saves take the model hash if it is ready; the final one waits for it
            if final or self._model_hash.done():
                meta.update(self._model_hash.result())
            if args.no_metadata:
                meta = {**meta_lib.minimal_metadata(meta),
                        **{k: v for k, v in meta.items() if k.startswith("modelspec.")}}
        with self.eval_mode(state):
            state.network.save_weights(str(path), dtype, meta)
        return path

    def save_state(self, state: RunState, stem: str, batches_done: int) -> None:
        directory = ckpt.state_dir(state.args.output_dir, stem)
        state.accelerator.save_state(str(directory))
        if state.accelerator.is_main_process:
            epoch, done = state.epoch, batches_done
            if done >= len(state.loader):
                epoch, done = epoch + 1, 0
            ckpt.TrainPosition(current_epoch=epoch, current_step=state.global_step,
                               batches_done_in_epoch=done, seed=state.args.seed).save(directory)

    def resume(self, state: RunState) -> tuple[int, int]:
        directory = Path(state.args.resume)
        position = ckpt.TrainPosition.load(directory)
        if position.seed != state.args.seed:
            print(f"note: the state was saved with --seed {position.seed}; using it so the data order matches")
            state.args.seed = position.seed
        state.accelerator.load_state(str(directory))
        state.global_step = position.current_step
        print(f"resumed from {directory}: step {position.current_step}, epoch {position.current_epoch + 1}, "
              f"skipping {position.batches_done_in_epoch} batches")
        return position.current_epoch, position.batches_done_in_epoch

    def initial_position(self, state: RunState) -> tuple[int, int]:
        args = state.args
        if args.initial_step is not None:
            step = args.initial_step
            epoch, within = divmod(step, state.steps_per_epoch)
        else:
            epoch, within, step = args.initial_epoch - 1, 0, (args.initial_epoch - 1) * state.steps_per_epoch
        state.global_step = step
        for _ in range(step):
            state.lr_scheduler.step()
        skip = within * args.gradient_accumulation_steps if args.skip_until_initial_step else 0
        return epoch, skip

    # ---- sampling -----------------------------------------------------------------------------
    def sample(self, state: RunState, label_step: int | None = None, label_epoch: int | None = None) -> None:
        if not state.sample_prompts or not state.accelerator.is_main_process:
            return
        args = state.args
        sample_dir = Path(args.output_dir) / "sample"
        sample_dir.mkdir(parents=True, exist_ok=True)
        tag = f"e{label_epoch:06d}" if label_epoch is not None else f"{label_step:06d}"
        row = SampleRow(label=f"epoch {label_epoch}" if label_epoch is not None else f"step {label_step}")
        with preserved_rng(state.device), self.eval_mode(state):
            if state.trained_text_encoders:
                self.refresh_sample_conds(state)
            for prompt in state.sample_prompts:
                with torch.no_grad(), state.accelerator.autocast():
                    image = self.generate_sample(args, state.models, prompt, state.sample_conds,
                                                 state.device, state.weight_dtype)
                stamp = time.strftime("%Y%m%d%H%M%S")
                seed = f"_{prompt.seed}" if prompt.seed is not None else ""
                name = f"{args.output_name + '_' if args.output_name else ''}{tag}_{prompt.index:02d}_{stamp}{seed}.png"
                image.save(sample_dir / name)
                row.images[prompt.index] = name
        state.sample_rows.append(row)
        write_gallery(sample_dir, args.output_name or "samples", [p.prompt for p in state.sample_prompts],
                      state.sample_rows, state.metrics_file)

    def refresh_sample_conds(self, state: RunState) -> None:
        """With text-encoder LoRA the prompts' encodings change as it trains: re-encode the trained
        encoders' parts (the frozen parts come from the encodings made at start)."""
        texts = list(state.sample_conds)
        before = stack_text_outputs([state.sample_conds[t] for t in texts], state.device)
        with torch.no_grad(), state.accelerator.autocast():
            now = self.encode_text_for_training(state.args, state.models, texts, before,
                                                state.trained_text_encoders, state.device)
        state.sample_conds = {t: {k: v[i] for k, v in now.items()} for i, t in enumerate(texts)}

    @contextmanager
    def eval_mode(self, state: RunState):
        """Dropout off, and schedule-free optimizers switched to their evaluation weights."""
        state.network.eval()
        if state.optimizer_info.needs_train_eval_mode:
            state.optimizer_info.optimizer.eval()
        try:
            yield
        finally:
            state.network.train()
            if state.optimizer_info.needs_train_eval_mode:
                state.optimizer_info.optimizer.train()

    def run(self, argv: list[str] | None = None) -> int:
        """Entry point for scripts: parse, train, report user errors without a traceback."""
        try:
            args = self.parse_args(argv)
            self.train(args)
        except UserError as e:
            print(f"error: {e}")
            return 2
        return 0


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def parse_network_args(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--network_args '{item}': write key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def stack_text_outputs(per_caption: list[dict[str, torch.Tensor]], device) -> dict[str, torch.Tensor]:
    return {k: torch.stack([d[k] for d in per_caption]).to(device) for k in per_caption[0]}


def compile_blocks(block_lists: list[torch.nn.ModuleList], backend: str) -> None:
    """Compile block by block: identical blocks share one compiled graph, so compiling is quick,
    and checkpointing/offloading still see plain per-block modules."""
    if not block_lists:
        raise ConfigError("--torch_compile is not supported for this model yet; remove it")
    for blocks in block_lists:
        for i, block in enumerate(blocks):
            blocks[i] = torch.compile(block, backend=backend)
            blocks[i].compile_backend = backend   # for library/block_checkpointing.py's compiled checkpoint


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def preserved_rng(device: torch.device):
    """Sampling must not change the training RNG stream (resume equality depends on it)."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
