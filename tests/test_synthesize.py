"""``synthesize`` on a tiny trained pipeline: sharded layout, growth and resume, a real SIGKILL, two torchrun
processes, refused job changes, label-only and text prompt sources, label balancing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from diffcxr_aug.cli import app
from diffcxr_aug.data.images import load_image, verify_image
from diffcxr_aug.data.labeler import RuleLabeler
from diffcxr_aug.data.labels import CHEXPERT_LABELS
from diffcxr_aug.data.manifest import read_manifest, write_manifest
from diffcxr_aug.errors import InputError
from diffcxr_aug.generator.prompts import (
    balanced_prompt_rows,
    load_prompt_pool,
    prevalence,
    prompt_rows,
    template_report,
)
from diffcxr_aug.generator.settings import GeneratorSettings, SynthesisSettings
from diffcxr_aug.generator.synthesis_plan import image_seed
from diffcxr_aug.generator.synthesize import synthesize
from diffcxr_aug.generator.training import train_generator
from tests.conftest import REPO_ROOT, make_tiny_manifest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny generator trained for one step (real weights, real pipeline folder)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("synthesize")
    data = make_tiny_manifest(root / "data").parent
    section = GeneratorSettings(
        config="tiny", max_steps=1, batch_size=4, num_validation_reports=1, validation_steps=1, mixed_precision="no"
    )
    train_generator(data, root / "gen", section, device="cpu")
    return {"data": data, "gen": root / "gen", "root": root}


def _cli(*args: str) -> list[str]:
    return ["synthesize", *args, "--steps", "1", "--device", "cpu"]


def _check_folder(out: Path, n: int, size: int = 32) -> pd.DataFrame:
    """Exactly n rows and n image files, every one decoding at size x size, rows and files the same set."""
    frame = read_manifest(out).frame
    files = sorted(p.relative_to(out).as_posix() for p in (out / "images").glob("*/*.png"))
    assert len(frame) == n and len(files) == n
    assert sorted(frame["image_path"]) == files and not frame["image_path"].duplicated().any()
    assert frame["patient_id"].tolist() == [f"synthetic-{i}" for i in range(n)]
    assert all(verify_image(out / p) == (size, size) for p in files)
    assert not [p for p in out.rglob(".*.png*")], "temporary files left behind"
    return frame


# ---------------------------------------------------------------------------------------- prompt order
def test_template_reports_read_back_as_their_labels():
    labeler = RuleLabeler()
    for name in CHEXPERT_LABELS[1:]:
        for value in (1.0, 0.0, -1.0):
            report = template_report({name: value, "Edema" if name != "Edema" else "Fracture": np.nan})
            labels = labeler(report)
            assert labels[name] == value, (name, value, report)
            others = [k for k, v in labels.items() if k not in (name, "No Finding") and not np.isnan(v)]
            assert others == [], (report, others)
    assert labeler(template_report({"No Finding": 1.0, "Pneumothorax": 0.0}))["No Finding"] == 1.0


def test_balanced_order_reaches_the_target_in_every_prefix():
    rng = np.random.default_rng(0)
    positives = rng.random((300, 4)) < np.array([0.02, 0.1, 0.5, 0.0])
    rows = balanced_prompt_rows(positives, 3000, seed=1, target=0.25)
    for n in (40, 400, 3000):
        share = prevalence(positives, np.bincount(rows[:n], minlength=300))
        assert (share[:2] >= 0.25 - 1 / n).all() and share[2] > 0.4 and share[3] == 0.0
    # Image i's prompt does not depend on n; without balancing the order is the plain one.
    assert (balanced_prompt_rows(positives, 500, seed=1, target=0.25) == rows[:500]).all()
    plain = prompt_rows(300, 3000, seed=1)
    assert prevalence(positives, np.bincount(plain, minlength=300))[0] < 0.05


# --------------------------------------------------------------------------------- layout, grow, resume
def test_synthesize_grows_resumes_and_refuses_another_job(tiny, tmp_path):
    out = tmp_path / "synthetic"
    section = SynthesisSettings(n=4, steps=2, guidance=2.0, batch_size=3, shard_size=3)
    frame = read_manifest(synthesize(tiny["gen"], out, section, device="cpu", seed=5)).frame
    assert frame["image_path"].tolist() == ["images/000/000000.png", "images/000/000001.png"] + [
        "images/000/000002.png",
        "images/001/000003.png",
    ]
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["000.csv", "001.csv"]
    assert set(frame["split"]) == {"train"} and (frame["prompt"] == frame["report"]).all()
    assert frame["seed"].astype(int).tolist() == [image_seed(5, i) for i in range(4)]
    job = json.loads((out / "synthesis.json").read_text())
    assert set(frame["meta_generator"]) == {job["generator_id"]} and job["generator_id"].startswith("gen@")
    assert set(frame["meta_steps"]) == {"2"} and set(frame["meta_guidance"]) == {"2.0"}
    assert set(frame["meta_sampler"]) == {"DPMSolverMultistepScheduler"}
    assert job["world_size"] == 1 and job["rank_images"] == [4] and job["peak_rss_mib"][0] > 0
    assert job["gflops_per_image"] == pytest.approx(job["gflops_per_denoising_step"] * 2 * 2)
    source = read_manifest(tiny["data"]).frame.set_index("image_path")
    for _, row in frame.iterrows():
        assert row["Cardiomegaly"] == source.loc[row["meta_prompt_image"], "Cardiomegaly"]
        assert row["report"] == source.loc[row["meta_prompt_image"], "report"]
    assert (out / "preview.png").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "images").glob("*/*.png")}
    first = (out / "images/000/000001.png").read_bytes()

    # Grow to 6: only two new images; the first four are untouched and keep their prompts.
    grown = section.model_copy(update={"n": 6})
    frame6 = _check_folder(Path(synthesize(tiny["gen"], out, grown, device="cpu", seed=5)).parent, 6)
    assert frame6["report"].tolist()[:4] == frame["report"].tolist()
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # Interrupted: the manifest, a shard's rows and two images gone, one image cut short, a temporary file
    # left. The same command finishes it: the missing and the damaged images made again, all rows back.
    (out / "manifest.csv").unlink()
    (out / "shards/001.csv").unlink()
    (out / "images/000/000002.png").unlink()
    (out / "images/001/000004.png").unlink()
    damaged = out / "images/001/000005.png"
    damaged.write_bytes(damaged.read_bytes()[:60])
    (out / "images/000/.000002.png.x1y2.png").write_bytes(b"\x89PNG")
    synthesize(tiny["gen"], out, grown, device="cpu", seed=5)
    _check_folder(out, 6)
    assert json.loads((out / "synthesis.json").read_text())["rank_images"] == [3]
    # An image is reproduced from its seed (within one grey level here: it was drawn in another batch).
    (out / "images/000/000001.png").unlink()
    synthesize(tiny["gen"], out, grown, device="cpu", seed=5)
    assert np.abs(load_image(out / "images/000/000001.png") - _decode(first)).max() <= 1.5 / 255

    with pytest.raises(ValueError, match=r"another synthesis job \(steps: 2 -> 3\).*--steps 2"):
        synthesize(tiny["gen"], out, grown.model_copy(update={"steps": 3}), device="cpu", seed=5)
    with pytest.raises(ValueError, match=r"balance: None -> 0.5.*no --balance"):
        synthesize(tiny["gen"], out, grown.model_copy(update={"balance": 0.5}), device="cpu", seed=5)
    with pytest.raises(ValueError, match=r"shard_size: 3 -> 1000.*synthesize.shard_size: 3"):
        synthesize(tiny["gen"], out, grown.model_copy(update={"shard_size": 1000}), device="cpu", seed=5)


def _decode(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32) / 255.0


# ---------------------------------------------------------------------------------- kill -9, two processes
def _recipe(tmp_path: Path, **synthesize_keys) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"synthesize": synthesize_keys}))
    return recipe


@pytest.mark.integration
def test_sigkill_mid_run_then_rerun_gives_exactly_n_valid_images(tiny, tmp_path):
    out, n = tmp_path / "killed", 24
    args = _cli("--n", str(n), "--generator", str(tiny["gen"]), "--out", str(out), "--batch-size", "1")
    args += ["--recipe", str(_recipe(tmp_path, shard_size=5))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "diffcxr_aug.cli", *args], cwd=REPO_ROOT, env=env, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while len(list(out.glob("images/*/*.png"))) < 7 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    made = len(list(out.glob("images/*/*.png")))
    assert 7 <= made < n and not (out / "manifest.csv").exists()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    _check_folder(out, n)
    assert json.loads((out / "synthesis.json").read_text())["rank_images"] == [n - made]


@pytest.mark.integration
def test_two_processes_with_torchrun_split_the_shards(tiny, tmp_path):
    """``torchrun ... -m diffcxr_aug.cli -- synthesize --n ...`` (gloo on CPU): disjoint shards, union 0..n-1."""
    out, n = tmp_path / "ddp", 10
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "diffcxr_aug.cli"]
    command += ["--", *_cli("--n", str(n), "--generator", str(tiny["gen"]), "--out", str(out))]
    command += ["--recipe", str(_recipe(tmp_path, shard_size=2))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    job = json.loads((out / "synthesis.json").read_text())
    assert job["world_size"] == 2 and sum(job["rank_images"]) == n and min(job["rank_images"]) > 0
    first, second = map(set, job["rank_shards"])
    assert not first & second and first | second == set(range(5))
    _check_folder(out, n)


def test_one_process_starts_no_accelerate_state_or_process_group(tiny, tmp_path):
    """A single process leaves accelerate's process-wide state as it was, so a recipe's later steps (a training on
    another device) choose their own device."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)  # as a fresh process; the fixture trained in this one
    synthesize(tiny["gen"], tmp_path / "one", SynthesisSettings(n=1, steps=1), device="cpu")
    assert PartialState._shared_state == {} and not torch.distributed.is_initialized()


