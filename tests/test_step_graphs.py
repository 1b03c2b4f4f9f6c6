"""--cuda_graph (library/training/step_graphs.py): which steps run eagerly, checked, recorded or
replayed; what turns recording off; which options are refused. The bookkeeping runs on the CPU
with a stand-in recorder; the real CUDA recording is compared with eager training on a GPU."""

from __future__ import annotations

import argparse
from contextlib import contextmanager

import pytest
import torch

from library.errors import ConfigError
from library.training.step_graphs import (StepGraphs, cuda_graph_problems, learning_rates_on_device,
                                          learning_rates_on_host)
from tests.test_flux_train_e2e import losses, setup, train  # noqa: F401  (module fixture reused)


class FakeRecorder:
    """Records by running the step once into its outputs; a replay runs it again and copies the
    result into those same outputs, as a CUDA graph refills them. `sync_error` makes the checked
    step fail as CUDA's synchronisation check would; `record_error` makes recording fail."""

    def __init__(self, sync_error: bool = False, record_error: bool = False):
        self.sync_error, self.record_error = sync_error, record_error
        self.released = False
        self.checking = False
        self.records = self.syncs = 0

    @contextmanager
    def sync_check(self):
        self.checking = True
        try:
            yield
        finally:
            self.checking = False

    def record(self, fn):
        if self.record_error:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.records += 1
        out = fn()

        def replay():
            out.copy_(fn())
        return replay, out

    def synchronize(self):
        self.syncs += 1

    def release(self):
        self.released = True


def make(recorder, log, **kw):
    def step(inputs, key):
        if recorder.checking and recorder.sync_error:
            raise RuntimeError("called a synchronizing CUDA operation")
        log.append(key)
        return inputs["latents"].sum() * key[0] + inputs["text"]["t5"].sum()
    notes, resets = [], []
    graphs = StepGraphs(step, "cpu", recorder=recorder, note=notes.append, reset=lambda: resets.append(1), **kw)
    return graphs, notes, resets


def batch(h, value):
    return {"latents": torch.full((1, 4, h, h), float(value)), "text": {"t5": torch.full((1, 3), float(value))}}


def expected(h, value, multiplier=1.0):
    return value * 4 * h * h * multiplier + value * 3


def test_each_shape_runs_eagerly_twice_then_is_recorded_and_replayed_with_new_inputs():
    recorder, log = FakeRecorder(), []
    graphs, notes, _ = make(recorder, log)
    for i in range(5):
        assert float(graphs(batch(2, i + 1), key=(1.0,))) == expected(2, i + 1)
    assert recorder.records == 1 and graphs.replays == 3 and graphs.recorded_shapes == 1
    assert any("step recorded for input shape 1" in n for n in notes)
    # a second shape and a second multiplier are recorded separately; the first stays replayable
    for value in (1, 2, 3):
        assert float(graphs(batch(4, value), key=(1.0,))) == expected(4, value)
        assert float(graphs(batch(2, value), key=(0.5,))) == expected(2, value, 0.5)
    assert float(graphs(batch(2, 7), key=(1.0,))) == expected(2, 7)
    assert graphs.recorded_shapes == 3 and graphs.disabled_because is None


def test_the_returned_loss_is_not_overwritten_by_the_next_replay():
    graphs, _, _ = make(FakeRecorder(), [])
    results = [graphs(batch(2, i), key=(1.0,)) for i in range(1, 6)]
    assert [float(r) for r in results] == [expected(2, i) for i in range(1, 6)]


def test_a_step_that_synchronises_turns_recording_off_and_reruns_eagerly():
    recorder, log = FakeRecorder(sync_error=True), []
    graphs, notes, resets = make(recorder, log)
    values = [float(graphs(batch(2, i), key=(1.0,))) for i in range(1, 5)]
    assert values == [expected(2, i) for i in range(1, 5)]
    assert recorder.records == 0 and resets == [1]
    assert "reads a GPU value to Python" in graphs.disabled_because
    assert any("--cuda_graph is off for the rest of the run" in n for n in notes)


def test_a_failed_recording_turns_recording_off_and_the_step_still_runs():
    recorder = FakeRecorder(record_error=True)
    graphs, notes, resets = make(recorder, [])
    values = [float(graphs(batch(2, i), key=(1.0,))) for i in range(1, 5)]
    assert values == [expected(2, i) for i in range(1, 5)]
    assert "recording the step failed (RuntimeError: operation not permitted" in graphs.disabled_because
    assert resets == [1] and recorder.syncs == 1 and recorder.released


def test_turning_off_after_recordings_drops_them():
    recorder = FakeRecorder()
    graphs, notes, resets = make(recorder, [])
    for i in range(4):
        graphs(batch(2, i), key=(1.0,))
    assert graphs.recorded_shapes == 1
    graphs.turn_off("a test")
    assert graphs.recorded_shapes == 0 and recorder.released and resets == [1]
    assert float(graphs(batch(2, 9), key=(1.0,))) == expected(2, 9) and graphs.replays == 2


def test_shapes_beyond_the_limit_run_eagerly():
    recorder = FakeRecorder()
    graphs, _, _ = make(recorder, [], max_graphs=1)
    for h in (2, 4):
        for i in range(4):
            assert float(graphs(batch(h, i), key=(1.0,))) == expected(h, i)
    assert graphs.recorded_shapes == 1 and graphs.replays == 2 and graphs.disabled_because is None


