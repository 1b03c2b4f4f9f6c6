import argparse
import sys
import types

import pytest
import torch

from library.errors import ConfigError
from library.training import lr_schedulers as lrs
from library.training.optimizers import build_optimizer

TOTAL = 100


def _optimizer(lr=1e-3, groups=1):
    return torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr * (i + 1)} for i in range(groups)], lr=lr)


def _curve(scheduler, steps=TOTAL + 5, per_step=1):
    """The learning rates seen at each optimizer step, all groups, flattened."""
    lrs_seen = []
    for _ in range(steps):
        lrs_seen.extend(scheduler.get_last_lr())
        for _ in range(per_step):
            scheduler.optimizer.step()
            scheduler.step()
    return lrs_seen


def _config(**kwargs):
    return lrs.LRSchedulerConfig(**kwargs)


@pytest.mark.parametrize(
    "name, warmup, extra",
    [
        ("constant", 0, {}),
        ("constant_with_warmup", 10, {}),
        ("linear", 10, {}),
        ("cosine", 10, {}),
        ("cosine_with_restarts", 10, {"num_cycles": 3}),
        ("polynomial", 10, {"power": 2.0}),
        ("polynomial", 0, {"power": 1.0}),
    ],
)
def test_matches_diffusers_get_scheduler(name, warmup, extra):
    from diffusers.optimization import get_scheduler

    mine = lrs.build_lr_scheduler(
        _config(lr_scheduler=name, lr_warmup_steps=warmup, lr_scheduler_num_cycles=extra.get("num_cycles", 1),
                lr_scheduler_power=extra.get("power", 1.0)),
        _optimizer(groups=2), TOTAL,
    )  # fmt: skip
    reference = get_scheduler(name, _optimizer(groups=2), num_warmup_steps=warmup, num_training_steps=TOTAL, **extra)
    assert _curve(mine) == pytest.approx(_curve(reference), rel=1e-9, abs=1e-15)


def test_matches_transformers_for_the_newer_schedules():
    from transformers import optimization as tr

    cases = [
        (_config(lr_scheduler="inverse_sqrt", lr_warmup_steps=10),
         lambda o: tr.get_inverse_sqrt_schedule(o, num_warmup_steps=10)),
        (_config(lr_scheduler="inverse_sqrt", lr_warmup_steps=10, lr_scheduler_timescale=40),
         lambda o: tr.get_inverse_sqrt_schedule(o, num_warmup_steps=10, timescale=40)),
        (_config(lr_scheduler="cosine_with_min_lr", lr_warmup_steps=10, lr_scheduler_min_lr_ratio=0.1, lr_scheduler_num_cycles=1),
         lambda o: tr.get_cosine_with_min_lr_schedule_with_warmup(o, 10, TOTAL, num_cycles=0.5, min_lr_rate=0.1)),
        (_config(lr_scheduler="warmup_stable_decay", lr_warmup_steps=10, lr_decay_steps=0.2, lr_scheduler_min_lr_ratio=0.05),
         lambda o: tr.get_wsd_schedule(o, 10, 20, num_stable_steps=70, min_lr_ratio=0.05, num_cycles=0.5)),
        (_config(lr_scheduler="warmup_stable_decay", lr_warmup_steps=10, lr_decay_steps=30,
                 lr_scheduler_args=("warmup_type='cosine'", "decay_type='1-sqrt'")),
         lambda o: tr.get_wsd_schedule(o, 10, 30, num_stable_steps=60, warmup_type="cosine", decay_type="1-sqrt")),
    ]  # fmt: skip
    for cfg, make_reference in cases:
        mine = _curve(lrs.build_lr_scheduler(cfg, _optimizer(), TOTAL))
        reference = _curve(make_reference(_optimizer()))
        assert mine == pytest.approx(reference, rel=1e-9), cfg


def test_warmup_ratio_and_percent():
    parser = argparse.ArgumentParser()
    lrs.add_lr_scheduler_arguments(parser)
    assert parser.parse_args(["--lr_warmup_steps", "10%"]).lr_warmup_steps == pytest.approx(0.1)
    assert parser.parse_args(["--lr_warmup_steps", "0.1"]).lr_warmup_steps == pytest.approx(0.1)
    assert parser.parse_args(["--lr_warmup_steps", "25"]).lr_warmup_steps == 25
    with pytest.raises(SystemExit):
        parser.parse_args(["--lr_warmup_steps", "1.5"])
    args = parser.parse_args(["--lr_scheduler", "linear", "--lr_warmup_steps", "10%"])
    ratio = _curve(lrs.build_lr_scheduler(args, _optimizer(), TOTAL))
    steps = _curve(lrs.build_lr_scheduler(_config(lr_scheduler="linear", lr_warmup_steps=10), _optimizer(), TOTAL))
    assert ratio == steps
    assert ratio[5] == pytest.approx(0.5e-3) and ratio[10] == pytest.approx(1e-3)


@pytest.mark.parametrize("value, expected", [(0, 0), (100, 100), (0.25, 0.25), ("5%", 0.05), ("12", 12), (3.0, 3)])
def test_parse_steps_or_ratio(value, expected):
    assert lrs.parse_steps_or_ratio(value) == expected


