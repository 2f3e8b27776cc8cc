from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from diffcxr_aug.augment.mixing import load_synthetic, training_stages
from diffcxr_aug.augment.plots import plot_sweep
from diffcxr_aug.augment.results import BASE_COLUMNS
from diffcxr_aug.augment.statistics import paired_gains, summarize
from diffcxr_aug.augment.summary import headline_markdown, summary_markdown
from diffcxr_aug.classifiers.metrics import bootstrap_mauc_ci, per_label_auc, rank_auc
from diffcxr_aug.classifiers.models import (
    ClassifierConfig,
    create_classifier,
    data_config,
    load_classifier,
    save_classifier,
)
from diffcxr_aug.classifiers.subsample import sample_real_fraction
from diffcxr_aug.classifiers.train import apply_uncertainty, build_transforms, masked_bce_with_logits
from diffcxr_aug.cli import app
from diffcxr_aug.data.labels import CHEXPERT_LABELS, NIH_LABELS
from diffcxr_aug.data.manifest import read_manifest, write_manifest
from tests.conftest import make_tiny_manifest

runner = CliRunner()
NAN = float("nan")


# ---------------------------------------------------------------- metrics


def test_auc_scores_known_cells_and_skips_one_class_labels():
    y_true = np.array(
        [
            [1, 0, 1],
            [0, 0, NAN],
            [1, 0, -1],
            [0, 0, 0],
            [1, 0, 0],
            [0, 0, 1],
        ],
        dtype=float,
    )
    y_score = np.array(
        [
            [0.9, 0.1, 0.8],
            [0.2, 0.5, 0.99],  # would be the top score of label c, but its label is unknown
            [0.4, 0.3, 0.01],  # uncertain: not scored either
            [0.3, 0.2, 0.3],
            [0.35, 0.1, 0.2],
            [0.5, 0.9, 0.7],
        ]
    )
    result = per_label_auc(y_true, y_score, ["a", "b", "c"])
    assert result.per_label["a"] == pytest.approx(roc_auc_score(y_true[:, 0], y_score[:, 0]))
    assert np.isnan(result.per_label["b"])  # negatives only: skipped, not 0.5
    known = [0, 3, 4, 5]
    assert result.per_label["c"] == pytest.approx(roc_auc_score(y_true[known, 2], y_score[known, 2]))
    assert result.per_label["c"] == 1.0
    assert result.scored == ["a", "c"]
    assert result.mauc == pytest.approx((result.per_label["a"] + 1.0) / 2)
    assert np.isnan(per_label_auc(np.zeros((4, 2)), np.random.rand(4, 2)).mauc)


def test_rank_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    target = (rng.random(200) < 0.3).astype(float)
    score = np.round(rng.random(200) + 0.3 * target, 1)  # many ties
    assert rank_auc(target, score) == pytest.approx(roc_auc_score(target, score))


def test_bootstrap_ci_is_seeded_and_contains_the_estimate():
    rng = np.random.default_rng(1)
    y_true = (rng.random((300, 3)) < 0.3).astype(float)
    y_true[rng.random((300, 3)) < 0.1] = NAN
    y_score = np.nan_to_num(y_true, nan=0.5) + rng.normal(0, 0.8, size=y_true.shape)
    point = per_label_auc(y_true, y_score).mauc
    low, high = bootstrap_mauc_ci(y_true, y_score, n_bootstrap=300, rng=0)
    assert low < point < high and high - low < 0.2
    assert bootstrap_mauc_ci(y_true, y_score, n_bootstrap=300, rng=0) == (low, high)
    assert bootstrap_mauc_ci(y_true, y_score, n_bootstrap=300, rng=1) != (low, high)
    assert all(np.isnan(bootstrap_mauc_ci(np.zeros((5, 2)), np.ones((5, 2)), n_bootstrap=10)))
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_mauc_ci(y_true, y_score, confidence=95)


# ---------------------------------------------------------------- subsample


