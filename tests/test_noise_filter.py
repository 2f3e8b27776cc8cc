"""LNFS: the estimator on synthetic latents, and ``diffcxr-aug filter`` end to end on tiny manifests."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from diffcxr_aug.cli import app
from diffcxr_aug.data.dataset import equalize
from diffcxr_aug.data.images import load_image, save_png
from diffcxr_aug.data.manifest import read_manifest, write_manifest
from diffcxr_aug.generator.latent_store import open_latent_store
from diffcxr_aug.generator.noise_filter import FilterScores, LatentNoiseFilter, evaluate_scores, run_filter
from diffcxr_aug.generator.noise_filter.scoring import estimate_contamination
from diffcxr_aug.generator.settings import FilterSettings, GeneratorSettings
from diffcxr_aug.generator.training import train_generator
from diffcxr_aug.generator.vae import build_vae, load_vae
from tests.conftest import make_tiny_manifest

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


# Small and quick: enough steps to learn the synthetic sets below, a few seconds per fit.
FAST = dict(n_clusters=4, manifold_components=16, discriminator_steps=150, folds=3, progress=False)


def normal_latents(n: int, seed: int, noise: float = 0.3) -> torch.Tensor:
    """Normal images: one template plus five modes of variation plus per-pixel noise, as (n, 4, 8, 8)."""
    g = torch.Generator().manual_seed(seed)
    template = torch.randn(4, 8, 8, generator=g)
    basis = torch.randn(5, 4, 8, 8, generator=g)
    coef = torch.randn(n, 5, 1, 1, 1, generator=g)
    return template + 0.4 * (coef * basis).sum(1) + noise * torch.randn(n, 4, 8, 8, generator=g)


def contaminated(n_normal: int = 300, n_per_kind: int = 8, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """A normal blob plus far-off kinds: inverted, rotated, a bright local mark, a global shift."""
    base = normal_latents(n_normal + 4 * n_per_kind, seed)
    normal, rest = base[:n_normal], base[n_normal:].clone()
    k = n_per_kind
    rest[:k] = -rest[:k]  # inverted
    rest[k : 2 * k] = rest[k : 2 * k].rot90(1, (2, 3))  # rotated
    rest[2 * k : 3 * k, :, :3, :3] += 3.0  # a burnt-in mark
    rest[3 * k :] += 2.0  # over-exposure
    return torch.cat([normal, rest]), np.r_[np.zeros(n_normal), np.ones(4 * k)].astype(bool)


def test_separates_synthetic_outliers_at_every_stage():
    latents, noisy = contaminated()
    filt = LatentNoiseFilter(contamination=0.1, **FAST).fit(latents)
    scores = filt.train_scores_
    assert roc_auc_score(noisy, scores.kmeans) > 0.9
    assert roc_auc_score(noisy, scores.manifold) > 0.95
    assert roc_auc_score(noisy, scores.final) > 0.95
    # The confident normal set is drawn from the clean images.
    assert noisy[filt.normal_mask_].mean() < 0.02
    # Scoring new images uses the fitted model: fresh normals score low, a fresh inverted one high.
    fresh = normal_latents(40, seed=0)[-20:]  # same template (seed), new draws
    new = filt.score(torch.cat([fresh, -fresh[:1]])).final
    assert new[-1] > np.quantile(new[:-1], 0.9)
    assert filt.predict(torch.cat([fresh, -fresh[:1]])).dtype == bool


def test_contamination_threshold_flags_that_share():
    latents, _ = contaminated()
    for contamination in (0.05, 0.2):
        filt = LatentNoiseFilter(threshold="contamination", contamination=contamination, **FAST).fit(latents)
        assert abs(int(filt.flagged_.sum()) - contamination * len(latents)) <= 1


def test_threshold_is_not_lost_when_probabilities_saturate():
    """Far-off images push the discriminator's probability to exactly 1.0 in float64 (log-odds above ~37). When
    more of them than the contamination share tie there, the threshold must still flag that share."""
    logits = np.r_[np.linspace(-8.0, 2.0, 80), np.linspace(40.0, 90.0, 20)]  # 20% saturate
    filt = LatentNoiseFilter(threshold="contamination", contamination=0.1, progress=False)
    assert (FilterScores(logits, logits, logits, logits).final == 1.0).sum() == 20
    flagged = filt._fit_threshold(logits, np.ones(100, dtype=bool))
    assert flagged.sum() == 10 and flagged[-10:].all()
    assert filt.threshold_ == 1.0  # reported on the probability scale of the score column
    quantile = LatentNoiseFilter(threshold="quantile", quantile=0.5, progress=False)
    assert quantile._fit_threshold(logits, np.arange(100) < 80).sum() == 60


def test_estimated_contamination_reads_the_upper_mode():
    rng = np.random.default_rng(0)
    two_modes = np.r_[rng.normal(0.0, 1.0, 950), rng.normal(10.0, 1.0, 50)]
    assert estimate_contamination(two_modes) == pytest.approx(0.05, abs=0.01)
    assert estimate_contamination(rng.normal(0.0, 1.0, 1000)) == 0.0  # one mode: no noisy component
    assert estimate_contamination(np.zeros(500)) == 0.0 and estimate_contamination(np.arange(5.0)) == 0.0


def test_quantile_threshold_follows_the_data():
    # With the contamination rule the count is fixed; with the quantile rule it grows with the noise.
    flagged = []
    for n_per_kind in (4, 16):
        latents, noisy = contaminated(n_per_kind=n_per_kind)
        filt = LatentNoiseFilter(threshold="quantile", quantile=0.98, **FAST).fit(latents)
        normal_scores = filt.train_scores_.final[filt.normal_mask_]
        assert (normal_scores > filt.threshold_).sum() <= np.ceil(0.02 * len(normal_scores))
        assert filt.flagged_[noisy].mean() > 0.9
        flagged.append(int(filt.flagged_.sum()))
    assert flagged[1] > flagged[0] + 30


def test_known_noisy_examples_teach_the_discriminator():
    # A faint mark in one corner: hard to see for the unsupervised stages, learnable from examples.
    latents = normal_latents(440, seed=0)
    latents[400:, 0, :2, :2] += 1.2
    noisy = np.r_[np.zeros(400), np.ones(40)].astype(bool)
    known = np.zeros(440, dtype=bool)
    known[400:420] = True
    held_out = ~noisy | (np.arange(440) >= 420)

    filt_plain = LatentNoiseFilter(**FAST).fit(latents)
    filt_known = LatentNoiseFilter(**FAST).fit(latents, known_noisy=known)
    auc_plain = roc_auc_score(noisy[held_out], filt_plain.train_scores_.final[held_out])
    auc_known = roc_auc_score(noisy[held_out], filt_known.train_scores_.final[held_out])
    assert auc_known > auc_plain + 0.03
    assert filt_known.flagged_[known].all()
    assert (filt_known.pseudo_label_[known] == 1).all()
    assert not filt_known.normal_mask_[known].any()

    # The same examples given as images outside the collection help too.
    extra = latents[400:420]
    rows = np.r_[0:400, 420:440]
    filt_extra = LatentNoiseFilter(**FAST).fit(latents[rows], extra_noisy=extra)
    auc_extra = roc_auc_score(noisy[rows], filt_extra.train_scores_.final)
    filt_none = LatentNoiseFilter(**FAST).fit(latents[rows])
    assert auc_extra > roc_auc_score(noisy[rows], filt_none.train_scores_.final)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(threshold="median"), "choose one of: contamination, quantile"),
        (dict(n_clusters=8, min_cluster_share=0.2), "min_cluster_share"),
        (dict(positive_share=0.3, negative_share=0.8), "positive_share"),
        (dict(contamination=0.6), "contamination"),
        (dict(quantile=1.0), "quantile"),
        (dict(folds=1), "folds"),
    ],
)
def test_inconsistent_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LatentNoiseFilter(**kwargs)


def test_bad_latents_are_rejected():
    filt = LatentNoiseFilter(**FAST)
    with pytest.raises(RuntimeError, match="not fitted"):
        filt.score(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="at least"):
        filt.fit(torch.zeros(5, 4, 8, 8))
    latents = normal_latents(60, seed=0)
    bad = latents.clone()
    bad[3, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        filt.fit(bad)
    with pytest.raises(ValueError, match="known_noisy"):
        filt.fit(latents, known_noisy=np.zeros(3, dtype=bool))
    filt.fit(latents)
    with pytest.raises(ValueError, match="do not match"):
        filt.score(torch.zeros(2, 4, 4, 4))


def test_evaluate_scores_reports_each_stage_and_kind():
    frame = pd.DataFrame(
        {
            "score": [0.1, 0.2, 0.3, 0.9, 0.8],
            "kmeans_score": [1, 2, 3, 4, 0],
            "manifold_score": [0.1, 0.2, 0.3, 0.9, 0.8],
            "discriminator_score": [0.1, 0.2, 0.3, 0.9, 0.8],
            "flagged": [0, 0, 1, 1, 0],
        }
    )
    result = evaluate_scores(frame, pd.Series(["", "", "", "inverted", "lateral"]))
    assert result["roc_auc"]["final"] == 1.0
    assert result["roc_auc"]["kmeans"] == pytest.approx(0.5)
    assert result["clean_removed_share"] == pytest.approx(1 / 3)
    assert result["per_kind"]["inverted"]["recall"] == 1.0
    assert result["per_kind"]["lateral"]["recall"] == 0.0


# ------------------------------------------------------------------------------------ the command line
FILTER_RECIPE = """
vae:
  config: tiny
  steps: 2
  batch_size: 4
  crop_size: 16
  size: 32
