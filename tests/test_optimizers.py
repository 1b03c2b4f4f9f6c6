import argparse
import logging
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from library.errors import ConfigError
from library.training import optimizers as opt


def _params():
    return [torch.nn.Parameter(torch.randn(256))]


def _step(optimizer, params):
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    optimizer.step()
    return any(not torch.equal(b, p) for b, p in zip(before, params))


def _fake_module(monkeypatch, module_name, *class_names, with_train_eval=False):
    """Install a fake optional package whose classes record their constructor arguments."""
    module = types.ModuleType(module_name)
    for class_name in class_names:

        def init(self, params, lr=1.0, **kwargs):
            torch.optim.Optimizer.__init__(self, params, dict(lr=lr, **kwargs))
            self.mode = None

        body = {"__init__": init, "__module__": module_name}
        if with_train_eval:
            body["train"] = lambda self: setattr(self, "mode", "train")
            body["eval"] = lambda self: setattr(self, "mode", "eval")
        setattr(module, class_name, type(class_name, (torch.optim.Optimizer,), body))
    monkeypatch.setitem(sys.modules, module_name, module)
    parent, _, child = module_name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return module


def test_arguments():
    parser = argparse.ArgumentParser()
    opt.add_optimizer_arguments(parser)
    args = parser.parse_args(["--optimizer_args", "weight_decay=0.01", "betas=(0.9,0.99)"])
    assert args.optimizer_type is None and args.max_grad_norm == 1.0
    assert opt.optimizer_type_from_args(args) == "AdamW"
    assert opt.parse_key_value_args(args.optimizer_args, "--optimizer_args") == {"weight_decay": 0.01, "betas": (0.9, 0.99)}


def test_adamw_name_description_and_case_insensitivity():
    params = _params()
    built = opt.build_optimizer("adamw", ["weight_decay=0.01", "betas=(0.9,0.99)"], params, 1e-4)
    assert isinstance(built.optimizer, torch.optim.AdamW)
    assert built.name == "torch.optim.adamw.AdamW"
    assert built.description == "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.99))"
    assert built.optimizer.defaults["lr"] == 1e-4 and built.optimizer.defaults["betas"] == (0.9, 0.99)
    assert not built.needs_train_eval_mode and not built.adapts_lr and not built.computes_own_lr
    assert opt.build_optimizer("AdamW", None, _params(), 1e-4).description == "torch.optim.adamw.AdamW"


def test_param_groups_keep_their_learning_rates():
    groups = [{"params": _params(), "lr": 1e-4}, {"params": _params(), "lr": 5e-5}]
    built = opt.build_optimizer("AdamW", [], groups, 1e-3)
    assert [g["lr"] for g in built.optimizer.param_groups] == [1e-4, 5e-5]


def test_sgd_nesterov_defaults_momentum():
    params = _params()
    built = opt.build_optimizer("SGDNesterov", None, params, 0.1)
    assert built.optimizer.defaults["nesterov"] is True and built.optimizer.defaults["momentum"] == 0.9
    assert built.description == "torch.optim.sgd.SGD(momentum=0.9)"
    assert _step(built.optimizer, params)


def test_adafactor_relative_step_ignores_lr(caplog):
    groups = [{"params": _params(), "lr": 1e-4}]
    with caplog.at_level(logging.WARNING):
        built = opt.build_optimizer("Adafactor", None, groups, 1e-4)
    assert "relative_step=True" in caplog.text
    assert built.computes_own_lr and opt.computes_own_lr(built.optimizer)
    assert built.optimizer.defaults["lr"] is None and built.optimizer.param_groups[0]["lr"] is None
    assert built.description == "transformers.optimization.Adafactor(relative_step=True)"


def test_adafactor_without_relative_step_uses_lr():
    params = _params()
    args = ["relative_step=False", "scale_parameter=False", "warmup_init=False"]
    built = opt.build_optimizer("adafactor", args, params, 1e-4)
    assert not built.computes_own_lr and built.optimizer.defaults["lr"] == 1e-4
    assert _step(built.optimizer, params)
    forced = opt.build_optimizer("Adafactor", ["relative_step=False", "warmup_init=True"], _params(), 1e-4)
    assert forced.computes_own_lr  # warmup_init needs relative_step, as in sd-scripts


