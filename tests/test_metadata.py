import argparse
import base64
import datetime
import hashlib
import json
import os

import pytest

from library.errors import ConfigError
from library.training import metadata as md
from library.training.file_hashes import BackgroundFileHash, full_sha256, legacy_model_hash

COMMON_KEYS = """ss_session_id ss_training_started_at ss_output_name ss_learning_rate ss_text_encoder_lr ss_unet_lr
ss_num_train_images ss_num_validation_images ss_num_reg_images ss_num_batches_per_epoch ss_num_epochs
ss_gradient_checkpointing ss_gradient_accumulation_steps ss_max_train_steps ss_lr_warmup_steps ss_lr_scheduler
ss_network_module ss_network_dim ss_network_alpha ss_network_dropout ss_mixed_precision ss_full_fp16 ss_v2
ss_base_model_version ss_clip_skip ss_max_token_length ss_cache_latents ss_seed ss_lowram ss_noise_offset
ss_multires_noise_iterations ss_multires_noise_discount ss_adaptive_noise_scale ss_zero_terminal_snr
ss_training_comment ss_sd_scripts_commit_hash ss_optimizer ss_max_grad_norm ss_caption_dropout_rate
ss_caption_dropout_every_n_epochs ss_caption_tag_dropout_rate ss_face_crop_aug_range ss_prior_loss_weight
ss_min_snr_gamma ss_scale_weight_norms ss_ip_noise_gamma ss_debiased_estimation ss_noise_offset_random_strength
ss_ip_noise_gamma_random_strength ss_loss_type ss_huber_schedule ss_huber_scale ss_huber_c ss_fp8_base
ss_fp8_base_unet ss_validation_seed ss_validation_split ss_max_validation_steps ss_validate_every_n_epochs
ss_validate_every_n_steps ss_resize_interpolation""".split()


def _args(**overrides):
    values = dict(
        output_name="my_lora",
        learning_rate=1e-4,
        text_encoder_lr=[5e-5],
        unet_lr=None,
        gradient_checkpointing=True,
        gradient_accumulation_steps=1,
        max_train_steps=1600,
        lr_warmup_steps=0.1,
        lr_scheduler="cosine",
        mixed_precision="bf16",
        seed=42,
        loss_type="l2",
        pretrained_model_name_or_path="/secret/home/models/flux1-dev.safetensors",
        training_comment="hello",
        fp8_base=True,
    )
    values.update(overrides)
    return argparse.Namespace(**values)


def _build(args=None, **overrides):
    kwargs = dict(
        session_id=1234,
        training_started_at=1700000000.5,
        num_train_images=40,
        num_reg_images=0,
        num_validation_images=4,
        num_batches_per_epoch=40,
        num_epochs=40,
        optimizer_description="torch.optim.adamw.AdamW(weight_decay=0.01)",
        base_model_version="flux1",
        dataset_metadata={"ss_datasets": [{"batch_size_per_device": 1}], "ss_tag_frequency": {"img": {"cat": 3}}},
        network_module="networks.lora_flux",
        network_dim=16,
        network_alpha=8.0,
        network_args={"train_blocks": "single"},
        model_file_hashes={"ss_sd_model_hash": "abcd1234", "ss_new_sd_model_hash": "ff" * 32},
        family_metadata={"ss_guidance_scale": 1.0, "ss_model_type": "flux"},
    )
    kwargs.update(overrides)
    return md.training_metadata(args or _args(), **kwargs)


def test_every_common_key_is_present_and_every_value_is_a_string():
    meta = _build()
    assert set(COMMON_KEYS) <= set(meta)
    assert all(isinstance(v, str) for v in meta.values())


def test_values_are_str_of_the_python_value():
    meta = _build()
    assert meta["ss_gradient_checkpointing"] == "True" and meta["ss_full_fp16"] == "False"
    assert meta["ss_fp8_base"] == "True" and meta["ss_v2"] == "False"
    assert meta["ss_unet_lr"] == "None" and meta["ss_clip_skip"] == "None"
    assert meta["ss_learning_rate"] == "0.0001" and meta["ss_text_encoder_lr"] == "5e-05"
    assert meta["ss_lr_warmup_steps"] == "0.1" and meta["ss_session_id"] == "1234"
    assert meta["ss_training_started_at"] == "1700000000.5"
    assert meta["ss_network_alpha"] == "8.0" and meta["ss_network_dim"] == "16"
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.01)"
    assert meta["ss_base_model_version"] == "flux1" and meta["ss_training_comment"] == "hello"
    assert meta["ss_guidance_scale"] == "1.0" and meta["ss_model_type"] == "flux"


def test_dataset_network_args_model_name_and_hashes():
    meta = _build()
    assert json.loads(meta["ss_datasets"]) == [{"batch_size_per_device": 1}]
    assert json.loads(meta["ss_tag_frequency"]) == {"img": {"cat": 3}}
    assert json.loads(meta["ss_network_args"]) == {"train_blocks": "single"}
    assert meta["ss_sd_model_name"] == "flux1-dev.safetensors"
    assert not any("/secret" in value for value in meta.values())
    assert meta["ss_sd_model_hash"] == "abcd1234" and meta["ss_new_sd_model_hash"] == "ff" * 32
    bare = _build(network_args=None, model_file_hashes={})
    assert "ss_network_args" not in bare and "ss_sd_model_hash" not in bare


