"""The latent store on a tiny real VAE: reused by a second open, refused when the VAE or the image list changes,
a SIGKILL mid-build then a rerun, two gloo ranks under torchrun sharing one store."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from diffcxr_aug.data.dataset import equalize
from diffcxr_aug.data.manifest import read_manifest, write_manifest
from diffcxr_aug.errors import MissingInputError
from diffcxr_aug.generator.latent_store import fingerprint_vae, open_latent_store
from diffcxr_aug.generator.vae import build_vae, encode_manifest, load_vae
from tests.conftest import REPO_ROOT, make_tiny_manifest

pytestmark = pytest.mark.usefixtures("one_thread")

# Run by the SIGKILL and torchrun tests: open the store of argv[1]'s manifest with the VAE folder argv[2] (settings
# as JSON in argv[3]) and write what this process encoded to argv[4]/rank<R>.json.
ENCODE_SCRIPT = """
import json, logging, os, sys, time
import torch
from diffcxr_aug.data.manifest import read_manifest
from diffcxr_aug.generator.latent_store import open_latent_store
from diffcxr_aug.generator.vae import load_vae

logging.basicConfig(level=logging.INFO)
torch.set_num_threads(1)
manifest, vae_dir, settings, out = sys.argv[1:5]
settings = json.loads(settings)
vae = load_vae(vae_dir)
pause = settings.pop("pause", 0.0)
if pause:  # a slower encoder (the same weights, the same latents), so that a kill lands mid-build
    vae.encoder.register_forward_hook(lambda *args: time.sleep(pause))