@pytest.mark.parametrize(
    "name, cls_name",
    [
        ("AdamW8bit", "AdamW8bit"),
        ("PagedAdamW8bit", "PagedAdamW8bit"),
        ("PagedAdamW", "PagedAdamW"),
        ("PagedAdamW32bit", "PagedAdamW32bit"),
        ("Lion8bit", "Lion8bit"),
        ("PagedLion8bit", "PagedLion8bit"),
        ("SGDNesterov8bit", "SGD8bit"),
        ("bitsandbytes.optim.AdEMAMix8bit", "AdEMAMix8bit"),
    ],
)
def test_bitsandbytes_optimizers_on_cpu(name, cls_name):
    pytest.importorskip("bitsandbytes")
    params = _params()
    built = opt.build_optimizer(name, None, params, 1e-3)
    assert type(built.optimizer).__name__ == cls_name
    assert built.name.startswith("bitsandbytes.optim.") and built.name.endswith("." + cls_name)
    assert _step(built.optimizer, params)


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        opt.build_optimizer("AdamW8bit", None, _params(), 1e-3)


def test_lion_prefers_lion_pytorch_then_falls_back_to_bitsandbytes(monkeypatch):
    _fake_module(monkeypatch, "lion_pytorch", "Lion")
    assert opt.build_optimizer("Lion", None, _params(), 1e-4).name == "lion_pytorch.Lion"
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)
    pytest.importorskip("bitsandbytes")
    built = opt.build_optimizer("lion", ["weight_decay=0.01"], _params(), 1e-4)
    assert built.name.startswith("bitsandbytes.optim.") and built.name.endswith(".Lion")


def test_prodigy_missing_and_present(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    with pytest.raises(ConfigError, match="pip install prodigyopt"):
        opt.build_optimizer("Prodigy", None, _params(), 1.0)
    _fake_module(monkeypatch, "prodigyopt", "Prodigy")
    with caplog.at_level(logging.WARNING):
        built = opt.build_optimizer("prodigy", ["d_coef=2"], _params(), 1e-4)
    assert "around 1.0" in caplog.text
    assert built.adapts_lr and built.description == "prodigyopt.Prodigy(d_coef=2)"
    assert built.optimizer.defaults["d_coef"] == 2


@pytest.mark.parametrize(
    "name, module, cls_name",
    [
        ("DAdaptation", "dadaptation.experimental", "DAdaptAdamPreprint"),
        ("DAdaptAdanIP", "dadaptation.experimental", "DAdaptAdanIP"),
        ("DAdaptAdam", "dadaptation", "DAdaptAdam"),
        ("dadaptlion", "dadaptation", "DAdaptLion"),
    ],
)
def test_dadaptation_family(monkeypatch, name, module, cls_name):
    _fake_module(monkeypatch, "dadaptation", "DAdaptAdam", "DAdaptAdaGrad", "DAdaptAdan", "DAdaptLion", "DAdaptSGD")
    _fake_module(monkeypatch, "dadaptation.experimental", "DAdaptAdamPreprint", "DAdaptAdanIP")
    built = opt.build_optimizer(name, None, _params(), 1.0)
    assert built.name == f"{module}.{cls_name}" and built.adapts_lr


def test_dadaptation_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "dadaptation", None)
    with pytest.raises(ConfigError, match="pip install dadaptation"):
        opt.build_optimizer("DAdaptAdam", None, _params(), 1.0)


def test_schedule_free_needs_train_eval_mode(monkeypatch):
    monkeypatch.setitem(sys.modules, "schedulefree", None)
    with pytest.raises(ConfigError, match="pip install schedulefree"):
        opt.build_optimizer("AdamWScheduleFree", None, _params(), 1e-3)
    _fake_module(monkeypatch, "schedulefree", "AdamWScheduleFree", "RAdamScheduleFree", "SGDScheduleFree", with_train_eval=True)
    built = opt.build_optimizer("adamwschedulefree", ["warmup_steps=100"], _params(), 1e-3)
    assert built.needs_train_eval_mode and opt.is_schedule_free(built.optimizer)
    assert built.optimizer.mode == "train"  # ready for the first step


