"""Output names and rotation (FORMATS.md 8.2)."""

from library.training import checkpoints as ck


def test_names():
    assert ck.epoch_stem("my", 3) == "my-000003"
    assert ck.epoch_stem(None, 3) == "epoch-000003"
    assert ck.step_stem("my", 200) == "my-step00000200"
    assert ck.step_stem(None, 5) == "at-step00000005"
    assert ck.final_stem(None) == "last"


def test_rotate_epochs_and_steps(tmp_path):
    for e in (1, 2, 3):
        (tmp_path / f"my-{e:06d}.safetensors").write_bytes(b"x")
    ck.rotate_epoch_outputs(str(tmp_path), "my", "safetensors", epoch=3, every=1, keep_files=2, keep_states=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-000002.safetensors", "my-000003.safetensors"]

    for s in (10, 20, 30):
        (tmp_path / f"my-step{s:08d}.safetensors").write_bytes(b"x")
        (tmp_path / f"my-step{s:08d}-state").mkdir()
    ck.rotate_step_outputs(str(tmp_path), "my", "safetensors", step=30, keep_files_steps=15, keep_states_steps=5)
    names = sorted(p.name for p in tmp_path.iterdir() if "step" in p.name)
    assert names == ["my-step00000020.safetensors", "my-step00000030-state", "my-step00000030.safetensors"]


def test_nan_loss_stops_with_the_step(tmp_path):
    import pytest
    from library.training.trainer import NetworkTrainer, TrainingDiverged

    class State:
        metrics_file = tmp_path / "log.jsonl"
        epoch = 0
        accelerator = type("A", (), {"log_with": None, "is_main_process": True})()
        postfix: dict = {}

    class Bar:
        def set_postfix(self, *_, **__):
            pass

    NetworkTrainer().report_losses(State(), [(1, 0.5)], [(1, 1e-4)], [], Bar())
    with pytest.raises(TrainingDiverged, match="at step 2"):
        NetworkTrainer().report_losses(State(), [(2, float("nan"))], [(2, 1e-4)], [], Bar())
    assert len(State.metrics_file.read_text().splitlines()) == 1   # the NaN step is never logged as a loss


def test_loading_without_mmap_reads_the_same_tensors(tmp_path):
    """--disable_mmap_load_safetensors: plain file reads give exactly the memory-mapped tensors."""
    import torch

    from library import safetensors_io as sio

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, 2).bfloat16(),
               "d": torch.randn(4, 4).to(torch.float8_e4m3fn), "e": torch.empty(0, 3)}
    path = tmp_path / "t.safetensors"
    sio.save_file_atomic(tensors, path)
    mapped = sio.load_file(path)
    try:
        sio.set_mmap_loading(False)
        read = sio.load_file(path)
        part = sio.load_file(path, keys=["c"])
    finally:
        sio.set_mmap_loading(True)
    assert set(read) == set(tensors) and list(part) == ["c"]
    for k, t in tensors.items():
        assert read[k].dtype == t.dtype and read[k].shape == t.shape
        assert torch.equal(read[k].view(torch.uint8), mapped[k].view(torch.uint8)) if t.numel() else True