def test_save_time_and_minimal_metadata():
    meta = _build()
    saved = md.with_save_time(meta, steps=800, epoch=20, finished_at=1700003600.25)
    assert (saved["ss_steps"], saved["ss_epoch"], saved["ss_training_finished_at"]) == ("800", "20", "1700003600.25")
    assert "ss_steps" not in meta
    minimal = md.minimal_metadata(saved)
    assert set(minimal) == {"ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args"}


def test_metadata_arguments():
    parser = argparse.ArgumentParser()
    md.add_metadata_arguments(parser)
    args = parser.parse_args(["--no_metadata", "--metadata_author", "me", "--metadata_trigger_phrase", "zxc"])
    assert args.no_metadata and args.metadata_author == "me" and args.training_comment is None
    for name in ("title", "description", "license", "tags", "usage_hint", "thumbnail", "merged_from", "preprocessor", "is_negative_embedding"):
        assert getattr(args, f"metadata_{name}") is None


def test_modelspec_for_flux_has_no_prediction_type():
    ts = 1700000000.75
    spec = md.modelspec("flux-1-dev/lora", "https://github.com/black-forest-labs/flux", title="t", timestamp=ts, resolution="1024x1024")
    assert spec == {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "flux-1-dev/lora",
        "modelspec.implementation": "https://github.com/black-forest-labs/flux",
        "modelspec.title": "t",
        "modelspec.resolution": "1024x1024",
        "modelspec.date": datetime.datetime.fromtimestamp(1700000000).isoformat(),
    }


def test_modelspec_from_args(tmp_path):
    thumb = tmp_path / "thumb.png"
    thumb.write_bytes(b"\x89PNG fake")
    parser = argparse.ArgumentParser()
    md.add_metadata_arguments(parser)
    args = parser.parse_args(["--metadata_author", "me", "--metadata_tags", "a,b", "--metadata_thumbnail", str(thumb)])
    args.output_name, args.resolution, args.clip_skip, args.min_timestep = "my_lora", "768,512", 2, 100
    spec = md.modelspec_from_args(
        args, architecture="lumina-2/lora", implementation="https://github.com/Alpha-VLLM/Lumina-Image-2.0",
        timestamp=1.0, default_resolution=(1024, 1024), prediction_type="epsilon", implementation_version="x/abc",
    )  # fmt: skip
    assert spec["modelspec.title"] == "my_lora" and spec["modelspec.resolution"] == "768x512"
    assert spec["modelspec.author"] == "me" and spec["modelspec.tags"] == "a,b"
    assert spec["modelspec.prediction_type"] == "epsilon" and spec["modelspec.encoder_layer"] == "2"
    assert spec["modelspec.timestep_range"] == "100,1000" and spec["modelspec.implementation_version"] == "x/abc"
    assert spec["modelspec.thumbnail"] == "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()
    assert all(isinstance(v, str) for v in spec.values())
    untitled = md.modelspec_from_args(argparse.Namespace(), architecture="a", implementation="i", timestamp=12.5, default_resolution=(512, 512))
    assert untitled["modelspec.title"] == "LoRA@12.5" and untitled["modelspec.resolution"] == "512x512"


def test_missing_thumbnail_is_refused_early():
    with pytest.raises(ConfigError, match="not a file"):
        md.check_metadata_args(argparse.Namespace(metadata_thumbnail="/no/such.png"))
    md.check_metadata_args(argparse.Namespace(metadata_thumbnail="data:image/png;base64,AAAA"))


@pytest.mark.parametrize("value, expected", [(None, "1024x1024"), ("512", "512x512"), (768, "768x768"), ((640, 480), "640x480"), ("832x1216", "832x1216")])
def test_resolution_string(value, expected):
    assert md.resolution_string(value, (1024, 1024)) == expected
    assert md.resolution_string(value, 1024) == expected


# ---------------------------------------------------------------------------------------------- file hashes


def test_hashes_match_hashlib(tmp_path):
    data = os.urandom(0x100000 + 0x10000 + 12345)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    assert legacy_model_hash(str(path)) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert full_sha256(str(path)) == hashlib.sha256(data).hexdigest()
    result = BackgroundFileHash(path).result(timeout=30)
    assert result == {"ss_sd_model_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
                      "ss_new_sd_model_hash": hashlib.sha256(data).hexdigest()}  # fmt: skip
    vae = BackgroundFileHash(str(path), kind="vae").result()
    assert set(vae) == {"ss_vae_hash", "ss_new_vae_hash"}


def test_small_file_legacy_hash_is_of_empty_input(tmp_path):
    path = tmp_path / "small.bin"
    path.write_bytes(b"tiny")
    assert BackgroundFileHash(path).result()["ss_sd_model_hash"] == hashlib.sha256(b"").hexdigest()[:8]


def test_missing_file_folder_or_none_give_no_keys(tmp_path):
    assert BackgroundFileHash(tmp_path / "absent.safetensors").result() == {}
    assert BackgroundFileHash(tmp_path).result() == {}
    assert BackgroundFileHash(None).result() == {}


def test_cancelled_hash_gives_no_full_hash(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"x" * 10)
    hasher = BackgroundFileHash(None)  # no thread started: drive _run by hand
    hasher.path = str(path)
    hasher.cancel()
    hasher._run()
    assert hasher.result() == {}
