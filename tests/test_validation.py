"""Validation schedule, fixed noise and the gallery's validation points (unit level; the
end-to-end behaviour is in test_flux_train_shared_features_e2e.py)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from library.errors import ConfigError
from library.training import validation as v
from library.training.sample_gallery import write_gallery


def ns(**kw) -> argparse.Namespace:
    base = dict(validate_every_n_steps=None, validate_every_n_epochs=None, max_validation_steps=None)
    return argparse.Namespace(**{**base, **kw})


def test_schedule():
    assert [e for e in range(1, 7) if v.should_validate_at_epoch(ns(), e)] == [1, 2, 3, 4, 5, 6]
    assert [e for e in range(1, 7) if v.should_validate_at_epoch(ns(validate_every_n_epochs=3), e)] == [3, 6]
    assert not any(v.should_validate_at_step(ns(), s) for s in range(1, 10))
    assert [s for s in range(1, 10) if v.should_validate_at_step(ns(validate_every_n_steps=4), s)] == [4, 8]


def test_noise_is_fixed_per_batch_and_independent_of_global_rng():
    like = torch.zeros(2, 16, 8, 8)
    torch.manual_seed(1)
    a = v.validation_noise(like, seed=7, batch_index=0)
    torch.manual_seed(2)
    assert torch.equal(a, v.validation_noise(like, seed=7, batch_index=0))
    assert not torch.equal(a, v.validation_noise(like, seed=7, batch_index=1))
    assert not torch.equal(a, v.validation_noise(like, seed=8, batch_index=0))


def test_flags_need_a_validation_set_and_positive_values():
    v.check_validation_args(ns(validate_every_n_steps=5), has_validation_set=True)
    with pytest.raises(ConfigError, match="there is no validation set: add validation_split"):
        v.check_validation_args(ns(max_validation_steps=2), has_validation_set=False)
    with pytest.raises(ConfigError, match="--validate_every_n_epochs must be at least 1"):
        v.check_validation_args(ns(validate_every_n_epochs=0), has_validation_set=True)


def test_gallery_draws_validation_points(tmp_path):
    metrics = tmp_path / "log.jsonl"
    lines = [{"step": s, "loss": 1.0 / s} for s in range(1, 11)] + [{"step": 5, "val_loss": 0.4},
                                                                     {"step": 10, "val_loss": 0.3}]
    metrics.write_text("\n".join(json.dumps(x) for x in lines))
    page = write_gallery(tmp_path, "t", ["p"], [], metrics).read_text()
    assert page.count("<circle") == 2 and "validation" in page
