"""The CUDA path at tiny size: stage 1 and stage 2 in bf16 and fp16 (with loss scaling), a resumed run bit-identical
to an uninterrupted one, synthesize in both precisions, a classifier epoch under autocast, and evaluate.

Skipped (with the reason) where torch sees no GPU; ``bench/gpu_check.py`` runs them as ``pytest -m cuda`` on one.
They are the CPU suite's tests of the same functions on ``device="cuda"``: one short run proves the CUDA path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from diffcxr_aug.data.manifest import read_manifest
from diffcxr_aug.generator.accelerator import GRAD_SCALER_KEY
from diffcxr_aug.generator.checkpoints import CHECKPOINT_STATE, CHECKPOINT_WEIGHTS, list_checkpoints
from diffcxr_aug.generator.settings import GeneratorSettings, SynthesisSettings
from diffcxr_aug.generator.synthesize import synthesize
from diffcxr_aug.generator.training import train_generator
from tests.conftest import make_tiny_manifest

# cuBLAS picks a reproducible reduction order only with a fixed workspace, read when CUDA starts in this process.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; bench/gpu_check.py runs these on one"),
]

PRECISIONS = ("bf16", "fp16")
TINY_GPU = dict(
    config="tiny",
    batch_size=4,
    checkpoint_every=2,
    sample_every=4,
    num_validation_reports=2,
    validation_steps=2,
    lr_warmup_steps=1,
    # Torch's flash / memory-efficient attention kernels accumulate their backward with atomics: the math backend
    # (plain matmuls) keeps the resume test's bit-for-bit comparison meaningful.
    attention="math",
)


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic cuDNN and torch kernels (where a kernel has no deterministic version torch warns)."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)
    benchmark = torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1], benchmark


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_tiny_manifest(tmp_path_factory.mktemp("cuda") / "data").parent


@pytest.fixture(scope="module", params=PRECISIONS)
def stage1(request, data, tmp_path_factory) -> dict[str, object]:
    """A tiny stage-1 model trained 4 steps on the GPU in one precision (checkpoints at steps 2 and 4)."""
    precision = request.param
    out = tmp_path_factory.mktemp(f"stage1-{precision}") / "gen"
    section = GeneratorSettings(max_steps=4, mixed_precision=precision, **TINY_GPU)
    with deterministic():
        train_generator(data, out, section, device="cuda", seed=0)
    return {"precision": precision, "out": out, "section": section}


def _finite_weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    weights = load_file(next((folder / component).glob("*.safetensors")))
    assert weights and all(torch.isfinite(w).all() for w in weights.values()), component
    return weights


def test_stage1_trains_on_the_gpu_in_each_precision(stage1):
    """bf16 and fp16 (its GradScaler state in every checkpoint) train on CUDA: finite losses, fp32 master weights and
    an fp32 EMA that moved away from the initial weights."""
    out, precision = stage1["out"], stage1["precision"]
    info = json.loads((out / "training_info.json").read_text())
    assert info["mixed_precision"] == precision and info["device"].startswith("cuda") and info["steps"] == 4
    assert info["attention"] == "math"
    log = pd.read_csv(out / "logs" / "loss.csv")
    assert log["step"].tolist() == [1, 2, 3, 4] and np.isfinite(log["loss"]).all()
    ema = _finite_weights(out, "unet")
    assert all(w.dtype == torch.float32 for w in ema.values())
    state = json.loads((list_checkpoints(out)[-1] / CHECKPOINT_STATE).read_text())
    if precision == "fp16":
        assert state[GRAD_SCALER_KEY]["scale"] > 0 and "_growth_tracker" in state[GRAD_SCALER_KEY]
    else:
        assert GRAD_SCALER_KEY not in state
    trained = load_file(list_checkpoints(out)[-1] / CHECKPOINT_WEIGHTS)
    assert all(w.dtype == torch.float32 for w in trained.values())


def test_resume_after_a_checkpoint_is_bit_identical(stage1, tmp_path):
    """The 4-step run stopped after its step-2 checkpoint and resumed ends with the same weights, bit for bit (the
    loss scale of fp16 included), as the run that never stopped."""
    straight, precision = stage1["out"], stage1["precision"]
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-4")
    with deterministic():
        train_generator(_data(straight), resumed, stage1["section"], resume="latest", device="cuda", seed=0)
    a = load_file(resumed / "checkpoints" / "checkpoint-4" / CHECKPOINT_WEIGHTS)
    b = load_file(straight / "checkpoints" / "checkpoint-4" / CHECKPOINT_WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), precision
    ema_a, ema_b = _finite_weights(resumed, "unet"), _finite_weights(straight, "unet")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a), precision
    states = [
        json.loads((f / "checkpoints" / "checkpoint-4" / CHECKPOINT_STATE).read_text()) for f in (resumed, straight)
    ]
    assert states[0].get(GRAD_SCALER_KEY) == states[1].get(GRAD_SCALER_KEY)
    assert json.loads((resumed / "training_info.json").read_text())["resumed_from_step"] == 2


def _data(generator: Path) -> Path:
    """The manifest folder a generator was trained on (its ``training_info.json``)."""
    return Path(json.loads((generator / "training_info.json").read_text())["data"]).parent


def test_stage2_trains_on_the_gpu_in_each_precision(stage1, tmp_path):
    """The DKIM adapter on the frozen stage-1 model, 2 steps on CUDA in the same precision."""
    out, precision = tmp_path / "dkim", stage1["precision"]
    section = stage1["section"].model_copy(update={"attention": "auto"})  # torch's own kernels on the GPU
    train_generator(_data(stage1["out"]), out, section.model_copy(update={"stage2_steps": 2}), stage=2,
                    generator=stage1["out"], device="cuda")  # fmt: skip
    info = json.loads((out / "training_info.json").read_text())
    assert (info["stage"], info["steps"], info["mixed_precision"]) == (2, 2, precision)
    assert np.isfinite(pd.read_csv(out / "logs" / "loss.csv")["loss"]).all()
    adapter = _finite_weights(out, "adapter")
    assert any(k.startswith("zero_conv") and v.abs().sum() > 0 for k, v in adapter.items())


def test_synthesize_in_each_precision_is_close_to_fp32(stage1, tmp_path):
    """synthesize under bf16 and fp16 autocast records its precision and draws the fp32 images to within half-
    precision rounding (same seeds): no overflow to NaN or black films."""
    from diffcxr_aug.data.images import load_image

    gen, precision = stage1["out"], stage1["precision"]
    settings = SynthesisSettings(n=4, steps=4, guidance=3.0, batch_size=4)
    fp32 = synthesize(gen, tmp_path / "fp32", settings.model_copy(update={"mixed_precision": "no"}), device="cuda")
    half = synthesize(gen, tmp_path / precision, settings.model_copy(update={"mixed_precision": precision}),
                      device="cuda")  # fmt: skip
    auto = synthesize(gen, tmp_path / "auto", settings, device="cuda")
    assert json.loads((half.parent / "synthesis.json").read_text())["mixed_precision"] == precision
    assert read_manifest(half.parent).frame["meta_precision"].tolist() == [precision] * 4
    assert json.loads((auto.parent / "synthesis.json").read_text())["mixed_precision"] in PRECISIONS
    frame = read_manifest(fp32.parent).frame
    for name in frame["image_path"]:
        a, b = load_image(fp32.parent / name), load_image(half.parent / name)
        assert np.isfinite(b).all() and b.std() > 0 and np.abs(a - b).mean() < 0.05, name


def test_one_classifier_epoch_under_autocast(data, tmp_path):
    """A DenseNet-family classifier sweep cell, one epoch under bf16 and under fp16 (loss scaling), on CUDA."""
    from diffcxr_aug.augment.results import read_results
    from diffcxr_aug.augment.sweep import run_sweep
    from diffcxr_aug.config import ClassifierSection

    for precision in PRECISIONS:
        section = ClassifierSection(
            model="densenet121", real_fracs=[1.0], modes=["real"], seeds=[0], epochs=1, batch_size=8, image_size=32,
            mixed_precision=precision, n_bootstrap=10,
        )  # fmt: skip
        out = tmp_path / precision
        results = read_results(run_sweep(data, out, section, device="cuda", progress=False))
        assert json.loads((out / "sweep.json").read_text())["precision"] == precision
        assert json.loads((out / "sweep.json").read_text())["device"].startswith("cuda")
        assert len(results) == 1 and results["mauc"].dropna().between(0, 1).all()


def test_evaluate_on_the_gpu_under_autocast(stage1, tmp_path):
    """evaluate: the reference classifier trained and the features taken under the precision asked for (auto: the
    GPU's), on CUDA."""
    from diffcxr_aug.evaluation.report import evaluate

    gen, precision = stage1["out"], stage1["precision"]
    synthetic = tmp_path / "s"
    synthesize(gen, synthetic, SynthesisSettings(n=6, steps=2, guidance=2.0), device="cuda")
    report = evaluate(_data(gen), synthetic, tmp_path / "e", device="cuda", epochs=1, mixed_precision=precision)
    result = json.loads(report.read_text())
    assert result["mixed_precision"] == precision
    fidelity = result["synthetic"]["s"]["fidelity"]
    assert np.isfinite(fidelity["fid"]) and 0 <= result["synthetic"]["s"]["faithfulness"]["mauc"] <= 1
