"""Bucket grid and assignment against hand-computed cases (FORMATS 5.3)."""

from __future__ import annotations

from library.data.buckets import BucketPlanner, center_crop_offsets, crop_ltrb, make_bucket_resolutions


def test_grid_1024_with_max_1024_keeps_one_side_at_1024():
    # A = 1024*1024; for every w in 256..1024 step 64, h = min(1024, floor((A // w) / 64) * 64) = 1024
    sides = list(range(256, 1025, 64))
    expected = sorted({(w, 1024) for w in sides} | {(1024, w) for w in sides})
    assert make_bucket_resolutions((1024, 1024), 256, 1024, 64) == expected
    assert len(expected) == 25


def test_grid_512_hand_computed():
    # A = 262144: w=320 -> 819//64*64 = 768; w=384 -> 640; w=448 -> 576; w=576 -> 448; w=704 -> 320;
    # w=832..1024 -> 256; w=256 -> 1024.
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == [
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
        (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
    ]


def test_1000x600_at_1024():
    p = BucketPlanner((1024, 1024), enable_bucket=True, min_size=256, max_size=1024, step=64)
    a = p.assign(1000, 600)
    # ratio 1.667: 1024x640 (1.6) beats 1024x576 (1.778); 1.6 < 1.667 so the height fits:
    # scale 640/600 -> (int(1066.67 + 0.5), 640)
    assert a.bucket == (1024, 640) and a.resized == (1067, 640)
    assert abs(a.ar_error - (1.6 - 1000 / 600)) < 1e-12
    assert center_crop_offsets(a.resized, a.bucket) == (21, 0)


def test_exact_bucket_size_is_used_as_is_and_width_fit():
    p = BucketPlanner((512, 512), enable_bucket=True, min_size=256, max_size=1024, step=64)
    a = p.assign(640, 384)
    assert (a.bucket, a.resized, a.ar_error) == ((640, 384), (640, 384), 0.0)
    b = p.assign(1000, 600)  # same ratio as 640x384: the width fits, scale 0.64
    assert (b.bucket, b.resized) == ((640, 384), (640, 384))
    # ratio 0.4286: 320x768 (0.4167, err .012) beats 320x704 (0.4545, err .026); the image is wider
    # than the bucket so the height fits: scale 768/700 -> (int(329.14 + 0.5), 768)
    c = p.assign(300, 700)
    assert c.bucket == (320, 768) and c.resized == (329, 768)


def test_ties_take_the_first_bucket():
    # 864/1024 = 0.84375 is exactly halfway between 832x1024 (0.8125) and 896x1024 (0.875)
    p = BucketPlanner((1024, 1024), enable_bucket=True, min_size=256, max_size=1024, step=64)
    a = p.assign(864, 1024)
    assert a.bucket == (832, 1024) and a.resized == (864, 1024)


def test_no_upscale_large_image():
    p = BucketPlanner((512, 512), enable_bucket=True, step=64, no_upscale=True)
    # 1000x700: rw = sqrt(262144*1.4286) = 611.96 -> 576; 576/1.4286 = 403.2 -> 384: ratio 1.5 (err .071)
    # rh = 428.37 -> 384; 384*1.4286 = 548.6 -> 512: ratio 1.333 (err .095) -> width candidate wins
    a = p.assign(1000, 700)
    assert a.resized == (576, 403) and a.bucket == (576, 384)
    # 1000x600: both candidates give 640x384 exactly; the tie takes the height branch
    b = p.assign(1000, 600)
    assert b.resized == (640, 384) and b.bucket == (640, 384)


def test_no_upscale_small_image_is_never_enlarged():
    p = BucketPlanner((512, 512), enable_bucket=True, step=64, no_upscale=True)
    a = p.assign(300, 200)
    assert a.resized == (300, 200) and a.bucket == (256, 192)
    tiny = p.assign(50, 40)
    assert tiny.bucket == (0, 0)  # the dataset skips such images with a reason


def test_bucketing_off_single_bucket_cover_and_crop():
    p = BucketPlanner((512, 768), enable_bucket=False)
    assert p.predefined == [(512, 768)]
    a = p.assign(1024, 1024)  # cover 512x768: scale 768/1024 -> 768x768, crop the width
    assert a.bucket == (512, 768) and a.resized == (768, 768)


def test_crop_ltrb_is_the_fitted_box():
    # fitted height 1024 / (1000/600) = 614.4; top = (640 - 614.4) // 2 = 12; bottom = int(12 + 614.4)
    assert crop_ltrb((1024, 640), (1000, 600)) == (0, 12, 1024, 626)
    assert crop_ltrb((512, 512), (512, 512)) == (0, 0, 512, 512)
    assert crop_ltrb((640, 384), (300, 300)) == (128, 0, 512, 384)
