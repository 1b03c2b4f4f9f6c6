"""Image files: which ones we read, a cheap scan-time probe, decoding, resize/crop and augmentation.

Decoding policy (docs/dataset_config.md "Images"):
- EXIF orientation is applied (the probe reports the rotated size too).
- Palette, grayscale, CMYK, 16-bit and float images become 8-bit RGB.
- Transparency: with alpha_mask the alpha channel is returned as the mask and the RGB is used as
  stored; without alpha_mask the image is composited on white, the way image viewers show it.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
from dataclasses import dataclass
from typing import Iterator

import cv2
import numpy as np
from PIL import Image, ImageOps

from library.data.buckets import Size
from library.errors import DatasetError

# Pillow formats that decode to pixels without external programs.
_RASTER_FORMATS = {
    "AVIF", "BMP", "DIB", "DDS", "GIF", "ICNS", "ICO", "IM", "JPEG", "JPEG2000", "JXL", "MPO", "MSP",
    "PCX", "PNG", "PPM", "PSD", "QOI", "SGI", "SUN", "TGA", "TIFF", "WEBP", "XBM", "XPM", "HEIF",
}
_ORIENTATION_TAG = 0x0112
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (with the dot) of every raster format this Pillow can open."""
    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items()
                     if fmt in _RASTER_FORMATS and fmt in Image.OPEN)


def list_images(directory: str, extensions: frozenset[str] | None = None) -> list[str]:
    """Image files directly inside `directory` (not recursive), sorted by name; hidden files and
    our own temporary files are skipped."""
    extensions = extensions or image_extensions()
    out = []
    with os.scandir(directory) as it:
        for entry in it:
            if entry.name.startswith(".") or not entry.is_file():
                continue
            if os.path.splitext(entry.name)[1].lower() in extensions:
                out.append(os.path.join(directory, entry.name))
    out.sort()
    return out


@dataclass(frozen=True)
class ImageProbe:
    size: Size          # (width, height) after EXIF orientation
    has_alpha: bool


def probe_image(path: str) -> ImageProbe:
    """Open the header only: size, orientation and transparency. Raises DatasetError for a file
    that is not a readable image (so the scan can skip it and say why)."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width <= 0 or height <= 0:
                raise DatasetError(f"{path}: image has no pixels ({width}x{height})")
            orientation = 1
            if img.format in ("JPEG", "MPO", "TIFF", "WEBP", "PNG"):
                try:
                    orientation = img.getexif().get(_ORIENTATION_TAG, 1)
                except Exception:  # a broken EXIF block should not reject the image
                    orientation = 1
            has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    except DatasetError:
        raise
    except Exception as e:  # PIL raises many types for broken files
        raise DatasetError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    if orientation in _SWAPS_SIDES:
        width, height = height, width
    return ImageProbe((width, height), has_alpha)


@dataclass
class DecodedImage:
    rgb: np.ndarray            # (H, W, 3) uint8
    alpha: np.ndarray | None   # (H, W) uint8, only when asked for


def _to_8bit_array(img: Image.Image) -> np.ndarray:
    """Single-channel high-bit-depth images scaled (not clipped) to 8 bits."""
    arr = np.asarray(img)
    if img.mode == "F":
        top = 1.0 if float(np.nanmax(arr)) <= 1.0 else 255.0
        return np.clip(np.nan_to_num(arr) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    # I;16 variants and 32-bit I: 16-bit data is the usual case.
    top = 65535.0 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 255.0
    return np.clip(arr.astype(np.float64) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _normalize_mode(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """(RGB uint8, alpha uint8 or None) from any Pillow mode."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        gray = _to_8bit_array(img)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2)), None
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = np.asarray(img.convert("RGBA"))
        return np.ascontiguousarray(rgba[:, :, :3]), np.ascontiguousarray(rgba[:, :, 3])
    return np.asarray(img.convert("RGB")), None


def decode_image(path: str, *, want_alpha: bool, data: bytes | None = None,
                 draft_size: Size | None = None) -> DecodedImage:
    """Decode to 8-bit RGB (+ alpha when `want_alpha`). `draft_size` (w, h after orientation) lets
    JPEG decoding downscale by a power of two in the DCT domain while staying >= that size.
    Raises DatasetError naming the file if it cannot be decoded."""
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as img:
            if draft_size is not None and img.format == "JPEG":
                orientation = img.getexif().get(_ORIENTATION_TAG, 1)
                w, h = draft_size
                if orientation in _SWAPS_SIDES:
                    w, h = h, w
                img.draft(None, (w, h))
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb, alpha = _normalize_mode(img)
    except Exception as e:
        raise DatasetError(
            f"image {path} could not be decoded ({type(e).__name__}: {e}). The file is damaged or "
            "truncated: replace or remove it and start again."
        ) from e
    if alpha is not None and not want_alpha:
        # Composite on white: transparent pixels often hold arbitrary RGB (commonly black).
        a = alpha.astype(np.float32)[:, :, None] / 255.0
        rgb = (rgb.astype(np.float32) * a + 255.0 * (1.0 - a) + 0.5).clip(0, 255).astype(np.uint8)
        alpha = None
    elif alpha is None and want_alpha:
        alpha = np.full(rgb.shape[:2], 255, dtype=np.uint8)
    return DecodedImage(rgb, alpha)