store = open_latent_store(read_manifest(manifest).full, vae, device="cpu", progress=False, **settings)
rank = int(os.environ.get("RANK", "0"))
record = {"rank": rank, "encoded": store.encoded, "reused": store.reused, "path": str(store.path)}
open(os.path.join(out, f"rank{rank}.json"), "w").write(json.dumps(record))
"""


def _vae(seed: int = 0):
    torch.manual_seed(seed)
    return build_vae("tiny", sample_size=32).eval()


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def test_a_second_open_encodes_nothing_and_gives_the_same_array(tiny_manifest, caplog):
    manifest = read_manifest(tiny_manifest)
    vae = _vae()
    store = open_latent_store(manifest, vae, 16, batch_size=4, chunk_size=8, device="cpu", progress=False)
    assert (store.encoded, store.reused) == (len(manifest), 0)
    assert store.array.shape == (len(manifest), 4, 8, 8) and not store.array.flags.writeable
    assert store.path.parent == manifest.root / "cache" and store.path.name.startswith("latents_16_")
    assert json.loads(store.path.with_suffix(".json").read_text())["fingerprint"] == store.fingerprint
    assert not list(store.path.parent.glob("*.partial.*"))
    # The same latents as encoding the manifest in memory, batch for batch.
    direct = encode_manifest(vae, manifest, 16, batch_size=4, device="cpu", progress=False)
    torch.testing.assert_close(torch.from_numpy(np.array(store.array)), direct, rtol=0, atol=0)
    torch.testing.assert_close(store.batch([3, 1]), direct[[3, 1]], rtol=0, atol=0)

    mtime = store.path.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="diffcxr_aug.generator.latent_store"):
        again = open_latent_store(manifest, _vae(), 16, batch_size=4, chunk_size=8, device="cpu", progress=False)
    assert again.encoded == 0 and again.path == store.path and store.path.stat().st_mtime_ns == mtime
    assert f"latent store {store.path}: encoded 0 of 24 images (24 reused)" in caplog.text
    np.testing.assert_array_equal(again.array, store.array)
    # Another batch size reads the same store: it changes how, not what, is encoded.
    assert open_latent_store(manifest, vae, 16, batch_size=8, build=False, device="cpu").encoded == 0

    equalized = open_latent_store(manifest, vae, 16, transform="equalize", batch_size=4, device="cpu", progress=False)
    assert equalized.encoded == len(manifest) and equalized.path != store.path
    direct = encode_manifest(vae, manifest, 16, batch_size=4, device="cpu", progress=False, transform=equalize)
    torch.testing.assert_close(torch.from_numpy(np.array(equalized.array)), direct, rtol=0, atol=0)


def test_a_changed_vae_or_image_list_is_refused_and_encoded_again(tiny_manifest, tmp_path):
    manifest = read_manifest(tiny_manifest)
    vae = _vae()
    store = open_latent_store(manifest, vae, 16, batch_size=4, device="cpu", progress=False)
    # The fingerprint is the weights', not the object's: saved and loaded again, the VAE reads the same store.
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    assert fingerprint_vae(load_vae(tmp_path / "vae")) == fingerprint_vae(vae)
    assert open_latent_store(manifest, load_vae(tmp_path / "vae"), 16, build=False, device="cpu").encoded == 0

    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(1.0)  # the decoder: even a change the latents do not show is a new VAE
    with pytest.raises(MissingInputError, match=r"manifest.csv: no latent store for this VAE.*build=True"):
        open_latent_store(manifest, vae, 16, build=False, device="cpu")
    rebuilt = open_latent_store(manifest, vae, 16, batch_size=4, device="cpu", progress=False)
    assert rebuilt.encoded == len(manifest) and rebuilt.path != store.path

    vae.register_to_config(scaling_factor=0.5)  # the config too: the scaled latents change
    halved = open_latent_store(manifest, vae, 16, batch_size=4, device="cpu", progress=False)
    assert halved.encoded == len(manifest) and halved.path not in (store.path, rebuilt.path)
    np.testing.assert_allclose(halved.array, 0.5 * np.asarray(rebuilt.array), rtol=1e-6)

    # The same folder's manifest rewritten with its rows reversed: another image list, another store.
    write_manifest(manifest.frame.iloc[::-1], manifest.root)
    reversed_rows = read_manifest(manifest.root)
    vae = _vae()
    flipped = open_latent_store(reversed_rows, vae, 16, batch_size=4, device="cpu", progress=False)
    assert flipped.encoded == len(manifest) and flipped.path != store.path
    torch.testing.assert_close(torch.from_numpy(flipped.array[::-1].copy()), store.batch(range(24)), rtol=0, atol=0)


def test_chunks_must_hold_whole_batches(tiny_manifest):
    with pytest.raises(ValueError, match=r"chunk_size \(6\) must be a positive multiple of batch_size \(4\)"):
        open_latent_store(read_manifest(tiny_manifest), _vae(), 16, batch_size=4, chunk_size=6, device="cpu")
    with pytest.raises(ValueError, match="Unsupported transform 'clahe'; choose none or equalize"):
        open_latent_store(read_manifest(tiny_manifest), _vae(), 16, transform="clahe", device="cpu")


@pytest.mark.integration
def test_a_sigkill_mid_build_then_a_rerun_gives_the_same_array(tmp_path):
    """The build in a subprocess, killed with SIGKILL once some chunks are recorded; the rerun encodes only the
    chunks the map does not record, and the array equals an uninterrupted build's."""
    manifest = read_manifest(make_tiny_manifest(tmp_path / "data", n=48))
    vae = _vae()
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    settings = {"size": 32, "batch_size": 2, "chunk_size": 2, "pause": 0.05}
    command = [sys.executable, "-c", ENCODE_SCRIPT, str(manifest.source), str(tmp_path / "vae"), json.dumps(settings)]
    process = subprocess.Popen([*command, str(tmp_path)], env=_env(), cwd=REPO_ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    done_map: list[Path] = []
    while process.poll() is None and time.monotonic() < deadline:
        done_map = list((manifest.root / "cache").glob("latents_*.partial.done"))
        if done_map and sum(done_map[0].read_bytes()) >= 5:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    finished = sum(done_map[0].read_bytes())
    assert 5 <= finished < 24, "the kill came after the build had finished"

    settings.pop("pause")
    rerun = open_latent_store(manifest, load_vae(tmp_path / "vae"), device="cpu", progress=False, **settings)
    assert (rerun.encoded, rerun.reused) == (48 - 2 * finished, 2 * finished)
    uninterrupted = encode_manifest(vae, manifest, 32, batch_size=2, device="cpu", progress=False)
    torch.testing.assert_close(torch.from_numpy(np.array(rerun.array)), uninterrupted, rtol=0, atol=0)


@pytest.mark.integration
def test_two_gloo_ranks_under_torchrun_share_one_store(tmp_path):
    manifest = read_manifest(make_tiny_manifest(tmp_path / "data", n=40))
    vae = _vae()
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    settings = {"size": 16, "batch_size": 4, "chunk_size": 4}
    script = tmp_path / "encode.py"
    script.write_text(ENCODE_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    command += [str(manifest.source), str(tmp_path / "vae"), json.dumps(settings), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=_env(), cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["path"] == ranks[1]["path"]
    assert [r["encoded"] for r in ranks] == [20, 20]  # ten chunks of four, dealt out in turn
    assert "encoded 20 of 40 images (0 reused) on rank 1 of 2" in result.stderr

    store = open_latent_store(manifest, vae, device="cpu", progress=False, **settings)
    assert store.encoded == 0 and str(store.path) == ranks[0]["path"]
    direct = encode_manifest(vae, manifest, 16, batch_size=4, device="cpu", progress=False)
    torch.testing.assert_close(torch.from_numpy(np.array(store.array)), direct, rtol=0, atol=0)
