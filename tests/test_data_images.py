"""Image formats, modes, EXIF orientation, transparency, corrupt files, resize/crop and augmentation."""

from __future__ import annotations

import random

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from library.data.batches import images_to_unit_range
from library.data.images import (
    CropPlan, DecodedImage, choose_interpolation, color_augment, decode_image, image_extensions, list_images,
    plan_crop, probe_image, resize_and_crop,
)
from library.errors import DatasetError
from tests.test_data_helpers import make_image


def test_common_extensions_are_supported():
    exts = image_extensions()
    for ext in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"):
        assert ext in exts
    assert ".pdf" not in exts and ".txt" not in exts


def test_list_images_sorted_skips_hidden_and_other_files(tmp_path):
    for name in ("b.png", "a.JPG", ".hidden.png", "notes.txt", "c.webp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.split("/")[-1] for p in list_images(str(tmp_path))] == ["a.JPG", "b.png", "c.webp"]


@pytest.mark.parametrize("ext,kw", [(".png", {}), (".jpg", {"quality": 95}), (".webp", {"quality": 95}),
                                    (".bmp", {}), (".tif", {}), (".gif", {})])
def test_formats_decode_to_rgb(tmp_path, ext, kw):
    p = make_image(tmp_path / f"x{ext}", (40, 24), **kw)
    assert probe_image(p).size == (40, 24)
    img = decode_image(p, want_alpha=False)
    assert img.rgb.shape == (24, 40, 3) and img.rgb.dtype == np.uint8 and img.alpha is None


def test_exif_orientation_is_applied(tmp_path):
    base = np.zeros((20, 40, 3), np.uint8)
    base[:, :10] = (255, 0, 0)  # red band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    p = str(tmp_path / "rot.jpg")
    Image.fromarray(base).save(p, exif=exif, quality=100)
    assert probe_image(p).size == (20, 40)
    img = decode_image(p, want_alpha=False)
    with Image.open(p) as ref:
        expected = np.asarray(ImageOps.exif_transpose(ref).convert("RGB"))
    assert img.rgb.shape == (40, 20, 3)
    np.testing.assert_array_equal(img.rgb, expected)
    assert img.rgb[:10, :, 0].mean() > 200  # the red band is now at the top


def test_rgba_alpha_mask_or_white_composite(tmp_path):
    arr = np.zeros((2, 3, 4), np.uint8)
    arr[..., :3] = (10, 20, 30)
    arr[0, 0, 3], arr[0, 1, 3], arr[0, 2, 3] = 0, 255, 128
    p = str(tmp_path / "a.png")
    Image.fromarray(arr, "RGBA").save(p)
    assert probe_image(p).has_alpha
    masked = decode_image(p, want_alpha=True)
    np.testing.assert_array_equal(masked.rgb[0, 0], (10, 20, 30))  # stored RGB kept
    assert list(masked.alpha[0]) == [0, 255, 128]
    flat = decode_image(p, want_alpha=False)
    assert flat.alpha is None
    np.testing.assert_array_equal(flat.rgb[0, 0], (255, 255, 255))
    np.testing.assert_array_equal(flat.rgb[0, 1], (10, 20, 30))
    expected = [round(v * 128 / 255 + 255 * (1 - 128 / 255)) for v in (10, 20, 30)]
    assert list(flat.rgb[0, 2]) == expected


def test_alpha_mask_on_opaque_image_is_all_ones(tmp_path):
    p = make_image(tmp_path / "o.png", (8, 4))
    img = decode_image(p, want_alpha=True)
    assert img.alpha.shape == (4, 8) and (img.alpha == 255).all()


def test_palette_with_transparency_and_la(tmp_path):
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal.info["transparency"] = 0
    pal.putpixel((0, 0), 0)
    p = str(tmp_path / "p.png")
    pal.save(p, transparency=0)
    img = decode_image(p, want_alpha=True)
    assert img.alpha[0, 0] == 0 and img.alpha[1, 1] == 255
    np.testing.assert_array_equal(img.rgb[1, 1], (200, 100, 50))
    la = Image.fromarray(np.stack([np.full((3, 3), 90, np.uint8), np.full((3, 3), 255, np.uint8)], -1), "LA")
    p2 = str(tmp_path / "la.png")
    la.save(p2)
    d = decode_image(p2, want_alpha=True)
    assert (d.rgb == 90).all() and (d.alpha == 255).all()


def test_grayscale_cmyk_and_16bit(tmp_path):
    g = make_image(tmp_path / "g.png", (5, 3), mode="L")
    d = decode_image(g, want_alpha=False)
    assert d.rgb.shape == (3, 5, 3) and (d.rgb[..., 0] == d.rgb[..., 2]).all()
    c = make_image(tmp_path / "c.jpg", (6, 4), mode="CMYK", quality=95)
    assert decode_image(c, want_alpha=False).rgb.shape == (4, 6, 3)
    arr16 = np.array([[0, 32768, 65535]], dtype=np.uint16)
    p16 = str(tmp_path / "w.png")
    Image.fromarray(arr16).save(p16)
    assert Image.open(p16).mode.startswith("I")
    d16 = decode_image(p16, want_alpha=False)
    assert list(d16.rgb[0, :, 0]) == [0, 128, 255]  # scaled, not clipped at 255


def test_unreadable_files(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(DatasetError, match="junk.png: not a readable image"):
        probe_image(str(junk))
    good = make_image(tmp_path / "t.png", (64, 64))
    data = open(good, "rb").read()
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(data[: len(data) // 2])
    assert probe_image(str(trunc)).size == (64, 64)  # the header is fine: the scan cannot tell
    with pytest.raises(DatasetError, match=r"image .*trunc.png could not be decoded .*replace or remove it"):
        decode_image(str(trunc), want_alpha=False)


def test_default_interpolation_area_when_shrinking_else_lanczos(tmp_path):
    assert choose_interpolation((100, 100), (50, 120), None) == "lanczos"  # one side grows
    assert choose_interpolation((100, 100), (50, 100), None) == "area"
    assert choose_interpolation((100, 100), (200, 200), "bicubic") == "bicubic"
    rgb = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    shrink = resize_and_crop(DecodedImage(rgb, None), CropPlan((45, 30), (45, 30), 0, 0), None)
    np.testing.assert_array_equal(shrink.rgb, cv2.resize(rgb, (45, 30), interpolation=cv2.INTER_AREA))
    grow = resize_and_crop(DecodedImage(rgb, None), CropPlan((180, 120), (180, 120), 0, 0), None)
    expected = np.asarray(Image.fromarray(rgb).resize((180, 120), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(grow.rgb, expected)
    cubic = resize_and_crop(DecodedImage(rgb, None), CropPlan((45, 30), (45, 30), 0, 0), "bicubic")
    np.testing.assert_array_equal(cubic.rgb, cv2.resize(rgb, (45, 30), interpolation=cv2.INTER_CUBIC))


def test_center_and_random_crop():
    rgb = np.arange(10 * 20 * 3, dtype=np.uint32).reshape(10, 20, 3).astype(np.uint8)
    alpha = np.arange(200, dtype=np.uint8).reshape(10, 20)
    plan = plan_crop((20, 10), (12, 8), None)
    assert (plan.left, plan.top) == (4, 1)
    out = resize_and_crop(DecodedImage(rgb, alpha), plan, None)
    np.testing.assert_array_equal(out.rgb, rgb[1:9, 4:16])
    np.testing.assert_array_equal(out.alpha, alpha[1:9, 4:16])
    offsets = {(p.left, p.top) for p in (plan_crop((20, 10), (12, 8), random.Random(s)) for s in range(200))}
    assert offsets == {(x, y) for x in range(9) for y in range(3)}


def test_color_augment_is_seeded_and_weak():
    rgb = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    outs = [color_augment(rgb, random.Random(s)) for s in range(60)]
    changed = [o for o in outs if not np.array_equal(o, rgb)]
    assert 8 < len(changed) < 35  # p = 0.33
    assert all(np.abs(o.astype(int) - rgb).mean() < 40 for o in changed)
    np.testing.assert_array_equal(color_augment(rgb, random.Random(5)), color_augment(rgb, random.Random(5)))


def test_jpeg_draft_decoding_keeps_at_least_the_target_size(tmp_path):
    p = make_image(tmp_path / "big.jpg", (1600, 1200), quality=90)
    d = decode_image(p, want_alpha=False, draft_size=(400, 300))
    assert d.rgb.shape == (300, 400, 3)  # 1/4 scale exactly
    d = decode_image(p, want_alpha=False, draft_size=(500, 300))
    assert d.rgb.shape[1] >= 500 and d.rgb.shape[0] >= 300


def test_tensor_range():
    t = images_to_unit_range([np.array([[[0]], [[255]], [[128]]], np.uint8)])
    assert t.shape == (1, 3, 1, 1) and t.dtype == torch.float32
    np.testing.assert_allclose(t[0, :, 0, 0].numpy(), [-1.0, 1.0, 128 / 127.5 - 1], atol=1e-6)
