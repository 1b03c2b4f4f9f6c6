"""--max_data_loader_n_workers: sd-scripts' 8 unless the latents are cached, then the main process."""

from __future__ import annotations

import argparse
import os

from library.data import data_loader_workers


def ns(**kw):
    return argparse.Namespace(**{"max_data_loader_n_workers": None, "cache_latents": False,
                                 "cache_latents_to_disk": False, **kw})


def test_default_is_eight_capped_at_the_cpu_count_without_cached_latents():
    assert data_loader_workers(ns()) == min(8, os.cpu_count() or 1)


def test_default_is_the_main_process_with_cached_latents():
    assert data_loader_workers(ns(cache_latents=True)) == 0
    assert data_loader_workers(ns(cache_latents_to_disk=True)) == 0


def test_an_explicit_count_is_kept():
    assert data_loader_workers(ns(cache_latents=True, max_data_loader_n_workers=1)) == 1
    assert data_loader_workers(ns(max_data_loader_n_workers=0)) == 0
