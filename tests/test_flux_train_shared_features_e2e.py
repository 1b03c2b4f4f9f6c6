"""End to end through flux_train_network.py on tiny models: the loop's shared features —
validation loss, masked loss (alpha channel) and a two-resolution dataset with disk caches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from library.tiny.images import write_shapes_dataset
from tests.test_flux_train_e2e import setup, train  # noqa: F401  (module fixture reused)

pytestmark = pytest.mark.slow


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "tiny_log.jsonl").read_text().splitlines()]


def write_dataset_toml(path: Path, body: str) -> Path:
    path.write_text('[general]\ncaption_extension = ".txt"\n' + body)
    return path


# ---------------------------------------------------------------------------------- validation

@pytest.fixture(scope="module")
def validation_dataset(setup):  # noqa: F811
    base = setup[0]
    images = base / "images"
    return write_dataset_toml(base / "val.toml", f'[[datasets]]\nresolution = 128\nbatch_size = 2\n'
                              f'validation_seed = 5\nvalidation_split = 0.34\n'
                              f'[[datasets.subsets]]\nimage_dir = "{images.as_posix()}"\n')


def run_with_validation(setup, out, dataset, *extra):  # noqa: F811
    result = train(setup, out, "--max_train_steps", "8", *extra, dataset=dataset)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return records(out)


def test_validation_loss_is_logged_deterministic_and_leaves_training_alone(setup, validation_dataset, tmp_path):  # noqa: F811
    a = run_with_validation(setup, tmp_path / "a", validation_dataset, "--validate_every_n_steps", "3")
    b = run_with_validation(setup, tmp_path / "b", validation_dataset, "--validate_every_n_steps", "3")
    quiet = run_with_validation(setup, tmp_path / "c", validation_dataset, "--validate_every_n_epochs", "1000")

    def val(recs):
        return [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]

    def train_losses(recs):
        return [(r["step"], r["loss"]) for r in recs if "loss" in r]

    # 4 training images in batches of 2 -> 2 steps per epoch: steps 3 and 6, plus every epoch end
    assert [s for s, _ in val(a)] == [2, 3, 4, 6, 8]
    assert all(np.isfinite(v) and v > 0 for _, v in val(a))
    assert val(a) == val(b)                            # same figure for the same network
    assert val(quiet) == []
    assert train_losses(a) == train_losses(quiet)      # validating changed nothing in training
    assert len({v for _, v in val(a)}) > 1             # it follows the network as it trains
    with safe_open(str(tmp_path / "a" / "tiny.safetensors"), "pt") as f:
        assert f.metadata()["ss_num_validation_images"] == "2"


def test_validation_flags_without_a_validation_set_are_refused(setup, tmp_path):  # noqa: F811
    result = train(setup, tmp_path / "x", "--max_train_steps", "2", "--validate_every_n_steps", "1")
    assert result.returncode == 2
    assert "there is no validation set: add validation_split" in result.stdout


# ---------------------------------------------------------------------------------- masked loss

def write_rgba_dataset(folder: Path, alpha: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        rgba = rng.integers(0, 256, (128, 128, 4), dtype=np.uint8)
        rgba[..., 3] = alpha
        Image.fromarray(rgba, "RGBA").save(folder / f"img_{i}.png")
        (folder / f"img_{i}.txt").write_text(f"random pattern {i}")
    return folder


@pytest.mark.parametrize("cache", [True, False])
def test_transparent_images_contribute_no_loss(setup, tmp_path, cache):  # noqa: F811
    """Fully transparent images: with the mask honoured the loss is exactly 0 and the LoRA stays at
    its zero-initialised up weights; if the mask were ignored both would be non-zero."""
    images = write_rgba_dataset(tmp_path / "rgba", alpha=0)
    ds = write_dataset_toml(tmp_path / "ds.toml", f'[[datasets]]\nresolution = 128\nbatch_size = 2\n'
                            f'[[datasets.subsets]]\nimage_dir = "{images.as_posix()}"\nalpha_mask = true\n')
    result = train(setup, tmp_path / "out", "--max_train_steps", "4", "--masked_loss", dataset=ds, cache_latents=cache)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [r["loss"] for r in records(tmp_path / "out") if "loss" in r] == [0.0] * 4
    with safe_open(str(tmp_path / "out" / "tiny.safetensors"), "pt") as f:
        ups = [f.get_tensor(k) for k in f.keys() if k.endswith("lora_up.weight")]
    assert ups and all(float(u.abs().max()) == 0.0 for u in ups)


def test_opaque_alpha_mask_trains_normally(setup, tmp_path):  # noqa: F811
    images = write_rgba_dataset(tmp_path / "rgba", alpha=255)
    ds = write_dataset_toml(tmp_path / "ds.toml", f'[[datasets]]\nresolution = 128\nbatch_size = 2\n'
                            f'[[datasets.subsets]]\nimage_dir = "{images.as_posix()}"\nalpha_mask = true\n')
    result = train(setup, tmp_path / "out", "--max_train_steps", "2", "--masked_loss", dataset=ds)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert all(r["loss"] > 0 for r in records(tmp_path / "out") if "loss" in r)


def test_masked_loss_without_masks_is_refused(setup, tmp_path):  # noqa: F811
    result = train(setup, tmp_path / "x", "--max_train_steps", "2", "--masked_loss")
    assert result.returncode == 2
    assert "--masked_loss needs masks: set alpha_mask = true" in result.stdout


# ---------------------------------------------------------------------------------- multi-resolution

def test_two_resolutions_with_disk_caches(setup, tmp_path):  # noqa: F811
    images = write_shapes_dataset(tmp_path / "imgs", count=4)
    ds = write_dataset_toml(tmp_path / "multi.toml", (
        f'[[datasets]]\nresolution = 64\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = "{images.as_posix()}"\n'
        f'[[datasets]]\nresolution = 128\nbatch_size = 1\n[[datasets.subsets]]\nimage_dir = "{images.as_posix()}"\n'))
    result = train(setup, tmp_path / "out", "--max_train_epochs", "1", "--cache_latents_to_disk", dataset=ds)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # 4 images / 2 at 64 px + 4 images / 1 at 128 px = 6 steps in the epoch
    assert len([r for r in records(tmp_path / "out") if "loss" in r]) == 6
    caches = sorted(images.glob("*.safetensors"))
    assert len(caches) == 4
    with safe_open(str(caches[0]), "pt") as f:
        shapes = {tuple(f.get_tensor(k).shape[-2:]) for k in f.keys() if k.startswith("latents:")}
    assert len(shapes) == 2 and max(shapes)[0] == 2 * min(shapes)[0]   # one entry per resolution


def test_mask_images_from_conditioning_data_dir(setup, tmp_path):  # noqa: F811
    """Black mask images (red 0): the loss is exactly 0 whether latents are cached or not."""
    images = write_shapes_dataset(tmp_path / "imgs", count=4)
    masks = tmp_path / "masks"
    masks.mkdir()
    for png in images.glob("*.png"):
        Image.new("RGB", (32, 32), (0, 255, 255)).save(masks / png.name)   # any size; only red counts
    ds = write_dataset_toml(tmp_path / "ds.toml", f'[[datasets]]\nresolution = 128\nbatch_size = 2\n'
                            f'[[datasets.subsets]]\nimage_dir = "{images.as_posix()}"\n'
                            f'conditioning_data_dir = "{masks.as_posix()}"\n')
    for cache in (True, False):
        out = tmp_path / f"out{cache}"
        result = train(setup, out, "--max_train_steps", "2", "--masked_loss", dataset=ds, cache_latents=cache)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert [r["loss"] for r in records(out) if "loss" in r] == [0.0, 0.0]
    result = train(setup, tmp_path / "x", "--max_train_steps", "2", dataset=ds)
    assert result.returncode == 2 and "only the masked loss uses: add --masked_loss" in result.stdout
    (masks / "shape_000.png").unlink()
    result = train(setup, tmp_path / "y", "--max_train_steps", "2", "--masked_loss", dataset=ds)
    assert result.returncode == 2 and "1 images have no mask image of the same name" in result.stdout
