"""Straight-to-GPU model loading for every DiT family (library/training/model_loading.py,
safetensors_io.load_keys / read_to_gpu); FLUX's trainer has its own test
(test_flux_model_loading_fallback.py).

This machine has no GPU. The trainers' load_models run with faked loaders and a faked device:
what is checked is which files decide the device, which are prefetched, the order of attempts
(GPU, then the CPU after running out of memory) and that a wrong DiT file is refused before
anything loads. The DiT loaders' GPU route (every tensor read at once, then popped) runs on the
CPU with read_to_gpu reading there, and must give the same model as the memory-mapped route."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

import anima_train_network as anima_trainer
import lumina_train_network as lumina_trainer
import sd3_train_network as sd3_trainer
from library import safetensors_io as sio
from library.errors import ModelFileError
from library.training import memory, model_loading

CUDA = torch.device("cuda", 0)


# ---------------------------------------------------------------------------------------------
# The trainers' load_models with faked loaders.

class FakeDiT(torch.nn.Module):
    def set_pos_emb_random_crop_rate(self, rate):   # SD3's
        self.rate = rate


def _sd3(monkeypatch, load, files):
    info = SimpleNamespace(variant=SimpleNamespace(label="SD3.5 Medium", name="5-medium"),
                           params=SimpleNamespace(depth=2, context_in_features=64))
    monkeypatch.setattr(sd3_trainer, "inspect_sd3_checkpoint", lambda path: info)
    monkeypatch.setattr(sd3_trainer, "load_sd3_mmdit", lambda *a, **kw: (load("dit")(**kw), (FakeDiT(), info))[1])
    monkeypatch.setattr(sd3_trainer, "load_sd3_vae", lambda *a, **kw: load("vae")(**kw))
    monkeypatch.setattr(sd3_trainer.SD3TextEncoding, "from_files",
                        lambda **kw: (load("text")(**kw), SimpleNamespace(clip_l=None, clip_g=None, t5=None))[1])
    args = SimpleNamespace(pretrained_model_name_or_path=files["dit"], vae=files["vae"], clip_l=files["clip_l"],
                           clip_g=files["clip_g"], t5xxl=files["t5xxl"], t5xxl_max_token_length=256,
                           apply_lg_attn_mask=False, apply_t5_attn_mask=False, tokenizer_cache_dir=None,
                           enable_scaled_pos_embed=False, pos_emb_random_crop_rate=0.0)
    return sd3_trainer.SD3NetworkTrainer(), args, "inspect_sd3_checkpoint", ["vae", "clip_l", "clip_g", "t5xxl"]


def _lumina(monkeypatch, load, files):
    monkeypatch.setattr(lumina_trainer, "inspect_lumina_checkpoint", lambda path: SimpleNamespace())
    monkeypatch.setattr(lumina_trainer, "describe_variant", lambda info: "Lumina Image 2.0 (faked)")
    monkeypatch.setattr(lumina_trainer, "load_lumina_dit", lambda *a, **kw: (load("dit")(**kw), (FakeDiT(), None))[1])
    monkeypatch.setattr(lumina_trainer, "load_flux_ae", lambda *a, **kw: load("vae")(**kw))
    monkeypatch.setattr(lumina_trainer.LuminaTextEncoding, "from_files",
                        lambda **kw: (load("text")(**kw), SimpleNamespace(gemma2=None))[1])
    args = SimpleNamespace(pretrained_model_name_or_path=files["dit"], ae=files["vae"], gemma2=files["gemma2"],
                           gemma2_max_token_length=256, system_prompt="", tokenizer_cache_dir=None, fp8_base=False,
                           fp8_base_unet=False)
    return lumina_trainer.LuminaNetworkTrainer(), args, "inspect_lumina_checkpoint", ["vae", "gemma2"]


def _anima(monkeypatch, load, files):
    monkeypatch.setattr(anima_trainer, "inspect_anima_checkpoint", lambda path, adapter: SimpleNamespace())
    monkeypatch.setattr(anima_trainer, "load_anima_dit", lambda *a, **kw: (load("dit")(**kw), (FakeDiT(), None))[1])
    monkeypatch.setattr(anima_trainer, "load_qwen_image_vae", lambda *a, **kw: load("vae")(**kw))
    monkeypatch.setattr(anima_trainer.AnimaTextEncoding, "from_files",
                        lambda *a, **kw: (load("text")(**kw), SimpleNamespace(qwen3=None))[1])
    monkeypatch.setattr(anima_trainer, "apply_attention_options", lambda args, dit: None)
    args = SimpleNamespace(pretrained_model_name_or_path=files["dit"], llm_adapter_path=files["llm_adapter"],
                           vae=files["vae"], qwen3=files["qwen3"], vae_chunk_size=None, vae_disable_cache=False,
                           t5_tokenizer_path=None, tokenizer_cache_dir=None, qwen3_max_token_length=512,
                           t5_max_token_length=512, network_module="networks.lora_other", dim_from_weights=False)
    # the adapter is read by the DiT's loader: never prefetched
    return anima_trainer.AnimaNetworkTrainer(), args, "inspect_anima_checkpoint", ["vae", "qwen3"]


FAMILIES = {
    "sd3": (_sd3, ["dit", "vae", "clip_l", "clip_g", "t5xxl"]),
    "lumina": (_lumina, ["dit", "vae", "gemma2"]),
    "anima": (_anima, ["dit", "llm_adapter", "vae", "qwen3"]),
}


@pytest.fixture(params=sorted(FAMILIES))
def family(request, tmp_path, monkeypatch):
    """(trainer, args, name of the header check, files that should be prefetched, calls, files given to load_device)."""
    make, names = FAMILIES[request.param]
    files = {}
    for name in names:
        files[name] = str(tmp_path / f"{name}.safetensors")
        (tmp_path / f"{name}.safetensors").write_bytes(b"\0" * 8)
    calls, given = [], []

    def load(kind):
        def run(*_, device, **__):
            calls.append((kind, str(device)))
            if str(device) != "cpu" and kind == "text":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (faked)")
            return object()
        return run

    trainer, args, check, prefetched = make(monkeypatch, load, files)
    args.lowram = False
    monkeypatch.setattr(memory, "load_device", lambda args, device, files: (given.extend(files), CUDA)[1])
    monkeypatch.setattr(model_loading, "prefetch", lambda path, where: calls.append(("prefetch", str(where), path)))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)   # the DiT's loading thread
    return SimpleNamespace(trainer=trainer, args=args, check=check, files=files, calls=calls, given=given,
                           prefetched=[files[n] for n in prefetched])


def test_out_of_memory_on_the_gpu_route_retries_on_the_cpu(family, capsys):
    models = family.trainer.load_models(family.args, CUDA, torch.bfloat16)
    assert isinstance(models.denoiser, FakeDiT)
    assert "loading them into CPU memory instead" in capsys.readouterr().out
    loads = sorted(c for c in family.calls if c[0] != "prefetch")
    assert loads == sorted((kind, w) for kind in ("dit", "vae", "text") for w in ("cuda:0", "cpu"))   # GPU, then CPU
    # every model file decides the device; the encoders' own files are prefetched, the DiT's never
    assert [f for f in family.given if f is not None] == list(family.files.values())
    assert sorted(path for _, where, path in (c for c in family.calls if c[0] == "prefetch")
                  if where == "cuda:0") == sorted(family.prefetched)


def test_out_of_memory_with_lowram_is_not_retried(family):
    family.args.lowram = True
    with pytest.raises(torch.cuda.OutOfMemoryError):
        family.trainer.load_models(family.args, CUDA, torch.bfloat16)
    assert not any(c[1] == "cpu" for c in family.calls)


def test_a_wrong_dit_file_is_refused_before_anything_loads(family, monkeypatch):
    def refuse(*_):
        raise ModelFileError("expected a DiT, but this file looks like a T5 text encoder")

    monkeypatch.setattr(next(m for m in (sd3_trainer, lumina_trainer, anima_trainer) if hasattr(m, family.check)),
                        family.check, refuse)
    with pytest.raises(ModelFileError, match="looks like a T5"):
        family.trainer.load_models(family.args, CUDA, torch.bfloat16)
    assert family.calls == []


# ---------------------------------------------------------------------------------------------
# The shared pieces.

def test_cpu_fallback_only_for_the_gpu_route_and_only_for_running_out_of_memory(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    tried = []

    def load(where):
        tried.append(str(where))
        if str(where) != "cpu":
            raise torch.cuda.OutOfMemoryError("faked")
        return "loaded"

    assert model_loading.load_with_cpu_fallback(SimpleNamespace(lowram=False), CUDA, load) == "loaded"
    assert tried == ["cuda:0", "cpu"] and model_loading.FALLBACK_NOTE in capsys.readouterr().out

    def out_of_memory_on_the_cpu(where):   # (a CPU that runs out raises other errors; the rule is what is checked)
        raise torch.cuda.OutOfMemoryError("faked")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        model_loading.load_with_cpu_fallback(SimpleNamespace(lowram=False), "cpu", out_of_memory_on_the_cpu)

    def bad_file(where):
        tried.append(str(where))
        raise ModelFileError("bad file")

    tried.clear()
    with pytest.raises(ModelFileError):
        model_loading.load_with_cpu_fallback(SimpleNamespace(lowram=False), CUDA, bad_file)
    assert tried == ["cuda:0"]


def test_a_failing_encoder_waits_for_the_dit_and_drops_the_prefetches(monkeypatch):
    done, dropped = threading.Event(), []
    monkeypatch.setattr(model_loading, "drop_prefetched", lambda: dropped.append(True))

    def dit():
        time.sleep(0.2)
        done.set()
        return "dit"

    def encoders():
        raise ModelFileError("bad VAE file")

    with pytest.raises(ModelFileError, match="bad VAE"):
        model_loading.load_dit_beside("cpu", dit, encoders)
    assert done.is_set() and dropped == [True]
    assert model_loading.load_dit_beside("cpu", lambda: "dit", lambda: "encoders") == ("dit", "encoders")


def test_prefetched_are_the_encoders_own_files_each_once(tmp_path):
    for name in ("dit", "vae", "te", "all_in_one"):
        (tmp_path / name).write_bytes(b"\0")
    p = {name: str(tmp_path / name) for name in ("dit", "vae", "te", "all_in_one", "missing")}
    got = model_loading._prefetchable(
        [p["dit"], None], [p["vae"], None, p["dit"], p["te"], p["all_in_one"], p["all_in_one"], p["missing"],
                           str(tmp_path)])
    assert got == [p["vae"], p["te"]]   # not the DiT's, not one named twice, no missing file or folder


def test_a_file_named_twice_is_sized_once(tmp_path, monkeypatch):
    (tmp_path / "all_in_one").write_bytes(b"\0" * 3000)
    path = str(tmp_path / "all_in_one")
    monkeypatch.setattr(memory, "LOAD_TO_GPU_RESERVE_BYTES", 500)
    monkeypatch.setattr(memory, "cuda_allocatable_bytes", lambda device: 3500)
    assert memory.load_device(SimpleNamespace(lowram=False, blocks_to_swap=None), CUDA, [path, path, None]) == CUDA


def test_load_keys_reads_each_file_once_for_the_names_it_places(tmp_path, monkeypatch):
    a, b = {"x": torch.arange(4.0), "y": torch.ones(2, 3)}, {"z": torch.full((5,), 7, dtype=torch.int32)}
    sio.save_file_atomic(a, tmp_path / "a.safetensors")
    sio.save_file_atomic(b, tmp_path / "b.safetensors")
    where = dict.fromkeys(a, tmp_path / "a.safetensors") | dict.fromkeys(b, tmp_path / "b.safetensors")
    reads = []
    real = sio.load_file
    monkeypatch.setattr(sio, "load_file", lambda f, device, keys: (reads.append((f.name, sorted(keys))),
                                                                   real(f, device, keys))[1])
    got = sio.load_keys(where, ["y", "z", "absent", "x"], "cpu")
    assert sorted(reads) == [("a.safetensors", ["x", "y"]), ("b.safetensors", ["z"])]
    assert sorted(got) == ["x", "y", "z"] and all(torch.equal(got[k], (a | b)[k]) for k in got)
    reads.clear()
    assert sio.read_to_gpu(where, ["x"], "cpu") == {} and reads == []   # the CPU: read one at a time by the loader


# ---------------------------------------------------------------------------------------------
# Each DiT loader's GPU route, run on the CPU.

@pytest.fixture(scope="module")
def dit_cases(tmp_path_factory):
    """name -> (loading module, load(device) -> model) over tiny files written once; and the
    separate adapter's tensors."""
    tmp_path = tmp_path_factory.mktemp("dits")
    from library.anima import loading as anima_loading
    from library.flux import loading as flux_loading
    from library.lumina import loading as lumina_loading
    from library.sd3 import loading as sd3_loading
    from library.tiny.anima import anima_state_dict, write_anima_dit, write_llm_adapter
    from library.tiny.flux import write_flux_dit
    from library.tiny.lumina import write_lumina_dit
    from library.tiny.sd3 import write_sd3_checkpoint

    flux = write_flux_dit(tmp_path / "flux.safetensors")
    sd3 = write_sd3_checkpoint(tmp_path / "sd3.safetensors")   # with the VAE inside, which is not read
    lumina = write_lumina_dit(tmp_path / "lumina.safetensors", layout="comfy")
    anima = write_anima_dit(tmp_path / "anima.safetensors", prefix="")
    # a separate adapter, unprefixed: its names (blocks.0.cross_attn...) are also the DiT's
    write_llm_adapter(tmp_path / "adapter.safetensors", seed=1)
    adapter = {k: v for k, v in anima_state_dict(seed=1).items() if k.startswith("llm_adapter.")}
    return {
        "flux": (flux_loading, lambda d: flux_loading.load_flux_dit(flux, device=d)[0]),
        "sd3": (sd3_loading, lambda d: sd3_loading.load_sd3_mmdit(sd3, device=d)[0]),
        "lumina": (lumina_loading, lambda d: lumina_loading.load_lumina_dit(lumina, device=d)[0]),
        "anima": (anima_loading, lambda d: anima_loading.load_anima_dit(anima, device=d)[0]),
        "anima+adapter": (anima_loading, lambda d: anima_loading.load_anima_dit(
            anima, llm_adapter_path=tmp_path / "adapter.safetensors", device=d)[0]),
    }, adapter


