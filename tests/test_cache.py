from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from diffcxr_aug.data.cache import build_cache, cache_files, image_list_digest, open_cache
from diffcxr_aug.data.dataset import CXRDataset
from diffcxr_aug.data.images import load_image
from diffcxr_aug.data.manifest import read_manifest
from diffcxr_aug.errors import ImageReadError
from tests.conftest import write_film, xray_sources


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
    with pytest.raises(ImageReadError, match=r"manifest.csv, row 7: .*0005.png"):  # raised in a worker process
        open_cache(manifest, 16, progress=False, workers=2)


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
        cache.build_cache(manifest, 16, progress=False, flush_every=4, workers=1)
    array_path, _ = cache_files(manifest, 16)
    assert not array_path.exists()  # nothing half-built is ever taken for a cache
    calls.clear()
    monkeypatch.setattr(cache, "load_image", lambda path: calls.append(path) or real_load(path))
    images = open_cache(manifest, 16, progress=False, workers=1)
    assert len(calls) == len(manifest) - 8  # resumed after the last recorded flush
    fresh = manifest.root / "fresh"
    fresh.mkdir()
    (manifest.root / "cache").rename(fresh / "old-cache")
    np.testing.assert_array_equal(images, open_cache(manifest, 16, progress=False, workers=1))


# ------------------------------------------------------------------------------------------ several workers
def _film_manifest(folder: Path, n: int = 14) -> Path:
    """``n`` real chest films (the fixtures, varied) as JPEG and PNG of several non-square sizes: the cache crops,
    resizes and decodes both formats."""
    from diffcxr_aug.data.manifest import write_manifest

    sources = xray_sources()
    rows = []
    for i in range(n):
        name = f"images/{i:03d}.{'jpg' if i % 3 else 'png'}"
        write_film(sources[i % len(sources)], folder / name, variant=i, side=96 + 16 * (i % 4))
        split = ("train", "train", "val", "test")[i % 4]
        rows.append({"image_path": name, "patient_id": f"p{i}", "study_id": f"s{i}", "view": "PA", "split": split})
        rows[-1].update({"report": "", "Cardiomegaly": ""})
    return write_manifest(pd.DataFrame(rows), folder)


def test_two_workers_write_the_one_process_cache_byte_for_byte(tmp_path):
    manifest = read_manifest(_film_manifest(tmp_path / "films"))
    array_path, index_path = cache_files(manifest, 64)
    single = open_cache(manifest, 64, progress=False, workers=1)
    assert single.shape == (len(manifest), 64, 64) and single.std() > 10
    reference = array_path.read_bytes()
    array_path.unlink()
    index_path.unlink()
    # Tasks of two rows (flush_every 3, at least four tasks a worker) spread over both workers.
    build_cache(manifest, 64, progress=False, flush_every=3, workers=2)
    assert array_path.read_bytes() == reference
    assert not list(array_path.parent.glob("*.partial.*"))


def test_a_parallel_build_resumes_after_the_recorded_rows(tmp_path):
    """A build killed after recording 5 rows: the rerun (2 workers) decodes only the rows after them."""
    manifest = read_manifest(_film_manifest(tmp_path / "films", n=11))
    reference = np.array(open_cache(manifest, 32, progress=False, workers=1))
    array_path, index_path = cache_files(manifest, 32)
    array_path.unlink()
    index_path.unlink()
    # What a killed build leaves: a partial array (rows past the record half written) and its progress record.
    partial = np.lib.format.open_memmap(array_path.with_suffix(".partial.npy"), "w+", np.uint8, reference.shape)
    partial[:5] = 7  # not what decoding gives: shows that the recorded rows are kept, not decoded again
    partial[5:] = 255
    partial.flush()
    del partial
    record = {"digest": image_list_digest(manifest), "size": 32, "done": 5}
    array_path.with_suffix(".partial.json").write_text(json.dumps(record))
    resumed = open_cache(manifest, 32, progress=False, workers=2)
    assert (resumed[:5] == 7).all()
    np.testing.assert_array_equal(resumed[5:], reference[5:])
