"""flux_train_network's load_models: a GPU that runs out of memory while the models are read
straight into it (another process took memory after the check) falls back to the CPU route
with a note; with --lowram, or already on the CPU, the error stands. The loaders are faked
(this machine has no GPU): what is checked is the order of attempts and what is freed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import flux_train_network as ftn
from library.training import model_loading


class FakeText:
    clip_l = t5 = None


@pytest.fixture()
def fake_loaders(monkeypatch):
    calls = []

    def load(kind):
        def run(*_, device, **__):
            calls.append((kind, str(device)))
            if str(device) != "cpu" and kind == "t5":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (faked)")
            return (object(), SimpleNamespace(variant="dev")) if kind == "dit" else object()
        return run

    monkeypatch.setattr(ftn, "check_flux_checkpoint", lambda *_: SimpleNamespace(variant="dev"))
    monkeypatch.setattr(model_loading, "prefetch", lambda path, where: calls.append(("prefetch", str(where))))
    monkeypatch.setattr(ftn, "load_flux_dit", load("dit"))
    monkeypatch.setattr(ftn, "load_flux_ae", load("ae"))
    monkeypatch.setattr(ftn.FluxTextEncoding, "from_files", lambda **kw: (load("t5")(**kw), FakeText())[1])
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)   # the DiT's loading thread
    return calls


def _args(lowram=False):
    return SimpleNamespace(pretrained_model_name_or_path="dit.safetensors", ae="ae.safetensors", t5xxl="t5.safetensors",
                           clip_l="clip_l.safetensors", model_type="flux", t5xxl_max_token_length=None,
                           apply_t5_attn_mask=False, tokenizer_cache_dir=None, fp8_base=False, fp8_base_unet=False,
                           lowram=lowram)


def test_out_of_memory_on_the_gpu_route_retries_on_the_cpu(fake_loaders, monkeypatch, capsys):
    monkeypatch.setattr(ftn.memory, "load_device", lambda args, device, files: torch.device("cuda", 0))
    args = _args()
    models = ftn.FluxNetworkTrainer().load_models(args, torch.device("cuda", 0), torch.bfloat16)
    assert models.info.variant == "dev" and args.t5xxl_max_token_length == 512
    assert "loading them into CPU memory instead" in capsys.readouterr().out
    loads = sorted((kind, w) for kind, w in fake_loaders if kind in ("dit", "ae", "t5"))
    assert loads == sorted((kind, w) for kind in ("dit", "ae", "t5") for w in ("cuda:0", "cpu"))   # GPU, then CPU


def test_out_of_memory_with_lowram_is_not_retried(fake_loaders, monkeypatch):
    monkeypatch.setattr(ftn.memory, "load_device", lambda args, device, files: torch.device("cuda", 0))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        ftn.FluxNetworkTrainer().load_models(_args(lowram=True), torch.device("cuda", 0), torch.bfloat16)
    assert not any(w == "cpu" for kind, w in fake_loaders if kind in ("dit", "ae", "t5"))