def _label_frame(n_patients: int = 60, seed: int = 0) -> pd.DataFrame:
    """Train-split rows only, 1-3 images per patient; 'Rare' is positive for a single patient."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for k in range(1 + p % 3):
            rows.append(
                {
                    "image_path": f"img/{p}_{k}.png",
                    "patient_id": f"p{p}",
                    "study_id": f"s{p}",
                    "view": "PA",
                    "split": "train",
                    "report": "",
                    "Common": str(int(rng.random() < 0.4)),
                    "Rare": "1" if p == 41 else "0",
                    "Uncommon": "1" if p in (7, 19, 33) else "",
                    "Absent": "0",
                }
            )
    return pd.DataFrame(rows)


def test_real_subset_is_patient_level_stratified_nested_and_deterministic(tmp_path):
    train = read_manifest(write_manifest(_label_frame(), tmp_path / "m")).split("train")
    per_patient = train.frame.groupby("patient_id").size()
    small = sample_real_fraction(train, 0.05, seed=0)
    # Whole patients only: every chosen patient comes with all its images.
    counts = small.frame.groupby("patient_id").size()
    assert (counts == per_patient[counts.index]).all()
    assert len(small) >= round(0.05 * len(train))
    # Stratified: the single 'Rare' patient and one 'Uncommon' patient are in even a 5% subset.
    for label in ("Common", "Rare", "Uncommon"):
        assert (small.labels([label]) == 1).any(), label
    # Deterministic in (fraction, seed); another seed draws other patients.
    again = sample_real_fraction(train, 0.05, seed=0)
    assert list(again.frame.index) == list(small.frame.index)
    other = sample_real_fraction(train, 0.3, seed=1)
    assert set(other.frame["patient_id"]) != set(sample_real_fraction(train, 0.3, seed=0).frame["patient_id"])
    # Nested for one seed, and fraction 1.0 is the whole split; rows keep the file's row numbers.
    larger = sample_real_fraction(train, 0.3, seed=0)
    assert set(small.frame.index) <= set(larger.frame.index)
    assert len(sample_real_fraction(train, 1.0, seed=3)) == len(train)
    assert small.full is train.full
    with pytest.raises(ValueError, match="fraction"):
        sample_real_fraction(train, 0.0, seed=0)


# ---------------------------------------------------------------- loss, transforms, models


def test_masked_bce_ignores_unknown_cells_and_uncertainty_policies():
    labels = torch.tensor([[1.0, -1.0, NAN], [0.0, 1.0, -1.0]])
    assert torch.equal(apply_uncertainty(labels, "ones")[:, 1:].nan_to_num(9), torch.tensor([[1.0, 9], [1, 1]]))
    assert torch.equal(apply_uncertainty(labels, "zeros")[:, 1:].nan_to_num(9), torch.tensor([[0.0, 9], [1, 0]]))
    ignored = apply_uncertainty(labels, "ignore")
    assert torch.isnan(ignored).sum() == 3
    with pytest.raises(ValueError, match="ignore, ones, zeros"):
        apply_uncertainty(labels, "u-maybe")

    logits = torch.randn(2, 3, requires_grad=True)
    loss = masked_bce_with_logits(logits, ignored)
    known = ~torch.isnan(ignored)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], ignored[known])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert (logits.grad[~known] == 0).all() and (logits.grad[known] != 0).all()
    # A batch with no known cell: zero loss, still differentiable.
    empty = masked_bce_with_logits(logits, torch.full((2, 3), NAN))
    assert empty.item() == 0.0 and empty.requires_grad


def test_transforms_keep_shape_and_normalise():
    image = torch.rand(1, 32, 32)
    train = build_transforms((0.5,), (0.25,), train=True)
    evaluate = build_transforms((0.5,), (0.25,), train=False)
    assert train(image).shape == (1, 32, 32)
    torch.testing.assert_close(evaluate(image), (image - 0.5) / 0.25)
    assert not any("Flip" in type(t).__name__ for t in train.transforms)
    assert any("Flip" in type(t).__name__ for t in build_transforms((0.5,), (0.25,), True, hflip=True).transforms)


def test_models_by_name_save_load_and_local_pretrained_file(tmp_path):
    torch.manual_seed(0)
    model = create_classifier("test_resnet", num_classes=3)
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 3)
    config = data_config(model, image_size=48)
    assert config["input_size"] == (1, 48, 48) and len(config["mean"]) == 1
    with pytest.raises(ValueError, match="Unknown timm model 'resnet-9000'"):
        create_classifier("resnet-9000", num_classes=3)

    save_classifier(model, ClassifierConfig("test_resnet", ["a", "b", "c"], 48, 0.5, 0.5), tmp_path / "clf")
    loaded, loaded_config = load_classifier(tmp_path / "clf")
    assert loaded_config.label_names == ["a", "b", "c"]
    x = torch.rand(2, 1, 32, 32)
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), model(x))

    # Offline pretrained weights: a local file stands in for the hub (head dropped: other class count).
    body = create_classifier("test_resnet", num_classes=5, pretrained_file=tmp_path / "clf" / "model.safetensors")
    stem = next(k for k in model.state_dict() if k.endswith("weight"))
    torch.testing.assert_close(body.state_dict()[stem], model.state_dict()[stem])
    with pytest.raises(FileNotFoundError):
        create_classifier("test_resnet", num_classes=5, pretrained_file=tmp_path / "missing.safetensors")


# ---------------------------------------------------------------- mixing


def _relabelled_copy(source, folder, keep: list[str], extra: dict | None = None):
    """A copy of a manifest in another folder (absolute image paths) keeping only some label columns."""
    manifest = read_manifest(source)
    frame = manifest.frame.copy()
    frame["image_path"] = [str(p) for p in manifest.image_paths()]
    frame = frame.drop(columns=[c for c in manifest.label_names if c not in keep])
    for name, value in (extra or {}).items():
        frame[name] = value
    return write_manifest(frame, folder)


def test_synthetic_labels_aligned_by_name_and_subsampled(tmp_path):
    real = make_tiny_manifest(tmp_path / "real", n=24)
    synthetic = _relabelled_copy(
        make_tiny_manifest(tmp_path / "synth_src", n=24, seed=1), tmp_path / "synth", ["Cardiomegaly"], {"Foo": "1"}
    )
    names = read_manifest(real).label_names
    aligned = load_synthetic(synthetic.parent, names, n_synthetic=10, seed=0)
    labels = aligned.labels(names)
    assert len(aligned) == 10 and labels.shape == (10, len(names))
    j = names.index("Cardiomegaly")
    assert not np.isnan(labels[:, j]).any() and np.isnan(np.delete(labels, j, axis=1)).all()
    same = load_synthetic(synthetic.parent, names, n_synthetic=10, seed=0)
    assert list(same.frame.index) == list(aligned.frame.index)
    with pytest.raises(ValueError, match="holds only 24"):
        load_synthetic(synthetic.parent, names, n_synthetic=25)
    with pytest.raises(ValueError, match="no label in common"):
        load_synthetic(synthetic.parent, list(NIH_LABELS[2:5]))
    real_manifest = read_manifest(real)
    assert [s.name for s in training_stages("pretrain-finetune", real_manifest, aligned)] == ["pretrain", "finetune"]
    with pytest.raises(ValueError, match="needs synthetic"):
        training_stages("mix", real_manifest, None)
    with pytest.raises(ValueError, match="real, mix, pretrain-finetune"):
        training_stages("blend", real_manifest, aligned)


# ---------------------------------------------------------------- the command line, end to end

TRAIN = ["--model", "test_resnet", "--epochs", "2", "--batch-size", "8", "--image-size", "32", "--device", "cpu"]


def _results(out) -> pd.DataFrame:
    return pd.read_csv(out / "results.csv")


@pytest.mark.integration  # whole sweeps through the CLI and a resume: 2-3 min on 2 cores
def test_train_classifier_cli_real_then_synthetic_and_resume(tmp_path):
    data = make_tiny_manifest(tmp_path / "real", n=48).parent
    synthetic = make_tiny_manifest(tmp_path / "synth", n=24, seed=1).parent
    out = tmp_path / "out"
    base = ["train-classifier", "--data", str(data), "--out", str(out), "--seeds", "0,1", *TRAIN]

    result = runner.invoke(app, [*base, "--real-frac", "0.5"])
    assert result.exit_code == 0, result.output
    frame = _results(out)
    labels = [f"auc_{name}" for name in CHEXPERT_LABELS]
    assert list(frame.columns[: len(BASE_COLUMNS) + len(labels)]) == BASE_COLUMNS + labels
    assert list(frame["mode"]) == ["real", "real"] and list(frame["seed"]) == [0, 1]
    assert (frame["n_synthetic"] == 0).all() and (frame["n_real"] == 12).all()  # half of 24 train images
    assert frame["mauc"].between(0, 1).all() and frame["auc_Cardiomegaly"].notna().all()
    assert frame["auc_Pneumothorax"].isna().all()  # negatives only in the test split: not scored
    assert (frame["mauc_ci_low"] <= frame["mauc"]).all() and (frame["mauc"] <= frame["mauc_ci_high"]).all()
    summary = (out / "summary.md").read_text()
    assert "| 0.5 | real | none | 12 | 0 | 2 |" in summary
    assert (out / "mauc_vs_real_fraction.png").stat().st_size > 0
    weights = out / "runs" / "frac0.5_real_seed0" / "train" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    # Rerunning does not redo finished runs.
    result = runner.invoke(app, [*base, "--real-frac", "0.5"])
    assert result.exit_code == 0, result.output
    assert len(_results(out)) == 2 and weights.stat().st_mtime_ns == stamp

    # Both synthetic modes on the same real subsets (paired), appended to the same table.
    for mode in ("mix", "pretrain-finetune"):
        result = runner.invoke(
            app, [*base, "--real-frac", "0.5", "--synthetic", str(synthetic), "--mode", mode, "--n-synthetic", "16"]
        )
        assert result.exit_code == 0, result.output
    frame = _results(out)
    assert sorted(frame["mode"].unique()) == ["mix", "pretrain-finetune", "real"] and len(frame) == 6
    assert (frame.loc[frame["mode"] != "real", "n_synthetic"] == 16).all()
    # Pretraining sees no real training image: one pretrained model per seed serves every fraction.
    pretrained = out / "runs" / "pretrain_seed1" / "model.safetensors"
    stamp = pretrained.stat().st_mtime_ns
    result = runner.invoke(
        app,
        [
            *base,
            "--real-frac",
            "1",
            "--synthetic",
            str(synthetic),
            "--mode",
            "pretrain-finetune",
            "--n-synthetic",
            "16",
        ],
    )
    assert result.exit_code == 0, result.output
    assert pretrained.stat().st_mtime_ns == stamp
    frame = _results(out)
    assert len(frame) == 8 and (frame.loc[frame["real_frac"] == 1.0, "n_real"] == 24).all()
    history = json.loads((out / "runs" / "frac0.5_pretrain-finetune_seed1" / "finetune" / "history.json").read_text())
    assert history[0]["epoch"] == 0  # fine-tuning scores its starting (pretrained) weights too
    for seed in (0, 1):
        subsets = {
            m: (out / "runs" / f"frac0.5_{m}_seed{seed}" / "real_subset.txt").read_text() for m in frame["mode"]
        }
        assert len(set(subsets.values())) == 1, f"seed {seed}: modes trained on different real images"
    assert "Synthetic modes against real-only" in (out / "summary.md").read_text()

    # A rerun with other training settings into the same folder is refused, not mixed in.
    changed = [*base, "--real-frac", "0.5"]
    changed[changed.index("--epochs") + 1] = "3"
    result = runner.invoke(app, changed)
    assert result.exit_code == 2 and "classifier.epochs" in result.output


@pytest.mark.integration
def test_two_worker_processes_give_the_rows_one_process_gives(tmp_path):
    """classifier.workers: 2 runs the grid in two spawned processes (one thread each); every run seeds itself, so
    the table equals the one-process table row for row, the shared synthetic-only stage (trained under its lock)
    included."""
    from diffcxr_aug.augment.results import RUN_KEY, read_results
    from diffcxr_aug.augment.sweep import run_sweep
    from diffcxr_aug.config import ClassifierSection

    data = make_tiny_manifest(tmp_path / "real", n=48).parent
    synthetic = make_tiny_manifest(tmp_path / "synth", n=24, seed=1).parent
    section = ClassifierSection(
        model="test_resnet", real_fracs=[0.5, 1.0], modes=["real", "mix", "pretrain-finetune", "synthetic-only"],
        seeds=[0, 1], epochs=1, batch_size=8, image_size=32, mixed_precision="no", n_bootstrap=10,
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker runs: the same arithmetic
    try:
        one = read_results(run_sweep(data, tmp_path / "one", section, synthetic=synthetic, progress=False))
    finally:
        torch.set_num_threads(threads)
    section = section.model_copy(update={"workers": 2})
    two = read_results(run_sweep(data, tmp_path / "two", section, synthetic=synthetic, progress=False))
    key = [c for c in RUN_KEY if c != "generator_seed"]
    one, two = one.sort_values(key).reset_index(drop=True), two.sort_values(key).reset_index(drop=True)
    assert len(one) == len(two) == 14
    columns = [c for c in one.columns if c.startswith(("mauc", "auc_", "val_mauc"))] + ["best_epoch", "steps"]
    pd.testing.assert_frame_equal(one[key + columns], two[key + columns])
    pretrain = tmp_path / "two" / "runs" / "pretrain_seed0"
    assert json.loads((pretrain / "history.json").read_text())  # finished, so the runs that share it read it


def test_a_second_model_added_by_a_later_call_gets_its_own_run_folders(tmp_path):
    """A sweep of test_resnet extended by a call naming only resnet10t: the new model's runs (and its synthetic-only
    stage, shared by name) go in runs/resnet10t/, never into the first model's run folders, whose files stay as they
    were; the folder remembers which model sits at runs/ for every later call."""
    from diffcxr_aug.augment.results import read_results
    from diffcxr_aug.augment.sweep import load_sweep_settings, run_sweep
    from diffcxr_aug.config import ClassifierSection

    data = make_tiny_manifest(tmp_path / "real", n=32).parent
    synthetic = make_tiny_manifest(tmp_path / "synth", n=16, seed=1).parent
    section = ClassifierSection(
        model="test_resnet", real_fracs=[1.0], modes=["real", "synthetic-only"], seeds=[0], epochs=1,
        batch_size=8, image_size=32, mixed_precision="no", n_bootstrap=10,
    )  # fmt: skip
    out = tmp_path / "sweep"
    run_sweep(data, out, section, synthetic=synthetic, progress=False)
    runs = out / "runs"
    first = {p.relative_to(runs): p.read_bytes() for p in sorted(runs.rglob("*")) if p.is_file()}
    assert runs.joinpath("frac1_real_seed0", "test_scores.csv").is_file() and not (runs / "resnet10t").exists()
    section = section.model_copy(update={"model": "resnet10t"})
    results = read_results(run_sweep(data, out, section, synthetic=synthetic, progress=False))
    assert sorted(results["model"]) == ["resnet10t", "resnet10t", "test_resnet", "test_resnet"]
    assert {p: (runs / p).read_bytes() for p in first} == first
    assert (runs / "resnet10t" / "frac1_real_seed0" / "test_scores.csv").is_file()
    assert json.loads((runs / "resnet10t" / "pretrain_seed0" / "history.json").read_text())
    assert load_sweep_settings(out)["runs_root_model"] == "test_resnet"


def test_train_classifier_cli_nih_label_set(tmp_path):
    tiny = make_tiny_manifest(tmp_path / "tiny", n=24)
    effusion = ["1" if i % 3 == 0 else "0" for i in range(24)]
    nih = _relabelled_copy(tiny, tmp_path / "nih", ["Cardiomegaly", "Pneumothorax"], {"Effusion": effusion})
    assert set(read_manifest(nih).label_names) <= set(NIH_LABELS)
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        ["train-classifier", "--data", str(nih.parent), "--out", str(out), "--real-frac", "1", "--seeds", "0", *TRAIN],
    )
    assert result.exit_code == 0, result.output
    row = _results(out).iloc[0]
    assert {"auc_Cardiomegaly", "auc_Effusion", "auc_Pneumothorax"} <= set(row.index)
    assert "auc_No Finding" not in row.index and row["n_real"] == 12


def test_train_classifier_cli_errors(tmp_path):
    data = make_tiny_manifest(tmp_path / "real", n=24).parent
    base = ["train-classifier", "--data", str(data), "--out", str(tmp_path / "o"), "--real-frac", "0.5", *TRAIN]
    result = runner.invoke(app, [*base, "--model", "resnet-9000"])
    assert result.exit_code == 2 and "Unknown timm model" in result.output
    result = runner.invoke(app, [*base, "--synthetic", str(tmp_path / "nowhere"), "--mode", "mix"])
    assert result.exit_code == 2 and "No manifest" in result.output


# ---------------------------------------------------------------- summary and figure


def _fake_results() -> pd.DataFrame:
    rows = []
    means = {
        ("real", 0.01): 0.60,
        ("real", 1.0): 0.90,
        ("mix", 0.01): 0.80,
        ("pretrain-finetune", 0.01): 0.61,
        ("synthetic-only", 0.0): 0.70,
    }
    for (mode, frac), mean in means.items():
        for seed, noise in enumerate((-0.01, 0.0, 0.01)):
            rows.append(
                {"real_frac": frac, "n_real": 10, "n_synthetic": 0 if mode == "real" else 100, "mode": mode,
                 "model": "m", "seed": seed, "mauc": mean + noise, "auc_A": mean + noise, "mauc_ci_low": mean - 0.05,
                 "mauc_ci_high": mean + 0.05, "n_test": 50, "best_epoch": seed}
            )  # fmt: skip
    return pd.DataFrame(rows)


def test_paired_gains_summary_and_plot(tmp_path):
    results = _fake_results()
    gains = paired_gains(results).set_index("mode")
    assert gains.loc["mix", "gain_mean"] == pytest.approx(0.20)
    assert gains.loc["mix", "outside_spread"] == 1 and gains.loc["pretrain-finetune", "outside_spread"] == 0
    assert gains.loc["mix", "gap_closed"] == pytest.approx(0.20 / 0.30)
    assert gains.loc["mix", "gap_closed_std"] == pytest.approx(0.0, abs=1e-9)
    assert gains.loc["mix", "gap_outside_spread"]
    # synthetic-only trains on no real image: it is set against all real.
    assert gains.loc["synthetic-only", "against"] == 1.0
    assert gains.loc["synthetic-only", "gain_mean"] == pytest.approx(-0.20)
    summary = summary_markdown(results, "fake")
    assert "| 0.01 | mix | synthetic | +0.200 ± 0.000 (3 seeds) | yes, better | 67% ± 0% | – |" in summary
    assert (
        "| 0.01 | pretrain-finetune | synthetic | +0.010 ± 0.000 (3 seeds) | no (within spread) | 3% ± 0% | 1/3 |"
        in summary
    )
    assert (
        "| 0 | synthetic-only | synthetic | -0.200 ± 0.000 (3 seeds), against real-only at 1 | yes, worse | "
        "78% of all real | – |" in summary
    )
    # Per-label paired gains at the smallest fraction: A gains 0.200 with mix in every seed.
    assert "## Per-label gains at 0.01 real" in summary
    assert "| A | +0.200 ± 0.000 + | +0.010 ± 0.000 + |" in summary
    path = plot_sweep(results, tmp_path / "fig.png")
    assert path.stat().st_size > 10_000


def test_a_gap_to_all_real_inside_the_seed_spread_gets_no_share():
    # All real barely above real only at 1% (0.005 apart, seed std 0.02): the share of that gap a mode "closes"
    # would be noise (here 600%), so the tables say the gap is within the spread instead.
    results = _fake_results()
    noise = results["seed"].map({0: -0.02, 1: 0.0, 2: 0.02})
    results.loc[results["mode"] == "real", "mauc"] = (
        np.where(results.loc[results["mode"] == "real", "real_frac"] == 1.0, 0.605, 0.60)
        + noise[results["mode"] == "real"]
    )
    results.loc[results["mode"] == "mix", "mauc"] = 0.63 + noise[results["mode"] == "mix"]
    gains = paired_gains(results).set_index("mode")
    assert gains.loc["mix", "gap_closed"] == pytest.approx(6.0)
    assert not gains.loc["mix", "gap_outside_spread"]
    headline = headline_markdown(results)
    assert "no gap to all real beyond the spread" in headline and "600%" not in headline
    assert "600% ± 0% (gap within the spread)" in summary_markdown(results, "fake")


def test_headline_tables_pivot_sources_and_mark_gains_outside_the_spread(tmp_path):
    one = _fake_results()
    other = one[one["mode"] != "real"].assign(source="ceiling")
    other["mauc"] += 0.05
    results = pd.concat([one.assign(source=np.where(one["mode"] == "real", "none", "generated")), other])
    headline = headline_markdown(results)
    # ceiling comes after generated (the headline's column order), whatever the order of the rows.
    assert "| real fraction | n real | mode | real only | generated | ceiling |" in headline
    assert "| 0.01 | 10 | mix | 0.600 ± 0.010 | 0.800 ± 0.010 | 0.850 ± 0.010 |" in headline
    assert "| 0 | 0 | synthetic only (no real image) | all real: 0.900 ± 0.010 | 0.700 ± 0.010 | 0.750 ± 0.010 |" in (
        headline
    )
    # Gains: bold outside the spread, the gap closed where there is one, "(worse)" below the spread.
    assert "| 0.01 | 10 | mix | **+0.200 ± 0.000, 67% ± 0%** | **+0.250 ± 0.000, 83% ± 0%** |" in headline
    assert "| 0.01 | 10 | pretrain-finetune | +0.010 ± 0.000, 3% ± 0% | **+0.060 ± 0.000, 20% ± 0%** |" in headline
    assert (
        "| 0 | 0 | synthetic only (no real image) | -0.200 ± 0.000, 78% of all real (worse) | "
        "-0.150 ± 0.000, 83% of all real (worse) |" in headline
    )
    assert summary_markdown(results).count(headline.splitlines()[2]) == 1  # the summary opens with the headline
    assert headline_markdown(results[results["mode"] == "real"]) == ""
    plot_sweep(results, tmp_path / "two_sources.png")  # one panel per mode, a colour per source


def test_generator_seeds_pool_into_one_cell_with_their_own_spread_and_models_stay_apart(tmp_path):
    """Runs of several generators pool into one cell per (model, fraction, mode, source): the ± is the combined
    spread over generators x classifier seeds, the spread between generators (the std of their means) is given
    apart, and each classifier is paired with its own real-only runs."""
    rows = []
    for model, shift in (("small", 0.0), ("big", 0.05)):
        for seed in (0, 1, 2):
            noise = 0.01 * (seed - 1)
            base = {"model": model, "seed": seed, "n_test": 50, "best_epoch": 1, "mauc_ci_low": 0, "mauc_ci_high": 1}
            rows.append({**base, "real_frac": 0.01, "mode": "real", "source": "none", "mauc": 0.6 + shift + noise})
            rows.append({**base, "real_frac": 1.0, "mode": "real", "source": "none", "mauc": 0.9 + shift + noise})
            for g, lift in ((0, 0.15), (1, 0.20), (2, 0.25)):  # three generators, 0.05 apart
                rows.append({**base, "real_frac": 0.01, "mode": "mix", "source": "generated", "generator_seed": g,
                             "mauc": 0.6 + shift + noise + lift})  # fmt: skip
                rows.append({**base, "real_frac": 0.0, "mode": "synthetic-only", "source": "generated",
                             "generator_seed": g, "mauc": 0.81 + shift + noise})  # fmt: skip
    results = pd.DataFrame(rows).assign(n_real=1, n_synthetic=1)
    stats = summarize(results).set_index(["model", "real_frac", "mode", "source"])
    mix = stats.loc[("small", 0.01, "mix", "generated")]
    assert (mix.runs, mix.seeds, mix.generators) == (9, 3, 3)
    assert mix.mauc_mean == pytest.approx(0.8) and mix.mauc_between_generators == pytest.approx(0.05)
    assert np.isnan(stats.loc[("small", 0.01, "real", "none"), "mauc_between_generators"])
    gains = paired_gains(results).set_index(["model", "real_frac", "mode", "source"])
    for model in ("small", "big"):  # each model against its own real-only runs: the same gains
        g = gains.loc[(model, 0.01, "mix", "generated")]
        assert (g.pairs, g.generators) == (9, 3)
        assert g.gain_mean == pytest.approx(0.20) and g.gain_between_generators == pytest.approx(0.05)
        assert g.gap_closed == pytest.approx(0.20 / 0.30) and g.gap_closed_between_generators == pytest.approx(1 / 6)
    only = gains.loc[("big", 0.0, "synthetic-only", "generated")]
    assert only.share_of_all_real == pytest.approx(0.86 / 0.95) and only.against == 1.0
    headline = headline_markdown(results)
    # One block per classifier, in the order the sweep ran them, and the spread between generators in brackets.
    assert "| classifier | real fraction | n real | mode | real only | generated |" in headline
    assert headline.index("| small |") < headline.index("| big |")
    assert "| small | 0.01 | 1 | mix | 0.600 ± 0.010 | 0.800 ± 0.044 (generators ± 0.050) |" in headline
    assert "| big | 0.01 | 1 | mix | **+0.200 ± 0.043, 67% ± 14%** (generators ± 0.050, ± 17%) |" in headline
    assert "| big | 0 | 0 | synthetic only (no real image) | -0.090 ± 0.000, 91% of all real (worse; generators" in (
        headline
    )
    assert "| small | 1 | 1 | mix |" not in headline  # no mix run at all real: no row
    summary = summary_markdown(results)
    assert "| small | 0.01 | mix | generated | +0.200 ± 0.043 (9 runs, 3 generators) | yes, better |" in summary
    assert "## Per-label" not in summary or "small" in summary
    plot_sweep(results, tmp_path / "two_models.png")  # a row of panels per model


# ---------------------------------------------------------------- the ceiling


def test_ceiling_is_clean_all_train_new_patients_and_reused(tmp_path):
    from diffcxr_aug.augment.ceiling import build_ceiling
    from diffcxr_aug.augment.layout import classifier_synthetic, experiment_paths
    from diffcxr_aug.config import load_recipe

    path = build_ceiling(tmp_path / "ceiling", n=12, size=32, seed=0)
    ceiling = read_manifest(path)
    assert len(ceiling) == 12 and set(ceiling.frame["split"]) == {"train"}
    assert (ceiling.frame["noise"] == "").all()
    assert not ceiling.frame["patient_id"].str.startswith("phantom-s0-").any()  # not the real world's patients
    stamp = path.stat().st_mtime_ns
    assert build_ceiling(tmp_path / "ceiling", n=12, size=32, seed=0) == path and path.stat().st_mtime_ns == stamp
    assert len(read_manifest(build_ceiling(tmp_path / "ceiling", n=14, size=32, seed=0))) == 14

    recipe = load_recipe(None, ["data.dataset=nih-cxr14", "classifier.synthetic=ceiling"])
    with pytest.raises(ValueError, match="ceiling renders perfect images from the phantom world"):
        classifier_synthetic(recipe, experiment_paths(recipe))


def test_paired_bootstrap_difference_is_narrower_than_two_intervals():
    from diffcxr_aug.classifiers.metrics import bootstrap_mauc_ci, paired_bootstrap_mauc_difference

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(300, 3)).astype(float)
    shared = rng.normal(size=y.shape)  # what both sets' scores have in common (the prompts)
    a = y + shared + 0.3 * rng.normal(size=y.shape)
    b = 0.8 * y + shared + 0.3 * rng.normal(size=y.shape)
    diff, low, high = paired_bootstrap_mauc_difference(y, a, b, n_bootstrap=300, rng=1)
    assert low < diff < high and low > 0  # a is the better scorer, and the paired interval shows it
    a_low, a_high = bootstrap_mauc_ci(y, a, n_bootstrap=300, rng=1)
    b_low, b_high = bootstrap_mauc_ci(y, b, n_bootstrap=300, rng=1)
    assert a_low < b_high  # the two separate intervals overlap ...
    assert high - low < 0.5 * ((a_high - a_low) + (b_high - b_low))  # ... the paired one is much narrower
    assert paired_bootstrap_mauc_difference(y, a, a, n_bootstrap=50) == (0.0, 0.0, 0.0)