filter:
  n_clusters: 3
  manifold_components: 8
  discriminator_steps: 20
  threshold: contamination
  contamination: 0.1
"""


@pytest.fixture
def noisy_tiny(tmp_path) -> Path:
    """The tiny manifest with a ``noise`` column: three images inverted, one a blank page."""
    folder = tmp_path / "data"
    make_tiny_manifest(folder, n=30, size=32)
    manifest = read_manifest(folder)
    frame = manifest.frame.copy()
    frame["noise"] = ""
    for i in (1, 7, 20):
        path = folder / frame.loc[i, "image_path"]
        save_png(1.0 - load_image(path), path)
        frame.loc[i, "noise"] = "inverted"
    save_png(np.full((32, 32), 0.95, dtype=np.float32), folder / frame.loc[11, "image_path"])
    frame.loc[11, "noise"] = "not_cxr"
    write_manifest(frame, folder)
    return folder


def test_cli_filter_writes_the_contract_files(noisy_tiny, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(FILTER_RECIPE)
    out = tmp_path / "filtered"
    result = runner.invoke(app, ["filter", "--data", str(noisy_tiny), "--out", str(out), "--recipe", str(recipe)])
    assert result.exit_code == 0, result.output

    scores = pd.read_csv(out / "scores.csv", keep_default_na=False)
    assert list(scores.columns[:3]) == ["image_path", "score", "flagged"]
    for column in ("kmeans_score", "manifold_score", "discriminator_score", "noise"):
        assert column in scores.columns
    assert len(scores) == 30  # every input row
    assert scores["flagged"].sum() == 3  # contamination 0.1 of 30
    # Paths resolve from the output folder, in scores.csv and in the kept manifest alike.
    assert all((out / p).is_file() for p in scores["image_path"])
    kept = read_manifest(out)
    assert len(kept) == 30 - 3
    assert all(p.is_file() for p in kept.image_paths())
    assert set(kept.frame["image_path"]) == set(scores.loc[scores["flagged"] == 0, "image_path"])
    # Without --vae the recipe's VAE is trained here first, with its `vae` section's batch, crop and size.
    vae_metrics = json.loads((out / "vae" / "metrics.json").read_text())
    assert (vae_metrics["batch_size"], vae_metrics["crop_size"], vae_metrics["size"], vae_metrics["seed"]) == (
        4,
        16,
        32,
        0,
    )

    report = json.loads((out / "filter_report.json").read_text())
    assert report["images"] == 30 and report["flagged"] == 3
    assert report["threshold"]["flagged_share"] == pytest.approx(0.1)
    assert 0.0 <= report["threshold"]["estimated_contamination"] < 0.5
    assert report["dropped_by_view"]["rows"] == 0  # filter alone keeps every view
    assert set(report["evaluation"]["roc_auc"]) == {"final", "kmeans", "manifold", "discriminator"}
    assert set(report["evaluation"]["per_kind"]) == {"inverted", "not_cxr"}
    assert report["vae"]["trained_here"]
    for name in ("montage_flagged.png", "montage_borderline.png", "vae/config.json"):
        assert (out / name).is_file(), name


def test_cli_filter_with_given_vae_and_known_noisy(noisy_tiny, tmp_path):
    torch.manual_seed(0)
    vae_dir = tmp_path / "vae"
    build_vae("tiny", sample_size=32).save_pretrained(vae_dir)
    frame = read_manifest(noisy_tiny).frame
    known = tmp_path / "known.csv"
    pd.DataFrame({"image_path": [frame.loc[1, "image_path"], str(noisy_tiny / frame.loc[7, "image_path"])]}).to_csv(
        known, index=False
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(FILTER_RECIPE)
    out = tmp_path / "filtered"
    args = ["filter", "--data", str(noisy_tiny), "--out", str(out), "--recipe", str(recipe)]
    args += ["--vae", str(vae_dir), "--known-noisy", str(known), "--threshold", "quantile", "--quantile", "0.9"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False)
    assert scores.loc[[1, 7], "known_noisy"].tolist() == [1, 1]
    assert scores.loc[[1, 7], "flagged"].tolist() == [1, 1]
    assert not (out / "vae").exists()  # the given VAE is used, none trained
    report = json.loads((out / "filter_report.json").read_text())
    assert report["threshold"]["rule"] == "quantile"
    assert report["known_noisy"] == {"in_manifest": 2, "extra_images": 0}


def test_drop_views_removes_rows_by_metadata_before_lnfs(noisy_tiny, tmp_path):
    """Rows whose view is in --drop-views never reach the latents: flagged with their reason in scores.csv (every
    input row kept, in order), out of the kept manifest, counted in the report; the rest are scored by LNFS."""
    frame = read_manifest(noisy_tiny).frame
    frame.loc[[3, 4, 20], "view"] = "LATERAL"  # 20 is also inverted: its noise is found by metadata first
    frame.loc[3, "noise"] = "lateral"
    write_manifest(frame, noisy_tiny)
    torch.manual_seed(0)
    vae_dir = tmp_path / "vae"
    build_vae("tiny", sample_size=32).save_pretrained(vae_dir)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(FILTER_RECIPE)
    out = tmp_path / "filtered"
    args = ["filter", "--data", str(noisy_tiny), "--out", str(out), "--recipe", str(recipe), "--vae", str(vae_dir)]
    result = runner.invoke(app, [*args, "--drop-views", "lateral"])
    assert result.exit_code == 0, result.output
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False)
    assert len(scores) == 30 and scores["image_path"].tolist() == [
        os.path.relpath(p.resolve(), out.resolve()) for p in read_manifest(noisy_tiny).image_paths()
    ]
    assert scores.loc[[3, 4, 20], "reason"].tolist() == ["view LATERAL"] * 3
    assert scores.loc[[3, 4, 20], "flagged"].tolist() == [1, 1, 1]
    assert (scores.loc[[3, 4, 20], "score"] == "").all()  # never scored
    lnfs = scores.drop(index=[3, 4, 20])
    assert (lnfs["score"] != "").all() and set(lnfs.loc[lnfs["flagged"] == 1, "reason"]) == {"lnfs"}
    assert lnfs["flagged"].sum() == 3  # contamination 0.1 of the 27 LNFS saw, rounded as np.quantile does
    kept = read_manifest(out).frame
    assert len(kept) == 30 - 3 - 3 and (kept["view"] != "LATERAL").all()
    report = json.loads((out / "filter_report.json").read_text())
    assert report["dropped_by_view"] == {
        "views": ["LATERAL"], "rows": 3, "by_view": {"LATERAL": 3}, "noisy_rows": 2, "clean_rows": 1
    }  # fmt: skip
    assert report["images"] == 27 and report["flagged"] == 3
    # Off by default for filter alone; an unknown view is one line naming the allowed ones; all dropped: an error.
    result = runner.invoke(app, [*args[:4], str(tmp_path / "all"), *args[5:]])
    assert result.exit_code == 0 and len(pd.read_csv(tmp_path / "all" / "manifest.csv")) == 27
    result = runner.invoke(app, [*args[:4], str(tmp_path / "bad"), *args[5:], "--drop-views", "side"])
    assert result.exit_code == 2 and "--drop-views" in result.output and "LATERAL" in result.output
    frame["view"] = "LATERAL"
    write_manifest(frame, noisy_tiny)
    result = runner.invoke(app, [*args[:4], str(tmp_path / "none"), *args[5:], "--drop-views", "LATERAL"])
    assert result.exit_code == 2 and "nothing is left to filter" in result.output


def test_train_vae_then_filter_and_generator_encode_with_that_one_vae(noisy_tiny, tmp_path):
    """`train-vae` makes the latent space; `filter --vae` and `train-generator --vae` read it and train no other."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(FILTER_RECIPE + "generator:\n  config: tiny\n  mixed_precision: 'no'\n")
    vae = tmp_path / "vae"
    result = runner.invoke(app, ["train-vae", "--data", str(noisy_tiny), "--out", str(vae), "--recipe", str(recipe)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((vae / "metrics.json").read_text())
    assert (metrics["config"], metrics["steps"], metrics["batch_size"], metrics["crop_size"], metrics["size"]) == (
        "tiny", 2, 4, 16, 32
    )  # fmt: skip
    args = ["filter", "--data", str(noisy_tiny), "--out", str(tmp_path / "f"), "--recipe", str(recipe)]
    result = runner.invoke(app, [*args, "--vae", str(vae)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "f" / "filter_report.json").read_text())
    assert report["vae"]["source"] == str(vae) and report["vae"]["psnr"] == metrics["psnr"]  # its record travels
    assert report["image_size"] == 32 and not (tmp_path / "f" / "vae").exists()
    args = ["train-generator", "--data", str(tmp_path / "f"), "--out", str(tmp_path / "g"), "--recipe", str(recipe)]
    result = runner.invoke(app, [*args, "--vae", str(vae), "--max-steps", "1", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "g" / "training_info.json").read_text())
    assert info["vae"]["vae"] == str(vae) and info["vae"]["trained"] is False
    assert info["vae"]["metrics"]["psnr"] == metrics["psnr"] and not (tmp_path / "g" / "trained_vae").exists()
    # Without --vae, train-generator trains the recipe's VAE itself, with the recipe's `vae` settings.
    args = ["train-generator", "--data", str(tmp_path / "f"), "--out", str(tmp_path / "g2"), "--recipe", str(recipe)]
    result = runner.invoke(app, [*args, "--max-steps", "1", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    own = json.loads((tmp_path / "g2" / "trained_vae" / "metrics.json").read_text())
    assert (own["config"], own["steps"], own["batch_size"], own["crop_size"], own["size"]) == ("tiny", 2, 4, 16, 32)
    # --vae-steps trains a VAE, which --vae says not to do.
    args = ["filter", "--data", str(noisy_tiny), "--out", str(tmp_path / "f3"), "--vae", str(vae), "--vae-steps", "3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "none is trained" in result.output
    # A pretrained VAE has nothing to train.
    pretrained = tmp_path / "p.yaml"
    pretrained.write_text(f"vae:\n  pretrained: {vae}\n")
    result = runner.invoke(app, ["train-vae", "--data", str(noisy_tiny), "--out", str(tmp_path / "v2")] + [
        "--recipe", str(pretrained)])  # fmt: skip
    assert result.exit_code == 2 and "nothing to train" in result.output


def test_filter_and_generator_share_one_latent_store(noisy_tiny, tmp_path, caplog):
    """LNFS encodes the manifest into its latent store and copies the kept rows' latents into the kept manifest's
    store; a generator with the same VAE reads either and encodes no image. Equalised latents are a store of their
    own, and a generator never reads them, so none is copied."""
    torch.manual_seed(0)
    vae_dir = tmp_path / "vae"
    build_vae("tiny", sample_size=32).save_pretrained(vae_dir)
    section = FilterSettings(
        n_clusters=3, manifold_components=8, discriminator_steps=20, threshold="contamination", contamination=0.1
    )
    generator = GeneratorSettings(
        config="tiny", vae=str(vae_dir), max_steps=1, batch_size=2, num_validation_reports=1, validation_steps=1,
        mixed_precision="no",
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="diffcxr_aug.generator.latent_store"):
        run_filter(noisy_tiny, tmp_path / "f", section, vae=vae_dir, size=32, device="cpu", progress=False)
        train_generator(noisy_tiny, tmp_path / "g", generator, device="cpu")
        train_generator(tmp_path / "f", tmp_path / "g-kept", generator, device="cpu")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("latent store")]
    store, kept = (next((folder / "cache").glob("latents_32_*.npy")) for folder in (noisy_tiny, tmp_path / "f"))
    assert lines == [
        f"latent store {store}: encoded 30 of 30 images (0 reused)",
        f"latent store {kept}: encoded 0 of 27 images (27 copied from {store})",
        f"latent store {store}: encoded 0 of 30 images (30 reused)",
        f"latent store {kept}: encoded 0 of 27 images (27 reused)",
    ]
    flagged = pd.read_csv(tmp_path / "f" / "scores.csv")["flagged"].to_numpy(dtype=bool)
    np.testing.assert_array_equal(np.load(kept), np.load(store)[~flagged])
    opened = open_latent_store(read_manifest(tmp_path / "f"), load_vae(vae_dir), 32, build=False, device="cpu")
    assert opened.path == kept and opened.encoded == 0

    caplog.clear()
    equalized = section.model_copy(update={"normalize": "equalize"})
    with caplog.at_level(logging.INFO, logger="diffcxr_aug.generator.latent_store"):
        run_filter(noisy_tiny, tmp_path / "fe", equalized, vae=vae_dir, size=32, device="cpu", progress=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("latent store")]
    assert len(lines) == 1 and re.fullmatch(r"latent store (\S+): encoded 30 of 30 images \(0 reused\)", lines[0])
    assert str(store) not in lines[0] and not (tmp_path / "fe" / "cache").exists()


def test_cli_filter_bad_input_exits_2_with_one_line(tmp_path, noisy_tiny):
    result = runner.invoke(app, ["filter", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "No manifest at" in result.output
    assert len(result.output.strip().splitlines()) == 1

    known = tmp_path / "known.csv"
    known.write_text("image_path\nimages/missing.png\n")
    result = runner.invoke(
        app, ["filter", "--data", str(noisy_tiny), "--out", str(tmp_path / "o"), "--known-noisy", str(known)]
    )
    assert result.exit_code == 2
    assert "row 2" in result.output and "missing.png" in result.output

    result = runner.invoke(app, ["filter", "--data", str(noisy_tiny), "--out", str(noisy_tiny)])
    assert result.exit_code == 2 and "data folder" in result.output

    result = runner.invoke(
        app, ["filter", "--data", str(noisy_tiny), "--out", str(tmp_path / "o"), "--threshold", "median"]
    )
    assert result.exit_code == 2 and "--threshold" in result.output
    result = runner.invoke(
        app, ["filter", "--data", str(noisy_tiny), "--out", str(tmp_path / "o"), "--normalize", "clahe"]
    )
    assert result.exit_code == 2 and "--normalize" in result.output and "equalize" in result.output


def test_equalize_flattens_grey_levels_whatever_the_exposure():
    g = torch.Generator().manual_seed(0)
    film = (torch.rand(1, 12, 12, generator=g) * 100).round() / 255  # a dim, low-contrast 144-pixel film
    flat = equalize(film)
    levels = torch.unique(film)
    # Each level becomes its mid-rank: the share of pixels below it plus half of those at it.
    for level in levels[:: max(1, len(levels) // 7)]:
        below, at = (film < level).float().mean(), (film == level).float().mean()
        assert flat[film == level].unique().item() == pytest.approx(float(below + at / 2))
    assert flat.min() > 0 and flat.max() < 1 and flat.mean().item() == pytest.approx(0.5, abs=1e-6)
    # Brighter or contrast-stretched (any increasing map of the levels): the same equalised film.
    assert torch.equal(equalize(film * 2.5), flat) and torch.equal(equalize(film + 120 / 255), flat)
    assert not torch.equal(equalize(1 - film), flat)  # inversion is not an exposure change


def test_filter_normalize_equalize_scores_films_as_their_grey_level_order(noisy_tiny, tmp_path):
    """With --normalize equalize, LNFS scores the same films at other exposures exactly as before (the VAE sees
    the equalised films); as they are, the exposure changes the scores."""
    manifest = read_manifest(noisy_tiny)
    dim = tmp_path / "dim"
    write_manifest(manifest.frame, dim / "manifest.csv")
    exposed = tmp_path / "exposed"
    write_manifest(manifest.frame, exposed / "manifest.csv")
    for i, (rel, path) in enumerate(zip(manifest.frame["image_path"], manifest.image_paths(), strict=True)):
        levels = np.round(load_image(path) * 255).astype(np.uint8) // 2  # 0-127
        save_png(levels, dim / rel)
        # Every other film brighter, the rest stretched: increasing maps of the levels, different per film.
        save_png(levels + 100 if i % 2 else levels * 2, exposed / rel)
    torch.manual_seed(0)
    vae_dir = tmp_path / "vae"
    build_vae("tiny", sample_size=32).save_pretrained(vae_dir)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(FILTER_RECIPE)

    def scores(data: Path, normalize: str) -> pd.DataFrame:
        out = tmp_path / f"{data.name}-{normalize}"
        args = ["filter", "--data", str(data), "--out", str(out), "--recipe", str(recipe), "--vae", str(vae_dir)]
        result = runner.invoke(app, [*args, "--normalize", normalize])
        assert result.exit_code == 0, result.output
        assert json.loads((out / "filter_report.json").read_text())["normalize"] == normalize
        return pd.read_csv(out / "scores.csv").drop(columns="image_path")

    pd.testing.assert_frame_equal(scores(dim, "equalize"), scores(exposed, "equalize"))
    as_they_are = scores(dim, "none")["score_logit"], scores(exposed, "none")["score_logit"]
    assert not np.allclose(*as_they_are)


def test_cli_filter_small_value_edges(tmp_path, noisy_tiny):
    """The smallest values of the filter's options: each runs, or exits 2 naming the option and its range."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(FILTER_RECIPE)
    base = ["filter", "--data", str(noisy_tiny), "--recipe", str(recipe)]
    # 20 VAE steps: a 5% warm-up of exactly one step, where torch's OneCycleLR divided by zero.
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "o20"), "--vae-steps", "20"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "o20" / "vae" / "metrics.json").read_text())["steps"] == 20
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "o2"), "--n-clusters", "2", "--vae-steps", "1"])
    assert result.exit_code == 0, result.output
    for option, value, message in [
        ("--vae-steps", "0", "--vae-steps 0: Input should be greater than or equal to 1"),
        ("--n-clusters", "1", "--n-clusters 1: Input should be greater than or equal to 2"),
        ("--n-clusters", "29", "min_cluster_share 0.05 must lie in (0, 1 / n_clusters = 0.03448]"),
        ("--contamination", "0", "--contamination 0.0: Input should be greater than 0"),
        ("--quantile", "0", "--quantile 0.0: Input should be greater than 0"),
        ("--image-size", "8", "--image-size 8: Input should be greater than or equal to 16"),
        ("--image-size", "17", "image size 17 is not divisible by the VAE's downsampling factor 2"),
    ]:
        result = runner.invoke(app, [*base, "--out", str(tmp_path / "bad"), option, value])
        assert result.exit_code == 2 and message in result.output, (option, value, result.output)
        assert len(result.output.strip().splitlines()) == 1
