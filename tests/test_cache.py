from __future__ import annotations

import numpy as np
import pytest
import torch

from diffcxr_aug.data.cache import cache_files, open_cache
from diffcxr_aug.data.dataset import CXRDataset
from diffcxr_aug.data.images import load_image
from diffcxr_aug.errors import ImageReadError
from diffcxr_aug.data.manifest import read_manifest


def test_cache_built_once_and_reused(tiny_manifest):
    manifest = read_manifest(tiny_manifest)
    images = open_cache(manifest, 16, progress=False)
    assert images.shape == (len(manifest), 16, 16) and images.dtype == np.uint8
    array_path, _ = cache_files(manifest, 16)
    mtime = array_path.stat().st_mtime_ns
    again = open_cache(manifest, 16, progress=False)
    assert array_path.stat().st_mtime_ns == mtime  # not rebuilt
    np.testing.assert_array_equal(images, again)
    # The cache holds what decoding the file gives (up to resampling at the same size: none here).
    direct = np.round(load_image(manifest.image_paths()[3]) * 255).astype(np.uint8)
    full = open_cache(manifest, 32, progress=False)
    np.testing.assert_array_equal(full[3], direct)


def test_split_dataset_reads_its_own_rows(tiny_manifest):
    manifest = read_manifest(tiny_manifest)
    test = manifest.split("test")
    dataset = CXRDataset(test, 32, progress=False)
    full = CXRDataset(manifest, 32, progress=False)
    assert len(dataset) == len(test) > 0
    sample = dataset[1]
    assert set(sample) == {"image", "labels", "report", "index"}
    row = int(test.frame.index[1])
    torch.testing.assert_close(sample["image"], full[row]["image"])
    assert sample["report"] == manifest.frame["report"][row]
    assert sample["image"].shape == (1, 32, 32) and 0.0 <= float(sample["image"].min())
    labels = sample["labels"]
    assert torch.isnan(labels).sum() == len(manifest.label_names) - 2  # only two labels are known


def test_unreadable_image_named_with_row(tiny_manifest):
    manifest = read_manifest(tiny_manifest)
    broken = manifest.image_paths()[5]
    broken.write_bytes(broken.read_bytes()[:40])  # truncated PNG
    with pytest.raises(ImageReadError, match=r"manifest.csv, row 7: .*0005.png"):
        open_cache(manifest, 16, progress=False)


def test_interrupted_cache_build_resumes(tiny_manifest, monkeypatch):
    import diffcxr_aug.data.cache as cache

    manifest = read_manifest(tiny_manifest)
    calls = []
    real_load = cache.load_image

    def load_then_interrupt(path):
        calls.append(path)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real_load(path)

    monkeypatch.setattr(cache, "load_image", load_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        cache.build_cache(manifest, 16, progress=False, flush_every=4)
    array_path, _ = cache_files(manifest, 16)
    assert not array_path.exists()  # nothing half-built is ever taken for a cache
    calls.clear()
    monkeypatch.setattr(cache, "load_image", lambda path: calls.append(path) or real_load(path))
    images = open_cache(manifest, 16, progress=False)
    assert len(calls) == len(manifest) - 8  # resumed after the last recorded flush
    fresh = manifest.root / "fresh"
    fresh.mkdir()
    (manifest.root / "cache").rename(fresh / "old-cache")
    np.testing.assert_array_equal(images, open_cache(manifest, 16, progress=False))
