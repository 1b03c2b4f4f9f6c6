"""End to end through flux_train_network.py: the shared memory options on the CPU.

Block swap, offloaded and selective checkpointing move the same numbers around, so a run with them must
give exactly the losses of a run without; fp8 base weights change the numbers (that is the
point) but must train; impossible combinations are refused before anything loads."""

from __future__ import annotations

from dataclasses import replace

import pytest
from safetensors import safe_open

from library.tiny.flux import tiny_flux_params, write_flux_dit
from tests.test_flux_train_e2e import losses, setup, train  # noqa: F401  (module fixture reused)

pytestmark = pytest.mark.slow

STEPS = ("--max_train_steps", "4")


@pytest.fixture(scope="module")
def deep_dit(setup):  # noqa: F811
    """The tiny DiT with 4 double + 4 single blocks, so that blocks can be swapped (each list
    keeps two on the device)."""
    params = replace(tiny_flux_params("dev"), depth=4, depth_single_blocks=4)
    return write_flux_dit(setup[0] / "flux1-dev-deep.safetensors", "dev", params=params, seed=4)


@pytest.fixture(scope="module")
def baseline(setup, deep_dit, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("mem_base")
    r = train(setup, out, *STEPS, "--gradient_checkpointing", "--pretrained_model_name_or_path", str(deep_dit))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return losses(out)


@pytest.mark.parametrize("extra, note", [
    (("--blocks_to_swap", "2"), "block swap: 2 (1 of 4, 2 of 4 blocks per list)"),
    (("--split_mode",), "--split_mode is deprecated"),
    (("--cpu_offload_checkpointing",), None),
    (("--selective_checkpointing", "--blocks_to_swap", "2"), "makes each step slower"),   # the same numbers
    # compiled blocks with the checkpoint compiled along (aot_eager: the same graphs, no slow codegen)
    (("--selective_checkpointing", "--torch_compile", "--dynamo_backend", "aot_eager"),
     "blocks compile (aot_eager)"),
])
def test_swap_and_offloaded_checkpoints_give_the_same_losses(setup, deep_dit, baseline, tmp_path, extra, note):  # noqa: F811
    if extra == ("--split_mode",):
        # --split_mode means 18, too many for this model: the message names the model's limit.
        r = train(setup, tmp_path / "o", *STEPS, "--gradient_checkpointing", "--pretrained_model_name_or_path",
                  str(deep_dit), *extra)
        assert r.returncode == 2 and note in r.stdout
        assert "--blocks_to_swap 18 is too many for FLUX.1 dev: at most 2" in r.stdout
        return
    r = train(setup, tmp_path / "o", *STEPS, "--gradient_checkpointing", "--pretrained_model_name_or_path",
              str(deep_dit), *extra)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    if note:
        assert note in r.stdout
    got = losses(tmp_path / "o")
    assert sorted(got) == sorted(baseline)
    for step, value in baseline.items():
        assert got[step] == pytest.approx(value, rel=1e-6, abs=1e-7), step


def test_fp8_base_trains_and_saves_a_normal_lora(setup, deep_dit, baseline, tmp_path):  # noqa: F811
    out = tmp_path / "fp8"
    r = train(setup, out, *STEPS, "--pretrained_model_name_or_path", str(deep_dit), "--fp8_base",
              "--mixed_precision", "bf16", "--blocks_to_swap", "2", "--save_precision", "bf16")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "fp8 base: 52 Linear layers in float8_e4m3fn" in r.stdout
    got = losses(out)
    assert len(got) == 4 and all(v == v and v < 10 for v in got.values())
    # fp8 rounds the base weights (~3% RMS): close to, but not the same as, the bf16 run.
    assert got[1] == pytest.approx(baseline[1], rel=0.25) and got[1] != baseline[1]
    with safe_open(str(out / "tiny.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert {str(d) for d in dtypes} == {"torch.bfloat16"}


@pytest.mark.parametrize("extra, message", [
    (("--blocks_to_swap", "4", "--cpu_offload_checkpointing"), "cannot be used with --cpu_offload_checkpointing"),
    (("--blocks_to_swap", "auto"), "--blocks_to_swap auto sizes the swap to the free GPU memory"),
    (("--blocks_to_swap", "two"), "--blocks_to_swap takes a number of blocks or 'auto'"),
    (("--double_blocks_to_swap", "2", "--blocks_to_swap", "5"), "conflicts with --blocks_to_swap 5"),
    (("--fp8_base",), "--fp8_base computes in the mixed-precision dtype"),
    (("--selective_checkpointing",), "Add --gradient_checkpointing or remove it"),
])
def test_impossible_memory_options_are_refused(setup, tmp_path, extra, message):  # noqa: F811
    r = train(setup, tmp_path / "bad", "--max_train_steps", "1", *extra)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert message in r.stdout + r.stderr
    assert "Traceback" not in r.stderr