# ------------------------------------------------------------------------------------ resize/crop

@contextlib.contextmanager
def single_threaded_cv2() -> Iterator[None]:
    """Run cv2 single-threaded inside the block (call from the main thread).

    Used around our own decode thread pool: it avoids oversubscription, and cv2's pthreads pool,
    once used from a non-main thread, makes cv2.setNumThreads hang in forked children (such as
    data-loader workers)."""
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


_CV2_FILTERS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "linear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "cubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
}
_PIL_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}


def choose_interpolation(src: Size, dst: Size, requested: str | None) -> str:
    """The documented default: area when both sides shrink (or stay), else lanczos."""
    if requested is not None:
        return requested
    return "area" if src[0] >= dst[0] and src[1] >= dst[1] else "lanczos"


def resize_array(arr: np.ndarray, size: Size, interpolation: str) -> np.ndarray:
    """Resize an (H, W) or (H, W, C) uint8 array to size = (w, h)."""
    if arr.shape[1] == size[0] and arr.shape[0] == size[1]:
        return arr
    if interpolation in _PIL_FILTERS:
        return np.asarray(Image.fromarray(arr).resize(size, _PIL_FILTERS[interpolation]))
    return cv2.resize(arr, size, interpolation=_CV2_FILTERS[interpolation])


@dataclass(frozen=True)
class CropPlan:
    resized: Size
    bucket: Size
    left: int
    top: int


def plan_crop(resized: Size, bucket: Size, rng: random.Random | None) -> CropPlan:
    """Where to cut the bucket out of the resized image: centred, or random when `rng` is given."""
    over_w, over_h = max(0, resized[0] - bucket[0]), max(0, resized[1] - bucket[1])
    if rng is None:
        return CropPlan(resized, bucket, over_w // 2, over_h // 2)
    return CropPlan(resized, bucket, rng.randint(0, over_w), rng.randint(0, over_h))


def resize_and_crop(image: DecodedImage, plan: CropPlan, interpolation: str | None) -> DecodedImage:
    src = (image.rgb.shape[1], image.rgb.shape[0])
    method = choose_interpolation(src, plan.resized, interpolation)
    rgb = resize_array(image.rgb, plan.resized, method)
    alpha = resize_array(image.alpha, plan.resized, method) if image.alpha is not None else None
    bw, bh = plan.bucket
    rgb = rgb[plan.top:plan.top + bh, plan.left:plan.left + bw]
    if alpha is not None:
        alpha = alpha[plan.top:plan.top + bh, plan.left:plan.left + bw]
    if rgb.shape[0] != bh or rgb.shape[1] != bw:
        raise DatasetError(f"internal: crop {rgb.shape[1]}x{rgb.shape[0]} does not match bucket {bw}x{bh}")
    return DecodedImage(np.ascontiguousarray(rgb), None if alpha is None else np.ascontiguousarray(alpha))


# ------------------------------------------------------------------------------------ augmentation

_HUE_SHIFT_LIMIT = 8.0  # OpenCV hue units (0..180)


def color_augment(rgb: np.ndarray, rng: random.Random) -> np.ndarray:
    """sd-scripts' weak colour augmentation: with p=0.33, a hue shift in [-8, 8] or a gamma in
    [0.95, 1.05], 50/50. Gamma is applied to normalised [0,1] values (see compatibility notes)."""
    if rng.random() > 0.33:
        return rgb
    if rng.random() > 0.5:
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
        shift = rng.uniform(-_HUE_SHIFT_LIMIT, _HUE_SHIFT_LIMIT)
        hue = (hsv[:, :, 0].astype(np.float32) + shift) % 180.0
        hsv[:, :, 0] = hue.astype(np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    gamma = rng.uniform(0.95, 1.05)
    table = np.clip(((np.arange(256) / 255.0) ** gamma) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return table[rgb]


def flip_horizontal(image: DecodedImage) -> DecodedImage:
    rgb = np.ascontiguousarray(image.rgb[:, ::-1])
    alpha = None if image.alpha is None else np.ascontiguousarray(image.alpha[:, ::-1])
    return DecodedImage(rgb, alpha)
