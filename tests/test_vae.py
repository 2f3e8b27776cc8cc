from __future__ import annotations

import json
import math

import pytest
import torch

from diffcxr_aug.data.manifest import read_manifest
from diffcxr_aug.errors import InputError
from diffcxr_aug.generator.vae import (
    build_vae,
    decode,
    encode,
    encode_manifest,
    latent_shape,
    load_vae,
    one_cycle_schedule,
    random_crops,
    train_vae,
)


def test_build_rejects_unknown_config():
    with pytest.raises(ValueError, match="Unknown VAE config 'kl-f16'.*tiny"):
        build_vae("kl-f16")


def test_encode_decode_shapes_and_three_channel_vae():
    torch.manual_seed(0)
    vae = build_vae("tiny", sample_size=32).eval()
    images = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        latents = encode(vae, images)
        assert latents.shape == (2, *latent_shape(vae, 32)) == (2, 4, 16, 16)
        out = decode(vae, latents)
    assert out.shape == images.shape and 0.0 <= out.min() and out.max() <= 1.0
    # An SD-style VAE takes 3 channels: the grey channel is repeated and the output averaged back.
    vae3 = build_vae("tiny", sample_size=32)
    vae3 = type(vae3)(**{**vae3.config, "in_channels": 3, "out_channels": 3}).eval()
    with torch.no_grad():
        assert decode(vae3, encode(vae3, images)).shape == images.shape
    with pytest.raises(ValueError, match="not divisible"):
        latent_shape(vae, 33)


def test_train_save_load_round_trip(tiny_manifest, tmp_path):
    manifest = read_manifest(tiny_manifest)
    vae, metrics = train_vae(manifest, tmp_path / "vae", config="tiny", size=32, steps=3, batch_size=8, progress=False)
    assert set(metrics) >= {"psnr", "ssim", "latent_std"}
    assert json.loads((tmp_path / "vae" / "metrics.json").read_text())["steps"] == 3
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_vae(tmp_path / "vae")
    assert loaded.config.scaling_factor == pytest.approx(vae.config.scaling_factor)
    latents = encode_manifest(loaded, manifest, 32, batch_size=8, progress=False)
    assert latents.shape == (len(manifest), 4, 16, 16)
    # Scaled latents have roughly unit spread (the scaling factor was measured on the train split).
    assert 0.3 < float(latents.std()) < 3.0
    with torch.no_grad():
        again = encode_manifest(vae.cpu(), manifest, 32, batch_size=8, progress=False)
    torch.testing.assert_close(latents, again)


def test_load_missing_vae_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="Cannot load a VAE"):
        load_vae(tmp_path / "nowhere")


def test_random_crops_come_from_each_image_and_follow_the_generator():
    images = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    crops = random_crops(images, 4, torch.Generator().manual_seed(0))
    assert crops.shape == (2, 1, 4, 4)
    for image, crop in zip(images, crops, strict=True):
        # Each crop is a contiguous 4 x 4 window of its own image.
        top, left = divmod(int(crop[0, 0, 0] - image[0, 0, 0]), 8)
        torch.testing.assert_close(crop, image[:, top : top + 4, left : left + 4])
    torch.testing.assert_close(crops, random_crops(images, 4, torch.Generator().manual_seed(0)))


def test_crop_training_encodes_whole_images_and_checks_the_crop(tiny_manifest, tmp_path):
    manifest = read_manifest(tiny_manifest)
    vae, metrics = train_vae(
        manifest, tmp_path / "vae", config="tiny", size=32, steps=2, batch_size=4, crop_size=16, progress=False
    )
    assert metrics["crop_size"] == 16 and metrics["images"] > 0
    assert encode_manifest(vae, manifest, 32, batch_size=8, progress=False).shape == (len(manifest), 4, 16, 16)
    with pytest.raises(ValueError, match="crop_size 15 must be a multiple of the VAE's downsampling factor 2"):
        train_vae(manifest, tmp_path / "bad", config="tiny", size=32, steps=1, crop_size=15, progress=False)
    assert not (tmp_path / "bad").exists()


def test_a_finished_vae_with_the_same_settings_is_loaded_not_trained_again(tiny_manifest, tmp_path):
    manifest = read_manifest(tiny_manifest)
    kwargs = {"config": "tiny", "size": 32, "steps": 2, "batch_size": 8, "progress": False, "mixed_precision": "no"}
    vae, metrics = train_vae(manifest, tmp_path / "vae", **kwargs)
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again, metrics_again = train_vae(manifest, tmp_path / "vae", **kwargs)
    assert weights.stat().st_mtime_ns == stamp and metrics_again == metrics
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), again.state_dict().values(), strict=True))
    # Other settings (here the number of steps) train it again.
    _, changed = train_vae(manifest, tmp_path / "vae", **(kwargs | {"steps": 3}))
    assert changed["steps"] == 3 and weights.stat().st_mtime_ns != stamp


def test_bf16_autocast_training_is_recorded_and_keeps_fp32_weights(tiny_manifest, tmp_path):
    manifest = read_manifest(tiny_manifest)
    vae, metrics = train_vae(
        manifest,
        tmp_path / "vae",
        config="tiny",
        size=32,
        steps=2,
        batch_size=8,
        progress=False,
        mixed_precision="bf16",
    )
    assert metrics["mixed_precision"] == "bf16" and math.isfinite(metrics["psnr"])
    assert all(p.dtype == torch.float32 for p in vae.parameters())
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        train_vae(manifest, tmp_path / "fp16", config="tiny", size=32, steps=1, mixed_precision="fp16", device="cpu")


def _learning_rates(make_scheduler, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = make_scheduler(optimizer, steps)
    rates = []
    for _ in range(steps):  # the rate each training step uses
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_one_cycle_schedule_is_defined_for_every_step_count_and_otherwise_torchs():
    """20 steps (5% warm-up = one step) made torch's OneCycleLR divide by zero; every other count is untouched."""
    torch_one_cycle = lambda opt, n: torch.optim.lr_scheduler.OneCycleLR(  # noqa: E731
        opt, max_lr=1e-3, total_steps=n, pct_start=0.05
    )
    with pytest.raises(ZeroDivisionError):
        _learning_rates(torch_one_cycle, 20)
    ours = lambda opt, n: one_cycle_schedule(opt, 1e-3, n)  # noqa: E731
    for steps in (1, 2, 19, 21, 40):
        assert _learning_rates(ours, steps) == _learning_rates(torch_one_cycle, steps)
    rates = _learning_rates(ours, 20)
    assert all(0.0 <= r <= 1e-3 for r in rates) and rates == sorted(rates, reverse=True)  # no warm-up, as below 20
    with pytest.raises(InputError, match="at least 1 training step"):
        _learning_rates(ours, 0)


def test_the_image_side_must_fit_the_factor(tiny_manifest, tmp_path):
    manifest = read_manifest(tiny_manifest)  # (20 VAE steps train: tests/test_noise_filter.py, through the CLI)
    with pytest.raises(InputError, match="image size 33 is not divisible by the VAE's downsampling factor 2"):
        train_vae(manifest, tmp_path / "bad", config="tiny", size=33, steps=1, progress=False)
