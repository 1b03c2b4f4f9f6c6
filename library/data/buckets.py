"""Aspect-ratio bucketing, exactly as FORMATS 5.3 describes sd-scripts' BucketManager.

Sizes are (width, height) everywhere in this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Size = tuple[int, int]


def make_bucket_resolutions(max_reso: Size, min_size: int = 256, max_size: int = 1024,
                            divisible: int = 64) -> list[Size]:
    """The predefined bucket grid for a training resolution (area = W*H of `max_reso`)."""
    max_area = max_reso[0] * max_reso[1]
    resos: set[Size] = set()
    side = int(math.sqrt(max_area)) // divisible * divisible
    resos.add((side, side))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible * divisible))
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


@dataclass(frozen=True)
class BucketAssignment:
    bucket: Size        # the training size of the batch this image goes to
    resized: Size       # the image is resized to this, then the overflow is cropped to `bucket`
    ar_error: float     # bucket aspect ratio minus image aspect ratio (0 in no-upscale mode)


class BucketPlanner:
    """Chooses a bucket and a resized size for each image.

    Three modes: bucketing off (one bucket = the resolution), the predefined grid, and
    `bucket_no_upscale` (buckets made per image size, never enlarging).
    """

    def __init__(self, resolution: Size, *, enable_bucket: bool, min_size: int = 256, max_size: int = 1024,
                 step: int = 64, no_upscale: bool = False):
        self.resolution = resolution
        self.max_area = resolution[0] * resolution[1]
        self.step = step
        self.no_upscale = enable_bucket and no_upscale
        if not enable_bucket:
            self.predefined: list[Size] = [resolution]
        elif self.no_upscale:
            self.predefined = []
        else:
            self.predefined = make_bucket_resolutions(resolution, min_size, max_size, step)
        self._predefined_set = set(self.predefined)
        self._predefined_ars = [w / h for w, h in self.predefined]

    def _round_to_step(self, x: float) -> int:
        v = int(x + 0.5)
        return v - v % self.step

    def assign(self, width: int, height: int) -> BucketAssignment:
        ar = width / height
        if self.no_upscale:
            return self._assign_no_upscale(width, height, ar)
        if (width, height) in self._predefined_set:
            return BucketAssignment((width, height), (width, height), 0.0)
        errors = [abs(b_ar - ar) for b_ar in self._predefined_ars]
        index = errors.index(min(errors))  # first one on ties, like numpy.argmin
        bucket = self.predefined[index]
        bucket_ar = bucket[0] / bucket[1]
        scale = bucket[1] / height if ar > bucket_ar else bucket[0] / width
        resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        return BucketAssignment(bucket, resized, bucket_ar - ar)

    def _assign_no_upscale(self, width: int, height: int, ar: float) -> BucketAssignment:
        if width * height > self.max_area:
            rw = math.sqrt(self.max_area * ar)
            rh = self.max_area / rw
            bw = self._round_to_step(rw)
            bh_for_w = self._round_to_step(bw / ar)
            ar_w = bw / bh_for_w if bh_for_w else float("inf")
            bh = self._round_to_step(rh)
            bw_for_h = self._round_to_step(bh * ar)
            ar_h = bw_for_h / bh if bh else float("inf")
            if abs(ar_w - ar) < abs(ar_h - ar):
                resized = (bw, int(bw / ar + 0.5))
            else:
                resized = (int(bh * ar + 0.5), bh)
        else:
            resized = (width, height)
        bucket = (resized[0] - resized[0] % self.step, resized[1] - resized[1] % self.step)
        return BucketAssignment(bucket, resized, 0.0)


def center_crop_offsets(resized: Size, bucket: Size) -> tuple[int, int]:
    """(left, top) of the centred bucket-sized window inside the resized image."""
    return (max(0, resized[0] - bucket[0]) // 2, max(0, resized[1] - bucket[1]) // 2)


def crop_ltrb(bucket: Size, image_size: Size) -> tuple[int, int, int, int]:
    """sd-scripts' recorded crop box: the image *fitted inside* the bucket, centred (used as
    SDXL-style crop conditioning). Integer-valued like the reference's floor divisions."""
    bucket_ar = bucket[0] / bucket[1]
    image_ar = image_size[0] / image_size[1]
    if bucket_ar > image_ar:
        rw, rh = bucket[1] * image_ar, float(bucket[1])
    else:
        rw, rh = float(bucket[0]), bucket[0] / image_ar
    left = (bucket[0] - rw) // 2
    top = (bucket[1] - rh) // 2
    return (int(left), int(top), int(left + rw), int(top + rh))