@pytest.mark.parametrize("name", ["flux", "sd3", "lumina", "anima", "anima+adapter"])
def test_the_gpu_route_reads_every_tensor_once_and_builds_the_same_model(dit_cases, monkeypatch, name):
    cases, adapter = dit_cases
    module, load = cases[name]
    plain = load("cpu").state_dict()
    reads = []

    def read_here(where, keys, device):   # what read_to_gpu does on a GPU, on the CPU
        got = sio.load_keys(where, keys, "cpu")
        reads.append((len(got), got))
        return got

    monkeypatch.setattr(module, "read_to_gpu", read_here)
    routed = load("cpu").state_dict()
    assert sum(n for n, _ in reads) == len(routed)   # every tensor the model has, read at once
    assert all(not left for _, left in reads)        # and each popped as it was used
    assert routed.keys() == plain.keys() and all(torch.equal(routed[k], plain[k]) for k in plain)
    if name == "anima+adapter":
        assert all(torch.equal(routed[k], adapter[k]) for k in adapter)   # the separate file's, not the DiT's copy


# ---------------------------------------------------------------------------------------------
# On a GPU: every loader reads straight into GPU memory and gives the CPU route's weights.

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_loads_equal_the_cpu_route(tmp_path, dit_cases):
    from library.anima.text import load_qwen3
    from library.anima.vae import load_qwen_image_vae
    from library.lumina.gemma2 import load_gemma2
    from library.sd3.loading import load_sd3_vae
    from library.tiny.anima import write_tiny_anima_set
    from library.tiny.lumina import write_tiny_lumina_set
    from library.tiny.sd3 import write_tiny_sd3_set

    sd3 = write_tiny_sd3_set(tmp_path / "sd3")
    lumina = write_tiny_lumina_set(tmp_path / "lumina")
    anima = write_tiny_anima_set(tmp_path / "anima")
    loaders = list(dit_cases[0].values()) + [
        (None, lambda d: load_sd3_vae(sd3.checkpoint, device=d)),
        (None, lambda d: load_gemma2(lumina.gemma2, device=d)),
        (None, lambda d: load_qwen3(anima.qwen3, device=d)),
        (None, lambda d: load_qwen_image_vae(anima.vae, device=d, dtype=torch.bfloat16)),
    ]
    for _, load in loaders:
        on_cpu, on_gpu = load("cpu").state_dict(), load("cuda").state_dict()
        assert on_gpu.keys() == on_cpu.keys()
        for k, t in on_cpu.items():
            assert on_gpu[k].device.type == "cuda" and on_gpu[k].dtype == t.dtype
            assert torch.equal(on_gpu[k].cpu(), t), k