def test_deal_shards_balances_a_resumed_job():
    """The first shards done, the rest missing: each process gets half the missing images, where accelerate's
    contiguous ``split_between_processes`` would give process 0 shards 0-2 (2 images) and process 1 the rest (6)."""
    from diffcxr_aug.generator.synthesis_job import deal_shards

    missing = [0, 0, 2, 2, 2, 2]
    shards = deal_shards(missing, n=12, shard_size=2, world=2)
    assert sorted(shards[0] + shards[1]) == list(range(6))
    assert [sum(missing[s] for s in part) for part in shards] == [4, 4]


def test_auto_batch_size_halves_on_cuda_out_of_memory():
    """``batch_size: auto``: a batch that runs out of CUDA memory is halved and run again, and the smaller size kept;
    a batch size that was asked for raises. (No GPU here: the sampler's model call raises CUDA's error.)"""
    from diffcxr_aug.generator.synthesize import _Sampler

    class RoomForFour(_Sampler):
        def _run(self, batch: list[int]) -> np.ndarray:
            if len(batch) > 4:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return np.zeros((len(batch), 2, 2), dtype=np.float32)

    sampler = RoomForFour(Path("gen"), None, SynthesisSettings(batch_size="auto"), torch.device("cpu"))
    assert [batch for batch, _ in sampler(list(range(10)))] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert sampler.batch_size == 4
    fixed = RoomForFour(Path("gen"), None, SynthesisSettings(batch_size=8), torch.device("cpu"))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        list(fixed(list(range(10))))


