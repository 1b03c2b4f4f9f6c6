"""Dataset command-line options (declared once, here).

Options that a dataset config can also set default to None, so the config's precedence
(subset -> dataset -> general -> command line -> built-in default) can tell "not given" apart;
the built-in defaults are applied in library/data/config.py and listed in the help texts.
"""

from __future__ import annotations

import argparse
import os


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("dataset")
    g.add_argument("--dataset_config", type=str, default=None,
                   help="dataset config file (.toml or .json); see docs/dataset_config.md")
    g.add_argument("--train_data_dir", type=str, default=None,
                   help="DreamBooth folder layout without a config: sub-folders named '<repeats>_<class tokens>'")
    g.add_argument("--reg_data_dir", type=str, default=None,
                   help="regularisation images in the same '<repeats>_<class tokens>' layout")
    g.add_argument("--resolution", type=str, default=None,
                   help="training resolution 'SIZE' or 'WIDTH,HEIGHT' (default: the model family's)")
    g.add_argument("--train_batch_size", type=int, default=None, help="batch size (default 1)")
    g.add_argument("--dataset_repeats", type=int, default=None, help="repeats of each image per epoch (default 1)")
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="loss weight of regularisation images")
    g.add_argument("--max_token_length", type=int, default=None, choices=[150, 225],
                   help="SD1/2 only: text length 150 or 225 tokens (default 75)")

    b = parser.add_argument_group("dataset: buckets and resizing")
    b.add_argument("--enable_bucket", action="store_true", default=None, help="aspect-ratio bucketing")
    b.add_argument("--min_bucket_reso", type=int, default=None, help="smallest bucket side (default 256)")
    b.add_argument("--max_bucket_reso", type=int, default=None, help="largest bucket side (default 1024)")
    b.add_argument("--bucket_reso_steps", type=int, default=None,
                   help="bucket sides are multiples of this (default 64; must suit the model family)")
    b.add_argument("--bucket_no_upscale", action="store_true", default=None,
                   help="never enlarge images; make buckets from the image sizes")
    b.add_argument("--resize_interpolation", type=str, default=None,
                   choices=["lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box"],
                   help="resize filter (default: area when shrinking, lanczos when enlarging)")

    c = parser.add_argument_group("dataset: captions")
    c.add_argument("--caption_extension", type=str, default=None, help="caption file extension (default .caption)")
    c.add_argument("--caption_separator", type=str, default=None, help="tag separator (default ',')")
    c.add_argument("--shuffle_caption", action="store_true", default=None, help="shuffle tags each time")
    c.add_argument("--keep_tokens", type=int, default=None, help="the first N tags are never shuffled or dropped")
    c.add_argument("--keep_tokens_separator", type=str, default=None,
                   help="separator ending the fixed part of a caption (e.g. '|||'); a second one starts a fixed suffix")
    c.add_argument("--secondary_separator", type=str, default=None,
                   help="joins tags shuffled/dropped as one; replaced by the tag separator at the end")
    c.add_argument("--enable_wildcard", action="store_true", default=None,
                   help="{a|b|c} choices and multi-line captions (one random line)")
    c.add_argument("--caption_prefix", type=str, default=None, help="text put before every caption")
    c.add_argument("--caption_suffix", type=str, default=None, help="text put after every caption")
    c.add_argument("--caption_dropout_rate", type=float, default=None,
                   help="probability that a caption becomes empty (default 0)")
    c.add_argument("--caption_dropout_every_n_epochs", type=int, default=None,
                   help="drop all captions on epochs divisible by N (default 0 = never)")
    c.add_argument("--caption_tag_dropout_rate", type=float, default=None,
                   help="probability that each tag is dropped (default 0)")
    c.add_argument("--token_warmup_min", type=int, default=None,
                   help="tags used at the start of the warm-up (default 1)")
    c.add_argument("--token_warmup_step", type=float, default=None,
                   help="steps until all tags are used; < 1 means a fraction of max_train_steps (default 0 = off)")
    c.add_argument("--cache_info", action="store_true", default=None,
                   help="read/write <image_dir>/metadata_cache.json with sizes and captions (faster start)")

    a = parser.add_argument_group("dataset: augmentation and masks")
    a.add_argument("--color_aug", action="store_true", default=None, help="weak hue/gamma augmentation")
    a.add_argument("--flip_aug", action="store_true", default=None, help="horizontal flip with p=0.5")
    a.add_argument("--random_crop", action="store_true", default=None,
                   help="crop the overflow at a random offset instead of the centre")
    a.add_argument("--face_crop_aug_range", type=str, default=None,
                   help="face-centred crop augmentation 'LO,HI' (not supported yet: refused)")
    a.add_argument("--alpha_mask", action="store_true", default=None,
                   help="use the images' alpha channel as the loss mask")

    v = parser.add_argument_group("dataset: validation")
    v.add_argument("--validation_split", type=float, default=None,
                   help="fraction of each subset held out for validation loss (default 0)")
    v.add_argument("--validation_seed", type=int, default=None,
                   help="seed of the validation split (default: --seed)")

    k = parser.add_argument_group("dataset: caching and loading")
    k.add_argument("--cache_latents", action="store_true", default=None,
                   help="encode images once and keep the latents in memory (refused with random_crop/color_aug)")
    k.add_argument("--cache_latents_to_disk", action="store_true", default=None,
                   help="cache latents in files next to the images and reuse them in later runs")
    k.add_argument("--cache_text_encoder_outputs", action="store_true", default=None,
                   help="encode captions once and keep the outputs in memory (refused with shuffle_caption, "
                        "token warm-up, tag dropout or varying wildcards; caption dropout is fine)")
    k.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true", default=None,
                   help="cache text-encoder outputs in files next to the images")
    k.add_argument("--skip_cache_check", action="store_true", default=None,
                   help="trust existing cache files without checking the source images or file integrity")
    k.add_argument("--max_data_loader_n_workers", type=int, default=None,
                   help="data-loader worker processes (capped at the CPU count; 0 loads in the main process). "
                        "Default: none when the latents are cached (batches are then cheaper to build in the "
                        "main process than to pass from workers), else 8 as in sd-scripts")
    k.add_argument("--persistent_data_loader_workers", action="store_true", default=None,
                   help="keep data-loader workers alive between epochs (faster epoch starts, more memory)")

    r = parser.add_argument_group("dataset: inspection")
    r.add_argument("--dataset_report", action="store_true", default=None,
                   help="print the dataset report (buckets, repeats, captions, skipped images) and exit")
    r.add_argument("--debug_dataset", action="store_true", default=None,
                   help="print the first batches with their processed captions and exit")


def data_loader_workers(args: argparse.Namespace) -> int:
    """min(CPU count, --max_data_loader_n_workers); when not given, 0 with cached latents, else 8.

    With the latents cached a batch is a few tensor reads: building it in the main process
    measured 2-7x faster than passing it from workers (docs/benchmarks.md, data pipeline), and
    the workers' start at every epoch (seconds, without --persistent_data_loader_workers) is gone.
    """
    n = getattr(args, "max_data_loader_n_workers", None)
    if n is None:
        cached = getattr(args, "cache_latents", False) or getattr(args, "cache_latents_to_disk", False)
        n = 0 if cached else 8
    return max(0, min(os.cpu_count() or 1, n))
