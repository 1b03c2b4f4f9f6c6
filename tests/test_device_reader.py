"""library/device_reader.py: tensors read in pieces by several threads land byte-exact, on the CPU
here (the same piece plan as the GPU route) and on CUDA when present; bad files fail clearly."""

import pytest
import torch

from library import safetensors_io as sio
from library.device_reader import plan_pieces, read_tensors
from library.errors import ModelFileError


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(37, 11, generator=g), "b": torch.arange(1000, dtype=torch.int64),
            "c": torch.randn(64, 33, generator=g).bfloat16(), "d": torch.randn(9, 16, generator=g).to(torch.float8_e4m3fn),
            "e": torch.empty(0, 3), "f": torch.tensor(3.5).half()}


def _entries(path, keys):
    header = sio.read_header(path)
    start = sio._data_start(path)
    return {k: sio._entry(path, header, k, start) for k in keys}


def test_pieces_cover_each_tensor_once_in_file_order():
    spans = {"x": (100, 1100), "y": (8, 100), "z": (1100, 1101)}
    pieces = plan_pieces(spans, chunk=300)
    assert [p.offset for p in pieces] == sorted(p.offset for p in pieces)
    for key, (begin, end) in spans.items():
        mine = [p for p in pieces if p.key == key]
        assert sum(p.length for p in mine) == end - begin and all(p.length <= 300 for p in mine)
        assert [p.start for p in mine] == [p.offset - begin for p in mine]


@pytest.mark.parametrize("chunk,readers", [(7, 3), (64, 1), (1 << 20, 4)])
def test_cpu_reads_are_byte_exact(tmp_path, chunk, readers):
    tensors = _tensors()
    path = tmp_path / "t.safetensors"
    sio.save_file_atomic(tensors, path)
    got = read_tensors(path, _entries(path, list(tensors)), torch.device("cpu"), chunk=chunk, readers=readers)
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape
        assert torch.equal(got[k].view(-1).view(torch.uint8), t.view(-1).view(torch.uint8)) if t.numel() else True


def test_truncated_file_is_refused_with_a_reason(tmp_path):
    path = tmp_path / "t.safetensors"
    sio.save_file_atomic(_tensors(), path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    sio.set_mmap_loading(False)
    try:
        with pytest.raises(ModelFileError, match="past the end of the file"):
            sio.load_file(path)
    finally:
        sio.set_mmap_loading(True)


def test_missing_key_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    sio.save_file_atomic(_tensors(), path)
    sio.set_mmap_loading(False)
    try:
        with pytest.raises(ModelFileError, match="tensor nope is missing"):
            sio.load_file(path, keys=["a", "nope"])
    finally:
        sio.set_mmap_loading(True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_reads_are_byte_exact_and_leave_the_stream_usable(tmp_path):
    tensors = _tensors() | {"big": torch.randn(3, 1 << 20)}
    path = tmp_path / "t.safetensors"
    sio.save_file_atomic(tensors, path)
    got = read_tensors(path, _entries(path, list(tensors)), torch.device("cuda"), chunk=1 << 20, readers=3)
    for k, t in tensors.items():
        assert got[k].device.type == "cuda"
        assert torch.equal(got[k].cpu().view(-1).view(torch.uint8), t.view(-1).view(torch.uint8)) if t.numel() else True
    assert torch.equal(sio.load_file(path, device="cuda")["big"].sum().cpu(), tensors["big"].cuda().sum().cpu())


def test_prefetch_is_a_no_op_for_the_cpu(tmp_path):
    path = tmp_path / "t.safetensors"
    sio.save_file_atomic(_tensors(), path)
    sio.prefetch(path, torch.device("cpu"))
    assert not sio._prefetched
    assert torch.equal(sio.load_file(path, keys=["a"])["a"], _tensors()["a"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_prefetched_file_serves_the_next_load_once(tmp_path):
    tensors = _tensors()
    path = tmp_path / "t.safetensors"
    sio.save_file_atomic(tensors, path)
    sio.prefetch(path, torch.device("cuda"))
    assert len(sio._prefetched) == 1
    got = sio.load_file(path, device="cuda", keys=["a", "c"])
    assert list(got) == ["a", "c"] and not sio._prefetched
    assert torch.equal(got["c"].cpu(), tensors["c"]) and got["a"].device.type == "cuda"
    assert torch.equal(sio.load_file(path, device="cuda")["b"].cpu(), tensors["b"])   # a plain read afterwards


def test_reads_without_preadv_use_a_file_per_thread(tmp_path, monkeypatch):
    """Windows has no os.preadv: the seek + readinto fallback gives the same bytes."""
    import os

    tensors = _tensors()
    path = tmp_path / "t.safetensors"
    sio.save_file_atomic(tensors, path)
    monkeypatch.delattr(os, "preadv")
    got = read_tensors(path, _entries(path, list(tensors)), torch.device("cpu"), chunk=16, readers=3)
    for k, t in tensors.items():
        assert torch.equal(got[k].view(-1).view(torch.uint8), t.view(-1).view(torch.uint8)) if t.numel() else True
