"""A frozen encoder's token states in a memory-mapped store on disk (for corpora whose states do not fit in memory):
equal to the in-memory cache, reused by a second open, refused when the encoder or the truncation changes, shared by
two gloo ranks under torchrun, and read by a training run (bit for bit the in-memory run's weights)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffcxr_aug.generator import training_run
from diffcxr_aug.generator.batches import TextStates, open_text_states
from diffcxr_aug.generator.checkpoints import CHECKPOINT_WEIGHTS
from diffcxr_aug.generator.settings import GeneratorSettings
from diffcxr_aug.generator.text_encoder import load_text_encoder
from diffcxr_aug.generator.training import train_generator
from tests.conftest import REPO_ROOT, make_tiny_manifest

pytestmark = pytest.mark.usefixtures("one_thread")

SCRATCH = {
    "vocab_size": 200,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
}
WORDS = ("heart", "lungs", "clear", "effusion", "small", "left", "right", "no", "pneumothorax", "enlarged")


def _texts(n: int = 150) -> list[str]:
    """``n`` distinct reports of varied lengths (and one repeated, which is cached once)."""
    rng = np.random.default_rng(0)
    texts = [f"{i}. " + " ".join(rng.choice(WORDS, int(rng.integers(1, 30)))) for i in range(n)]
    return [*texts, texts[0]]


def _bundle(texts: list[str], seed: int = 0):
    return load_text_encoder("scratch", 32, reports=texts, scratch_config=SCRATCH, seed=seed)


def test_the_store_equals_the_in_memory_states_and_a_second_open_encodes_nothing(tmp_path, caplog):
    texts = _texts()
    bundle = _bundle(texts)
    cpu = torch.device("cpu")
    store = open_text_states(bundle, texts, 24, tmp_path, cpu, progress=False, chunk_batches=1)
    assert (store.encoded, store.reused) == (151, 0)  # 150 distinct texts and the empty one, in three chunks
    assert store.path.parent == tmp_path and not store.array.flags.writeable
    assert not list(tmp_path.glob("*.partial.*"))
    memory = TextStates(bundle, texts, 24, cpu, progress=False)
    for batch in (texts[:5], ["", texts[7], texts[0]], texts[140:]):
        for key in ("states", "attention_mask"):
            torch.testing.assert_close(store.batch(batch, cpu)[key], memory.batch(batch, cpu)[key], rtol=0, atol=0)
    assert store.batch(texts[:3], cpu, pad_to=24)["states"].shape == (3, 24, 16)

    with caplog.at_level(logging.INFO, logger="diffcxr_aug.generator.batches"):
        again = open_text_states(bundle, texts, 24, tmp_path, cpu, progress=False)
    assert again.encoded == 0 and again.path == store.path
    assert f"text states {store.path}: encoded 0 of 151 texts (151 reused)" in caplog.text

    # Another truncation, or another encoder (the same architecture, other weights), is another store.
    shorter = open_text_states(bundle, texts, 8, tmp_path, cpu, progress=False)
    other = open_text_states(_bundle(texts, seed=1), texts, 24, tmp_path, cpu, progress=False)
    assert shorter.encoded == other.encoded == 151
    assert len({store.path, shorter.path, other.path}) == 3


# Run by the torchrun test: open the text states of the encoder saved in argv[1] for the texts in argv[2] (JSON),
# and write what this process encoded to argv[3]/rank<R>.json.
ENCODE_SCRIPT = """
import json, logging, os, sys
import torch
from diffcxr_aug.generator.batches import open_text_states
from diffcxr_aug.generator.text_encoder import load_text_encoder

logging.basicConfig(level=logging.INFO)
torch.set_num_threads(1)
encoder, texts, out = sys.argv[1:4]
bundle = load_text_encoder(encoder, 24)
texts = json.loads(open(texts).read())
store = open_text_states(bundle, texts, 24, out, torch.device("cpu"), progress=False, chunk_batches=1)
rank = int(os.environ.get("RANK", "0"))
record = {"encoded": store.encoded, "path": str(store.path)}
open(os.path.join(out, f"rank{rank}.json"), "w").write(json.dumps(record))
"""


@pytest.mark.integration
def test_two_gloo_ranks_under_torchrun_share_one_text_store(tmp_path):
    texts = _texts()
    bundle = _bundle(texts)
    bundle.model.save_pretrained(tmp_path / "encoder")
    bundle.tokenizer.save_pretrained(tmp_path / "encoder")
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    script = tmp_path / "encode.py"
    script.write_text(ENCODE_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    command += [str(tmp_path / "encoder"), str(tmp_path / "texts.json"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["path"] == ranks[1]["path"]
    assert [r["encoded"] for r in ranks] == [64 + 23, 64]  # three chunks of up to 64 texts: 0 and 2, then 1

    loaded = load_text_encoder(str(tmp_path / "encoder"), 24)
    cpu = torch.device("cpu")
    store = open_text_states(loaded, texts, 24, tmp_path, cpu, progress=False)
    assert store.encoded == 0 and str(store.path) == ranks[0]["path"]
    memory = TextStates(loaded, texts, 24, cpu, progress=False)
    torch.testing.assert_close(store.batch(texts, cpu)["states"], memory.batch(texts, cpu)["states"], rtol=0, atol=0)


@pytest.mark.integration
def test_a_run_whose_text_states_do_not_fit_in_memory_reads_them_from_disk(tmp_path, monkeypatch, caplog):
    """With the memory cap at zero, a frozen encoder's states go to the store beside the manifest's caches: the run
    ends with the in-memory run's weights bit for bit, and a second run encodes no text."""
    data = make_tiny_manifest(tmp_path / "data").parent
    settings = dict(
        config="tiny", text_encoder="minilm", text_encoder_policy="frozen", max_steps=2, batch_size=4,
        checkpoint_every=2, sample_every=2, num_validation_reports=1, validation_steps=1, lr_warmup_steps=1,
        mixed_precision="no",
    )  # fmt: skip
    train_generator(data, tmp_path / "memory", GeneratorSettings(**settings), device="cpu")
    assert not list((data / "cache").glob("text_states_*"))
    monkeypatch.setattr(training_run, "TEXT_CACHE_MAX_BYTES", 0)
    with caplog.at_level(logging.INFO, logger="diffcxr_aug.generator.batches"):
        train_generator(data, tmp_path / "disk", GeneratorSettings(**settings), device="cpu")
        train_generator(data, tmp_path / "again", GeneratorSettings(**{**settings, "max_steps": 1}), device="cpu")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("text states /")]
    (path,) = (data / "cache").glob("text_states_*.npy")
    assert lines == [f"text states {path}: encoded 3 of 3 texts (0 reused)"] + [
        f"text states {path}: encoded 0 of 3 texts (3 reused)"
    ]  # two distinct reports and the empty one
    a = load_file(tmp_path / "memory" / "checkpoints" / "checkpoint-2" / CHECKPOINT_WEIGHTS)
    b = load_file(tmp_path / "disk" / "checkpoints" / "checkpoint-2" / CHECKPOINT_WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