def test_full_paths_and_torch_optim_names():
    assert opt.build_optimizer("torch.optim.RAdam", None, _params(), 1e-3).name == "torch.optim.radam.RAdam"
    assert opt.build_optimizer("radam", None, _params(), 1e-3).name == "torch.optim.radam.RAdam"
    with pytest.raises(ConfigError, match="has no 'NoSuchOptimizer'"):
        opt.build_optimizer("torch.optim.NoSuchOptimizer", None, _params(), 1e-3)
    with pytest.raises(ConfigError, match="pip install no_such_package"):
        opt.build_optimizer("no_such_package.sub.Opt", None, _params(), 1e-3)


def test_unknown_name_suggests_the_nearest():
    with pytest.raises(ConfigError, match="Did you mean 'AdamW8bit'"):
        opt.build_optimizer("AdamW9bit", None, _params(), 1e-3)


@pytest.mark.parametrize(
    "bad, fragment",
    [(["weight_decay"], "not key=value"), (["betas=fast"], "not a Python literal"), (["no_such_arg=1"], "rejected")],
)
def test_bad_optimizer_args(bad, fragment):
    with pytest.raises(ConfigError, match=fragment):
        opt.build_optimizer("AdamW", bad, _params(), 1e-3)


def test_no_parameters():
    with pytest.raises(ConfigError, match="no trainable parameters"):
        opt.build_optimizer("AdamW", None, [], 1e-3)


def test_deprecated_aliases():
    ns = SimpleNamespace
    assert opt.optimizer_type_from_args(ns(optimizer_type=None, use_8bit_adam=True, use_lion_optimizer=False)) == "AdamW8bit"
    assert opt.optimizer_type_from_args(ns(optimizer_type="", use_8bit_adam=False, use_lion_optimizer=True)) == "Lion"
    with pytest.raises(ConfigError, match="contradict"):
        opt.optimizer_type_from_args(ns(optimizer_type=None, use_8bit_adam=True, use_lion_optimizer=True))
    with pytest.raises(ConfigError, match="keep only --optimizer_type"):
        opt.optimizer_type_from_args(ns(optimizer_type="AdamW", use_8bit_adam=True, use_lion_optimizer=False))
    built = opt.build_optimizer_from_args(ns(optimizer_type="SGDNesterov", optimizer_args=["momentum=0.8"]), _params(), 0.1)
    assert built.optimizer.defaults["momentum"] == 0.8
    assert opt.build_optimizer(None, None, _params(), 1e-3).name == "torch.optim.adamw.AdamW"
    pytest.importorskip("bitsandbytes")
    assert opt.build_optimizer(None, None, _params(), 1e-3, use_8bit_adam=True).name.endswith("AdamW8bit")
    with pytest.raises(ConfigError, match="keep only --optimizer_type"):
        opt.build_optimizer("AdamW", None, _params(), 1e-3, use_lion_optimizer=True)


def test_adamw_is_fused_on_cuda_parameters_unless_told_otherwise(monkeypatch):
    from library.training import optimizers

    params = [torch.nn.Parameter(torch.zeros(4))]
    plain = optimizers.build_optimizer("AdamW", [], params, 1e-4)
    assert not plain.optimizer.defaults.get("fused")              # CPU tensors: the default AdamW
    monkeypatch.setattr(optimizers, "_all_on_cuda", lambda p: True)
    fused = optimizers.build_optimizer("AdamW", [], params, 1e-4)
    assert fused.optimizer.defaults["fused"] is True
    assert "fused" not in fused.description                       # sd-scripts' optimizer string
    chosen = optimizers.build_optimizer("AdamW", ["foreach=True"], params, 1e-4)
    assert not chosen.optimizer.defaults.get("fused") and chosen.optimizer.defaults["foreach"] is True