# ------------------------------------------------------------------------------------------ prompt sources
def test_label_only_text_and_labels_from_prompt_sources(tiny, tmp_path):
    labels = pd.DataFrame({"Cardiomegaly": ["1", "0", "", "1"], "Pneumothorax": ["0", "1", "-1", ""]})
    labels["site"] = "x"  # not a label name: ignored
    labels.to_csv(tmp_path / "labels.csv", index=False)
    result = CliRunner().invoke(
        app,
        _cli("--n", "3", "--generator", str(tiny["gen"]), "--out", str(tmp_path / "a"))
        + ["--prompts", str(tmp_path / "labels.csv")],
    )
    assert result.exit_code == 0, result.output
    frame = _check_folder(tmp_path / "a", 3)
    assert [c for c in frame.columns if c in ("Cardiomegaly", "Pneumothorax", "site")] == [
        "Cardiomegaly",
        "Pneumothorax",
    ]
    for _, row in frame.iterrows():
        assert row["prompt"] == template_report(
            {"Cardiomegaly": row["Cardiomegaly"], "Pneumothorax": row["Pneumothorax"]}
        )
    assert set(frame["view"]) == {"UNKNOWN"} and set(frame["meta_prompt_image"]) == {""}
    job = json.loads((tmp_path / "a" / "synthesis.json").read_text())
    assert job["prompt_kind"] == "labels" and job["batch_size"] == [16]

    (tmp_path / "reports.txt").write_text("Large right pleural effusion.\n\nNo pneumothorax. Normal heart size.\n")
    synthesize(tiny["gen"], tmp_path / "b", SynthesisSettings(n=2, steps=1, prompts=tmp_path / "reports.txt"), "cpu")
    frame = _check_folder(tmp_path / "b", 2)
    effusion = frame.set_index("prompt")["Pleural Effusion"]
    assert effusion["Large right pleural effusion."] == 1.0 and len(frame.columns) > 20  # 14 labels from the labeler

    section = SynthesisSettings(n=2, steps=1, labels_from=tiny["data"])
    frame = _check_folder(Path(synthesize(tiny["gen"], tmp_path / "c", section, "cpu")).parent, 2)
    assert set(frame["prompt"]) <= {
        "Cardiomegaly. No pneumothorax.",
        "No acute cardiopulmonary abnormality. No cardiomegaly. No pneumothorax.",
    }
    assert frame["meta_prompt_image"].str.startswith("images/").all()

    result = CliRunner().invoke(
        app,
        _cli("--n", "2", "--generator", str(tiny["gen"]), "--out", str(tmp_path / "d"))
        + ["--prompts", str(tmp_path / "labels.csv"), "--labels-from", str(tiny["data"])],
    )
    assert result.exit_code == 2 and "two prompt sources" in result.output