def test_learning_rates_become_device_tensors_that_the_scheduler_fills():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1e-3)
    learning_rates_on_device(opt, torch.device("cpu"))
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    assert sched.base_lrs == [1e-3] and isinstance(sched.base_lrs[0], float)   # saved states stay plain
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(5e-4)
    # a state saved with --cuda_graph, loaded by a run without it (and the other way round)
    saved = opt.state_dict()
    plain = torch.optim.AdamW([p], lr=1e-3)
    plain.load_state_dict(saved)
    learning_rates_on_host(plain)
    assert plain.param_groups[0]["lr"] == pytest.approx(5e-4) and isinstance(plain.param_groups[0]["lr"], float)
    learning_rates_on_device(plain, torch.device("cpu"))
    assert float(plain.param_groups[0]["lr"]) == pytest.approx(5e-4)


def _args(**kw):
    base = dict(cuda_graph=True, gradient_accumulation_steps=1, mixed_precision="bf16", full_fp16=False,
                blocks_to_swap=None, cpu_offload_checkpointing=False, multires_noise_iterations=None,
                noise_offset_random_strength=False, ip_noise_gamma_random_strength=False, scale_weight_norms=None,
                cache_latents=True, cache_latents_to_disk=False, cache_text_encoder_outputs=True,
                cache_text_encoder_outputs_to_disk=False, optimizer_type=None, use_8bit_adam=False,
                use_lion_optimizer=False, network_args=None, lr_scheduler_type=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_the_tip_appears_only_where_the_option_would_work():
    from library.training.step_graphs import cuda_graph_tip
    args = _args(cuda_graph=False)
    assert "--cuda_graph" in cuda_graph_tip(args, [], "cuda", 1)
    assert cuda_graph_tip(args, [], "cpu", 1) is None
    assert cuda_graph_tip(args, [], "cuda:0", 2) is None
    assert cuda_graph_tip(args, ["Lumina's forward ..."], "cuda", 1) is None
    assert cuda_graph_tip(_args(cuda_graph=False, cache_latents=False), [], "cuda", 1) is None
    assert cuda_graph_tip(_args(), [], "cuda", 1) is None   # already on


@pytest.mark.parametrize("change, fragment", [
    (dict(mixed_precision="fp16"), "fp16"),
    (dict(blocks_to_swap=4), "--blocks_to_swap"),
    (dict(cache_latents=False), "add --cache_latents"),
    (dict(cache_text_encoder_outputs=False), "add --cache_text_encoder_outputs"),
    (dict(optimizer_type="AdamW8bit"), "only PyTorch's AdamW and Adam"),
    (dict(noise_offset_random_strength=True), "--noise_offset_random_strength"),
    (dict(network_args=["module_dropout=0.1"]), "module_dropout"),
    (dict(lr_scheduler_type="mymodule.MySchedule"), "--lr_scheduler_type"),
])
def test_options_a_recording_cannot_hold_are_named(change, fragment):
    assert cuda_graph_problems(_args()) == []
    assert cuda_graph_problems(_args(cuda_graph=False, **change)) == []
    problems = cuda_graph_problems(_args(**change))
    assert len(problems) == 1 and fragment in problems[0]


@pytest.mark.parametrize("script, extra, fragment", [
    ("flux", ("--mixed_precision", "fp16"), "fp16 (its loss scaler"),
    ("lumina", ("--use_flash_attn",), "--use_flash_attn (its varlen kernel"),
    ("sd3", ("--t5_dropout_rate", "0.1"), "--t5_dropout_rate (drawn on the CPU"),
    ("sd", ("--loss_type", "huber"), "--loss_type huber (its per-timestep c is computed on the CPU)"),
])
def test_family_trainers_refuse_what_they_cannot_record(script, extra, fragment):
    import importlib
    module = importlib.import_module({"flux": "flux_train_network", "lumina": "lumina_train_network",
                                      "sd3": "sd3_train_network", "sd": "train_network"}[script])
    trainer = next(v for k, v in vars(module).items() if k.endswith("NetworkTrainer") and v.__module__ == module.__name__)()
    args = trainer.build_parser().parse_args([
        "--pretrained_model_name_or_path", "x", "--output_dir", "o", "--network_module", "networks.lora",
        "--cache_latents", "--cache_text_encoder_outputs", "--cuda_graph", *extra])
    trainer.validate_family_args = lambda _args: None   # the model files checked elsewhere
    with pytest.raises(ConfigError, match="--cuda_graph records the training step") as e:
        trainer.check_args(args)
    assert fragment in str(e.value)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_without_a_gpu_cuda_graph_is_refused_before_loading(setup, tmp_path):  # noqa: F811
    r = train(setup, tmp_path / "o", "--max_train_steps", "2", "--cuda_graph")
    assert r.returncode != 0
    assert "--cuda_graph records the training step as a CUDA graph: it needs one CUDA GPU" in r.stdout + r.stderr
    assert "loaded" not in r.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("accumulation", ["1", "2"])
def test_recorded_training_matches_eager_training_on_cuda(setup, tmp_path, accumulation):  # noqa: F811
    # Bucketed tiny dataset: several shapes, each eager twice, then recorded and replayed. GPU
    # random numbers come in the same order from a replay as from the eager step. With
    # accumulation the micro-steps without an update are recorded separately.
    common = ("--max_train_steps", "18" if accumulation == "1" else "12", "--mixed_precision", "bf16",
              "--gradient_checkpointing", "--gradient_accumulation_steps", accumulation)
    eager, graphed = tmp_path / "eager", tmp_path / "graphed"
    r = train(setup, eager, *common)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = train(setup, graphed, *common, "--cuda_graph")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    off = [line for line in r.stdout.splitlines() if "--cuda_graph is off" in line]
    assert not off, off
    assert "--cuda_graph: step recorded for input shape 1" in r.stdout
    a, b = losses(eager), losses(graphed)
    assert sorted(a) == sorted(b)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=2e-2, abs=1e-3), (step, a[step], b[step])
