"""``bench/gpu_check.py``: its CPU toy mode end to end (every part, the JSON and the markdown), the card table, and a
report written whatever its parts did."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))
import gpu_check  # noqa: E402 - bench/ is no package: its folder on the path first

PART_KEYS = {
    "cuda_tests": ("summary", "counts"),
    "training": ("precision", "rows"),
    "sampling": ("precision", "rows"),
    "recipe": ("returncode", "generator", "synthesize", "classifiers", "evaluate_precision"),
}


@pytest.mark.integration
def test_gpu_check_cpu_tiny_mode_writes_every_part(tmp_path):
    """``--device cpu --tiny``: the CUDA tests are collected and skipped with their reason, both configs' stand-ins
    train with and without gradient checkpointing and torch.compile at the largest batch under the toy cap, both
    sizes sample, and the tiny MIMIC recipe runs through ``diffcxr-aug run``; the JSON and the markdown hold it all."""
    out = tmp_path / "check"
    command = [sys.executable, str(REPO_ROOT / "bench" / "gpu_check.py"), "--out", str(out), "--device", "cpu"]
    command += ["--tiny", "--budget-s", "400"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "tiny" and report["device"] == "cpu" and report["seconds"] <= 400
    for part, keys in PART_KEYS.items():
        entry = report["parts"][part]
        assert entry["status"] == "ok", (part, entry)
        assert all(key in entry for key in keys), (part, sorted(entry))
    tests = report["parts"]["cuda_tests"]
    assert tests["counts"]["skipped"] >= 6 and "passed" not in tests["counts"]
    assert any("needs a CUDA GPU" in reason for reason in tests["reasons"])
    rows = report["parts"]["training"]["rows"]
    assert {(r["stands_for"], r["checkpointing"], r["compile"]) for r in rows} == {
        (config, checkpointing, compiled)
        for config in ("paper-256", "paper-512")
        for checkpointing in (False, True)
        for compiled in (False, True)
    }
    stand_ins = {"paper-256": "tiny", "paper-512": "tiny-512"}
    for row in rows:
        assert row["batch"] == 2 and row["seconds_per_step"] > 0 and row["tflops"] > 0 and row["mfu"] is None
        assert row["estimated_memory_gib"] > 0 and row["config"] == stand_ins[row["stands_for"]]
    sampling = {row["size"]: row for row in report["parts"]["sampling"]["rows"]}
    assert set(sampling) == {256, 512} and all(
        r["images_per_s"] > 0 and r["gflops_per_image"] > 0 for r in sampling.values()
    )
    recipe = report["parts"]["recipe"]
    assert recipe["returncode"] == 0 and recipe["generator"]["device"] == "cpu" and recipe["stage2"]
    text = (out / "gpu_check.md").read_text()
    for heading in ("## 1. CUDA tests", "## 2. Training steps", "## 3. Sampling", "## 4. recipes/mimic-cxr.yaml"):
        assert heading in text
    assert text.count("tiny (for paper-256)") == 4 and text.count("tiny-512 (for paper-512)") == 4


def test_peak_table_names_the_card_and_its_precision():
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert gpu_check.peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert gpu_check.peak_tflops("Tesla V100-SXM2-16GB", "bf16") is None
    assert gpu_check.peak_tflops("Tesla V100-SXM2-16GB", "fp16") == 125.0
    assert gpu_check.peak_tflops("Tesla T4", "fp16") == 65.0
    assert gpu_check.peak_tflops("NVIDIA GeForce RTX 4090", "bf16") is None  # unknown: n/a
    assert gpu_check.peak_tflops("NVIDIA L40S", "no") is None  # fp32 has no entry


def test_markdown_reports_parts_that_failed_stopped_or_were_skipped():
    """The report is written whatever the parts did: each part's status, the rows that ran, and the reason of a
    failure."""
    result = {
        "card": "NVIDIA H100 80GB HBM3", "mode": "full", "started": "2026-12-07T00:00:00+00:00", "torch": "2.11.0",
        "cuda": "13.0", "seconds": 470.0, "budget_s": 450.0,
        "parts": {
            "cuda_tests": {"status": "failed", "seconds": 80, "budget_s": 112, "summary": "1 failed, 10 passed",
                           "reasons": ["FAILED tests/test_cuda.py::test_x - AssertionError"], "tail": "assert 1 == 2"},
            "training": {"status": "stopped", "seconds": 180, "budget_s": 150, "precision": "bf16",
                         "attention": "default", "compile_backend": "inductor", "peak_tflops": 989.0,
                         "timed_steps": 10, "note": "killed after 180 s",
                         "rows": [{"config": "paper-256", "stands_for": "paper-256", "checkpointing": False,
                                   "compile": False, "status": "ok", "batch": 512, "batch_search": "cap 512",
                                   "seconds_per_step": 0.5, "images_per_s": 1024.0, "tflops": 350.0, "mfu": 0.354,
                                   "peak_memory_gib": 70.1, "estimated_memory_gib": 62.0}]},
            "sampling": {"status": "error", "seconds": 3, "budget_s": 40, "note": "Traceback ...\nRuntimeError: x"},
            "recipe": {"status": "skipped", "note": "not asked for (--parts)"},
        },
    }  # fmt: skip
    text = gpu_check.markdown(result)
    for status in (
        "| cuda_tests | failed |",
        "| training | stopped |",
        "| sampling | error |",
        "| recipe | skipped |",
    ):
        assert status in text
    assert "| paper-256 | off | off | 512 | 0.500 | 1024.0 | 350 | 35.4% | 70.1 | 62.0 |" in text
    assert "FAILED tests/test_cuda.py::test_x" in text and "RuntimeError: x" in text and "killed after 180 s" in text