def test_balance_raises_a_rare_labels_share(tiny, tmp_path):
    rare = ["1"] + ["0"] * 19
    pd.DataFrame({"Pneumothorax": rare, "Cardiomegaly": ["1", "0"] * 10}).to_csv(tmp_path / "labels.csv", index=False)
    args = _cli("--n", "10", "--generator", str(tiny["gen"]), "--prompts", str(tmp_path / "labels.csv"))
    assert CliRunner().invoke(app, [*args, "--out", str(tmp_path / "plain")]).exit_code == 0
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "balanced"), "--balance", "0.3"])
    assert result.exit_code == 0, result.output
    plain, balanced = (_check_folder(tmp_path / name, 10) for name in ("plain", "balanced"))
    assert plain["Pneumothorax"].mean() <= 0.1 and balanced["Pneumothorax"].mean() >= 0.3
    table = json.loads((tmp_path / "balanced" / "synthesis.json").read_text())["prevalence"]
    assert table["Pneumothorax"] == {"pool": 0.05, "output": balanced["Pneumothorax"].mean()}
    assert table["Cardiomegaly"]["output"] >= 0.3
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "x"), "--balance", "1.5"])
    assert result.exit_code == 2 and "--balance 1.5" in result.output


def test_synthesize_defaults_to_label_prompts_for_a_generator_trained_on_labels(tmp_path):
    """No --prompts: a generator trained on template reports (report_source labels) draws its prompts from its
    training manifest's labels, written the same way; any other generator from that manifest's reports."""
    from diffcxr_aug.generator.synthesis_plan import _prompt_source

    data = tmp_path / "data" / "manifest.csv"
    info = {"data": str(data), "section": {"report_source": "labels"}}
    (tmp_path / "training_info.json").write_text(json.dumps(info))
    assert _prompt_source(tmp_path, SynthesisSettings()) == (data, True)
    (tmp_path / "training_info.json").write_text(json.dumps({"data": str(data), "section": {}}))
    assert _prompt_source(tmp_path, SynthesisSettings()) == (data, False)


def test_prompt_split_draws_the_reports_of_that_split_only(tmp_path):
    manifest = read_manifest(make_tiny_manifest(tmp_path / "tiny"))
    for split in ("train", "val", "test"):
        pool = load_prompt_pool(tmp_path / "tiny", split=split)
        expected = manifest.split(split).frame
        assert len(pool) == len(expected) and sorted(pool.frame["image"]) == sorted(expected["image_path"])
    emptied = manifest.frame.assign(split=manifest.frame["split"].replace("test", "train"))
    write_manifest(emptied, tmp_path / "tiny")
    with pytest.raises(InputError, match="the test split is empty"):
        load_prompt_pool(tmp_path / "tiny", split="test")