@pytest.mark.parametrize("value", [-1, 1.5, "abc", "150%", True])
def test_parse_steps_or_ratio_rejects(value):
    with pytest.raises(ConfigError):
        lrs.parse_steps_or_ratio(value)


def test_multiple_processes_keep_the_curve_in_optimizer_steps():
    for warmup in (10, 0.1):
        cfg = _config(lr_scheduler="cosine", lr_warmup_steps=warmup)
        single = _curve(lrs.build_lr_scheduler(cfg, _optimizer(), TOTAL))
        # accelerate's prepared scheduler steps once per process for each optimizer step
        double = _curve(lrs.build_lr_scheduler(cfg, _optimizer(), TOTAL, num_processes=2), per_step=2)
        assert double == pytest.approx(single)


@pytest.mark.parametrize(
    "cfg, fragment",
    [
        (dict(lr_scheduler="constant", lr_warmup_steps=10), "constant_with_warmup"),
        (dict(lr_scheduler="cosine", lr_decay_steps=10), "--lr_decay_steps is only used"),
        (dict(lr_scheduler="linear", lr_scheduler_min_lr_ratio=0.1), "--lr_scheduler_min_lr_ratio is only used"),
        (dict(lr_scheduler="cosine", lr_scheduler_timescale=10), "--lr_scheduler_timescale is only used"),
        (dict(lr_scheduler="cosine_with_min_lr"), "exactly one of"),
        (dict(lr_scheduler="warmup_stable_decay", lr_warmup_steps=60, lr_decay_steps=60), "exceed"),
        (dict(lr_scheduler="linear", lr_warmup_steps=200), "longer than the training run"),
        (dict(lr_scheduler="linear", lr_scheduler_args=("lr_end=0.1",)), "accepts nothing"),
        (dict(lr_scheduler="adafactor"), "only works with --optimizer_type Adafactor"),
        (dict(lr_scheduler="cosine_annealing"), "choose one of"),
    ],
)
def test_refused_options(cfg, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("-", r"\-")):
        lrs.build_lr_scheduler(_config(**cfg), _optimizer(), TOTAL)


def test_adafactor_with_relative_step_gets_its_own_schedule():
    from transformers.optimization import AdafactorSchedule

    built = build_optimizer("Adafactor", None, [torch.nn.Parameter(torch.zeros(4))], 1e-4)
    scheduler = lrs.build_lr_scheduler(_config(learning_rate=1e-4), built.optimizer, TOTAL)
    assert isinstance(scheduler, AdafactorSchedule) and scheduler.get_last_lr() == [1e-4]
    with pytest.raises(ConfigError, match="relative_step"):
        lrs.build_lr_scheduler(_config(lr_scheduler="cosine"), built.optimizer, TOTAL)


def test_schedule_free_refuses_a_schedule(monkeypatch):
    module = types.ModuleType("schedulefree")

    class AdamWScheduleFree(torch.optim.SGD):
        __module__ = "schedulefree"

    module.AdamWScheduleFree = AdamWScheduleFree
    monkeypatch.setitem(sys.modules, "schedulefree", module)
    optimizer = AdamWScheduleFree([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = lrs.build_lr_scheduler(_config(), optimizer, TOTAL)
    assert _curve(scheduler, steps=3) == [0.1] * 3
    with pytest.raises(ConfigError, match="schedule-free"):
        lrs.build_lr_scheduler(_config(lr_scheduler="cosine", lr_warmup_steps=5), optimizer, TOTAL)


def test_custom_scheduler_class():
    cfg = _config(lr_scheduler_type="StepLR", lr_scheduler_args=("step_size=2", "gamma=0.5"))
    scheduler = lrs.build_lr_scheduler(cfg, _optimizer(), TOTAL)
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    assert _curve(scheduler, steps=5) == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4])
    full = _config(lr_scheduler_type="torch.optim.lr_scheduler.ExponentialLR", lr_scheduler_args=("gamma=0.9",))
    assert isinstance(lrs.build_lr_scheduler(full, _optimizer(), TOTAL), torch.optim.lr_scheduler.ExponentialLR)
    with pytest.raises(ConfigError, match="has no warmup"):
        lrs.build_lr_scheduler(_config(lr_scheduler_type="StepLR", lr_warmup_steps=3), _optimizer(), TOTAL)
    with pytest.raises(ConfigError, match="has no 'Nope'"):
        lrs.build_lr_scheduler(_config(lr_scheduler_type="Nope"), _optimizer(), TOTAL)


def test_scheduler_state_round_trips_through_torch_save(tmp_path):
    scheduler = lrs.build_lr_scheduler(_config(lr_scheduler="cosine", lr_warmup_steps=10), _optimizer(), TOTAL)
    _curve(scheduler, steps=30)
    torch.save(scheduler.state_dict(), tmp_path / "scheduler.bin")
    fresh = lrs.build_lr_scheduler(_config(lr_scheduler="cosine", lr_warmup_steps=10), _optimizer(), TOTAL)
    fresh.load_state_dict(torch.load(tmp_path / "scheduler.bin", weights_only=False))
    assert fresh.last_epoch == scheduler.last_epoch
    assert _curve(fresh, steps=5) == _curve(scheduler, steps=5)
