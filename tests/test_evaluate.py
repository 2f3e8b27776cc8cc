"""`evaluate`: FID/KID, faithfulness, privacy and compute in a reference classifier's feature space."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from scipy import linalg
from typer.testing import CliRunner

from diffcxr_aug.cli import app
from diffcxr_aug.data.manifest import read_manifest, write_manifest
from diffcxr_aug.evaluation.fidelity import density_coverage, feature_distances, per_label_fidelity, precision_recall
from diffcxr_aug.evaluation.judge import mask_labels, thin_labels
from diffcxr_aug.evaluation.privacy import (
    _centred,
    aligned_similarity,
    nearest_neighbours,
    pixel_privacy,
    privacy,
)
from tests.conftest import make_tiny_manifest

pytestmark = pytest.mark.usefixtures("one_thread")


def closed_form_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_feature_distances_agree_with_the_closed_form_and_grow_with_a_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 6)), rng.normal(size=(300, 6))
    near = feature_distances(a, b)
    assert near["fid"] == pytest.approx(closed_form_fid(a, b), rel=1e-4, abs=1e-6)
    shifted = feature_distances(a, b + 2.0)
    # A mean shift of 2 in each of 6 dimensions adds 6 * 2**2 = 24 to the FID.
    assert shifted["fid"] - near["fid"] == pytest.approx(24.0, rel=0.05)
    assert shifted["kid"] > 10 * max(near["kid"], 1e-4)
    assert (near["n_real"], near["n_synthetic"], near["n_synthetic_fid"]) == (400, 300, 300)
    # FID on 100 of the 300 rows: a different (noisier) estimate; KID still uses every row.
    fewer = feature_distances(a, b, fid_images=100)
    assert fewer["n_synthetic_fid"] == 100 and fewer["fid"] != near["fid"] and fewer["kid"] == near["kid"]
    with pytest.raises(ValueError, match="at least 2"):
        feature_distances(a, b[:1])


def test_density_and_coverage_by_hand():
    """Real points 0..9 on a line, k = 1: every real ball has radius 1. A synthetic point at 0.5 lies in the balls of
    0 and 1, one at 100 in none: density (2 + 0) / (1 x 2) = 1.0, coverage 2 of 10 balls = 0.2."""
    real = np.arange(10, dtype=float).reshape(-1, 1)
    assert density_coverage(real, np.array([[0.5], [100.0]]), k=1) == {"density": 1.0, "coverage": 0.2}
    # Crowding one region: density rises above 1 while coverage stays low; a spread copy covers everything.
    assert density_coverage(real, np.full((4, 1), 4.5), k=1) == {"density": 2.0, "coverage": 0.2}
    assert density_coverage(real, real + 0.1, k=1)["coverage"] == 1.0
    with pytest.raises(ValueError, match="needs more than 3 rows"):
        density_coverage(real, real[:3])


def test_precision_recall_density_coverage_equal_the_prdc_reference():
    """The reference implementation of Naeem et al. (the ``prdc`` package, MIT) on the same features gives the same
    four numbers. It is kept as the check, not the implementation: it holds every pairwise distance in memory
    (N x M floats: 800 MB at 10,000 x 10,000), where ours streams them in chunks."""
    import prdc  # a test extra

    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(300, 16)), rng.normal(loc=0.3, scale=1.2, size=(250, 16))
    for k in (3, 5):
        reference = prdc.compute_prdc(real, fake, nearest_k=k)
        ours = {**precision_recall(real, fake, k), **density_coverage(real, fake, k)}
        for name in ("precision", "recall", "density", "coverage"):
            assert ours[name] == pytest.approx(float(reference[name]), abs=1e-12), name
        assert 0.0 < ours["precision"] < 1.0 and 0.0 < ours["coverage"] < 1.0  # not a trivial agreement


def test_per_label_fid_compares_positives_and_sets_a_floor():
    """Label A's synthetic positives are drawn off the real ones (FID far above its floor), label B's like them;
    label C has too few positives for a number."""
    rng = np.random.default_rng(3)

    def split(n: int, shift_a: float = 0.0):
        labels = np.zeros((n, 3))
        labels[: n // 2, 0] = 1
        labels[n // 2 :, 1] = 1
        labels[:5, 2] = 1
        x = rng.normal(size=(n, 4))
        x[labels[:, 0] == 1] += shift_a
        return x, labels

    result = per_label_fidelity(split(200), split(200), split(200, shift_a=3.0), ["A", "B", "C"])
    assert result["A"]["fid"] > 10 * max(result["A"]["floor"]["fid"], 0.1)
    assert result["B"]["fid"] < 1.0 and result["A"]["n_synthetic"] == result["A"]["n_real"] == 100
    assert "fid" not in result["C"] and "fewer than 20" in result["C"]["note"] and result["C"]["n_real"] == 5


def test_precision_counts_images_off_the_real_manifold_and_recall_the_variety_covered():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(500, 8))
    alike = precision_recall(real, rng.normal(size=(300, 8)))
    assert alike["precision"] > 0.8 and alike["recall"] > 0.8
    # A quarter of the images far from every real one (malformed, noise-like): precision falls by that quarter.
    broken = np.concatenate([rng.normal(size=(225, 8)), rng.normal(size=(75, 8)) + 12.0])
    spoiled = precision_recall(real, broken)
    assert spoiled["precision"] == pytest.approx(alike["precision"] * 0.75, abs=0.05)
    # Every image near one mode of the real data: precise, but it covers little of the real variety.
    collapsed = precision_recall(real, 0.1 * rng.normal(size=(300, 8)))
    assert collapsed["precision"] > 0.9 and collapsed["recall"] < 0.3
    with pytest.raises(ValueError, match="more than 3 rows"):
        precision_recall(real, real[:3])
    # feature_distances reports them, and leaves them empty for sets too small to have 3 neighbours.
    assert feature_distances(real, broken)["precision"] == spoiled["precision"]
    assert feature_distances(real, real[:3])["precision"] is None


def test_privacy_flags_copies_of_training_images_and_few_fresh_ones():
    rng = np.random.default_rng(1)
    train, held_out = rng.normal(size=(500, 32)), rng.normal(size=(300, 32))
    copies = train[:40] + 1e-3 * rng.normal(size=(40, 32))
    fresh = rng.normal(size=(400, 32))
    sim, where = nearest_neighbours(copies, train)
    assert (where == np.arange(40)).all() and (sim > 0.999).all()
    result = privacy(np.concatenate([copies, fresh]), train, held_out)
    # Every near-copy is flagged; fresh draws are flagged at about the held-out rate (1%).
    assert 40 <= result["flagged"] <= 40 + 16
    medians = result["nn_similarity_synthetic_median"], result["nn_similarity_real_test_median"]
    assert medians[0] == pytest.approx(medians[1], abs=0.05)


def films(n, side, seed):
    """Films like chest X-rays to a copy detector: one shared anatomy (a smooth template) and each film's own detail,
    so unrelated films correlate highly and only alignment tells a copy. In [0, 1]."""
    from torchvision.transforms.functional import gaussian_blur

    template = gaussian_blur(torch.rand(1, 1, side, side, generator=torch.Generator().manual_seed(99)), 31, 5.0)
    detail = gaussian_blur(torch.rand(n, 1, side, side, generator=torch.Generator().manual_seed(seed)), 7, 1.0)
    x = (template - template.mean()) / template.std() + 0.5 * (detail - detail.mean()) / detail.std()
    low, high = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    return (x - low) / (high - low)


def cropped(film, scale, corner):
    """A window of ``scale`` x the side at ``corner`` (y, x), resized back with PIL, as an image editor would."""
    side = film.shape[-1]
    window = int(side * scale)
    y, x = corner
    img = Image.fromarray((film[0, y : y + window, x : x + window].numpy() * 255).astype(np.uint8))
    return torch.from_numpy(np.asarray(img.resize((side, side), Image.Resampling.BILINEAR)) / 255.0).float()[None]


def test_pixel_space_finds_mirrored_cropped_and_noisy_copies():
    train, held_out, fresh = films(120, 32, 0), films(200, 32, 1), films(100, 32, 2)
    g = torch.Generator().manual_seed(3)
    copies = torch.cat(
        [
            train[:4],
            train[4:8].flip(-1),
            train[8:12] + 0.03 * torch.randn(4, 1, 32, 32, generator=g),
            torch.stack(
                [
                    cropped(train[12 + i], s, c)
                    for i, (s, c) in enumerate([(0.86, (0, 0)), (0.86, (4, 0)), (0.86, (0, 4)), (0.88, (3, 3))])
                ]
            ),
            cropped(train[16], 0.82, (5, 1))[None],  # a window of 26 / 32 = 81% of the side
            cropped(train[17], 0.88, (3, 0))[None].flip(-1),  # cropped off-centre, then mirrored
        ]
    )
    held_out_similarity = aligned_similarity(held_out, train)[0]
    result = pixel_privacy(torch.cat([copies, fresh]), train, held_out_similarity)
    # Without alignment the crops fall among unrelated films: their plain correlation is below the held-out films'.
    plain = (_centred(copies[12:]) @ _centred(train).T).amax(dim=1)
    assert (plain < (_centred(held_out) @ _centred(train).T).amax(dim=1).quantile(0.995)).all()
    assert result["_flags"][:18].all() and result["_flags"][18:].mean() <= 0.04  # about 1 in 200 expected
    assert (result["_neighbour"][:18] == np.arange(18)).all() and result["side"] == 32
    # Chunks of training films, of query-candidate pairs (fewer than the candidates) and of queries change nothing.
    sims, where = aligned_similarity(copies, train)
    small_sims, small_where = aligned_similarity(copies, train, chunk=2, query_chunk=5)
    assert np.allclose(sims, small_sims, atol=1e-5) and (where == small_where).all()
    assert (sims[12:] > 0.98).all() and (sims[:4] > 0.9999).all()
    with pytest.raises(ValueError, match="held-out"):
        pixel_privacy(copies, train, np.zeros(0))


def synthetic_like(real_folder, out, rows):
    """A synthetic manifest (the schema `synthesize` writes) whose images are copies of real rows."""
    real = read_manifest(real_folder)
    frame = real.frame.loc[rows].copy().reset_index(drop=True)
    (out / "images").mkdir(parents=True)
    for i, path in enumerate(real.image_paths()[k] for k in real.frame.index.get_indexer(rows)):
        shutil.copy(path, out / "images" / f"{i:06d}.png")
    frame["image_path"] = [f"images/{i:06d}.png" for i in range(len(frame))]
    frame["patient_id"] = frame["study_id"] = [f"synthetic-{i}" for i in range(len(frame))]
    frame["split"], frame["prompt"], frame["seed"] = "train", frame["report"], [str(i) for i in range(len(frame))]
    return write_manifest(frame, out)


def test_evaluate_cli_reports_every_measure_and_reuses_its_classifier(tmp_path):
    real = make_tiny_manifest(tmp_path / "real", n=48, size=32, seed=0).parent
    frame = read_manifest(real).frame
    memorised = synthetic_like(real, tmp_path / "memorised", frame.index[frame["split"] == "train"][:12]).parent
    other = make_tiny_manifest(tmp_path / "other", n=24, size=32, seed=7).parent
    fresh = synthetic_like(other, tmp_path / "fresh", read_manifest(other).frame.index).parent
    twin = shutil.copytree(fresh, tmp_path / "twin")  # same prompts and seeds as `fresh`, so paired with it
    out = tmp_path / "eval"
    args = ["evaluate", "--real", str(real), "--synthetic", f"memorised={memorised}", "--synthetic", f"fresh={fresh}"]
    args += ["--synthetic", f"twin={twin}"]
    args += ["--out", str(out), "--epochs", "1", "--device", "cpu", "--seed", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["synthetic"]) == {"memorised", "fresh", "twin"}
    # Only fresh and twin share prompts and seeds; identical images differ by exactly nothing.
    assert [(row["a"], row["b"]) for row in report["paired"]] == [("fresh", "twin")]
    assert report["paired"][0]["mauc_difference"] == 0.0 and report["paired"][0]["ci95"] == [0.0, 0.0]
    assert report["classifier"]["size"] == 32 and report["feature_space"].startswith("resnet10t penultimate")
    for entry in report["synthetic"].values():
        assert entry["fidelity"]["fid"] >= 0 and 0 <= entry["faithfulness"]["mauc"] <= 1
        assert entry["faithfulness"]["per_label"].keys() == {"Cardiomegaly"}
    # Copies of training images are all closer to the training set than held-out real images are.
    assert report["synthetic"]["memorised"]["privacy"]["flagged_share"] == 1.0
    assert report["synthetic"]["fresh"]["privacy"]["flagged_share"] < 1.0
    assert report["synthetic"]["memorised"]["privacy"]["pixel"]["flagged_share"] == 1.0  # exact copies, in pixels too
    per_label = report["synthetic"]["fresh"]["fidelity_per_label"]["Cardiomegaly"]
    assert per_label["n_synthetic"] == 12 and "fewer than 20" in per_label["note"]  # 24 images, half positive
    copies = pd.read_csv(out / "copies" / "memorised.csv")
    assert len(copies) == 12 and copies["flagged"].all() and (copies["pixel_similarity"] > 0.999).all()
    assert set(copies["pixel_neighbour"]) <= {str(p) for p in read_manifest(real).image_paths()}
    floor = report["real_test"]["floor"]
    counts = frame["split"].value_counts()
    assert (floor["n_real"], floor["n_synthetic"]) == (counts["test"], counts["val"])
    # FID's bias depends on the sample size: the floor and every set use as many images as the smallest set has.
    smallest = min(12, floor["n_synthetic"])
    assert floor["n_synthetic_fid"] == smallest
    assert {entry["fidelity"]["n_synthetic_fid"] for entry in report["synthetic"].values()} == {smallest}
    md = (out / "report.md").read_text()
    assert "| memorised | 12 |" in md and "| fresh | 24 |" in md and "(floor)" in md and "| fresh - twin |" in md
    for name in ("faithfulness_per_label.png", "nearest_neighbours.png"):
        assert (out / name).stat().st_size > 1000
    # The second call scores with the saved reference classifier and reproduces the numbers.
    weights = out / "reference_classifier" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert CliRunner().invoke(app, args).exit_code == 0
    assert weights.stat().st_mtime_ns == stamp
    again = json.loads((out / "report.json").read_text())
    # Equal to float noise: a KID near zero (-2.2e-6) moved by 2.4e-12 between the two runs.
    fidelity = report["synthetic"]["fresh"]["fidelity"]
    assert again["synthetic"]["fresh"]["fidelity"] == pytest.approx(fidelity, rel=1e-6, abs=1e-9)
    # Another image size is not judged by that classifier: a clear error, and the cached one is left alone.
    other_size = args + ["--size", "16"]
    result = CliRunner().invoke(app, other_size)
    assert result.exit_code == 2 and "other settings" in result.output and "image_size" in result.output
    assert weights.stat().st_mtime_ns == stamp
    # Weights without history.json are an interrupted training's: trained again, not trusted. Trained again from the
    # same seed, after this process's random state has moved on, they are the same weights (the augmentation draws
    # are seeded too).
    first = load_file(weights)
    (out / "reference_classifier" / "history.json").unlink()
    torch.rand(7)
    assert CliRunner().invoke(app, args).exit_code == 0
    assert weights.stat().st_mtime_ns != stamp and (out / "reference_classifier" / "history.json").is_file()
    retrained = load_file(weights)
    assert first.keys() == retrained.keys() and all(torch.equal(first[k], retrained[k]) for k in first)


def test_evaluate_bad_input_is_one_line_and_names_the_problem(tmp_path):
    real = make_tiny_manifest(tmp_path / "real").parent
    runner = CliRunner()
    twice = runner.invoke(
        app,
        ["evaluate", "--real", str(real), "--synthetic", f"a={real}", "--synthetic", f"a={real}"]
        + ["--out", str(tmp_path / "e")],
    )
    assert twice.exit_code == 2 and "used twice" in twice.output
    missing = runner.invoke(
        app, ["evaluate", "--real", str(real), "--synthetic", str(tmp_path / "nowhere"), "--out", str(tmp_path / "e")]
    )
    assert missing.exit_code == 2 and "nowhere" in missing.output
    # A plain path with '=' in it is a path, not NAME=DIR.
    odd = tmp_path / "lr=1e-4" / "syn"
    result = runner.invoke(
        app, ["evaluate", "--real", str(real), "--synthetic", str(odd), "--out", str(tmp_path / "e")]
    )
    assert result.exit_code == 2 and "lr=1e-4" in " ".join(result.output.split())
    # A synthetic set without the classifier's label columns is refused before anything is written.
    bare = read_manifest(real).frame[["image_path", "patient_id", "study_id", "view", "split", "report"]]
    write_manifest(pd.DataFrame(bare), tmp_path / "bare")
    shutil.copytree(real / "images", tmp_path / "bare" / "images")
    nolabels = runner.invoke(
        app,
        ["evaluate", "--real", str(real), "--synthetic", str(tmp_path / "bare"), "--out", str(tmp_path / "e2")]
        + ["--epochs", "1", "--device", "cpu"],
    )
    assert nolabels.exit_code == 2 and "lacks label columns" in nolabels.output
    assert not (tmp_path / "e2").exists()  # not even the reference classifier was trained


def _tiny_open_clip(folder):
    """A tiny open_clip model (1-layer ViT at 32 px, 1-layer text tower) saved as a local folder."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    vision = {"image_size": 32, "layers": 1, "width": 16, "patch_size": 16, "head_width": 8}
    text = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
    config = {"model_cfg": {"embed_dim": 8, "vision_cfg": vision, "text_cfg": text}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    model = open_clip.create_model(f"local-dir:{folder}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return folder


def test_feature_extractors_build_from_local_weights_or_say_why_not(tmp_path):
    import torch
    import torchxrayvision as xrv
    from safetensors.torch import save_file

    from diffcxr_aug.evaluation.features import Extractor, build_extractor

    images = torch.rand(3, 1, 32, 32)
    torch.manual_seed(0)
    dense = xrv.models.DenseNet(weights=None)
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, tmp_path / "xrv.safetensors")
    xrv_space = build_extractor("xrv", torch.device("cpu"), xrv_weights=str(tmp_path / "xrv.safetensors"))
    with torch.no_grad():
        expected = dense.eval().features2(
            torch.nn.functional.interpolate(images, size=(224, 224), mode="bilinear", antialias=True) * 2048 - 1024
        )
    torch.testing.assert_close(xrv_space(images), expected)  # the saved weights, xrv's own scaling
    assert xrv_space(images).shape == (3, 1024)
    clip = build_extractor(f"open_clip:local-dir:{_tiny_open_clip(tmp_path / 'clip')}", torch.device("cpu"))
    assert clip(images).shape == (3, 8) and clip.name.startswith("open_clip:local-dir:")
    # No weights named: the library downloads them; where it cannot (this machine, CI: no internet), the reason
    # names the option that takes a local file.
    for spec, option in (("inception", "--inception-weights FILE"), ("xrv", "--xrv-weights FILE")):
        built = build_extractor(spec, torch.device("cpu"))
        assert isinstance(built, Extractor) or (built.startswith("not computed:") and option in built), built
    assert "no such file" in build_extractor("inception", torch.device("cpu"), inception_weights=tmp_path / "x.pth")
    assert "open_clip_config.json" in build_extractor(f"open_clip:local-dir:{tmp_path}", torch.device("cpu"))
    save_file({"features.conv0.weight": torch.zeros(1)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="not a torchxrayvision DenseNet-121"):
        build_extractor("xrv", torch.device("cpu"), xrv_weights=str(tmp_path / "bad.safetensors"))


def test_inception_space_builds_from_a_local_weights_file(tmp_path):
    """The FID InceptionV3 from a weights file made here (its architecture, random weights): the extractor gives
    that network's 2,048 pool features of the grey film as RGB; a pickle that is not plain weights is refused."""
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from diffcxr_aug.evaluation.features import InceptionExtractor, build_extractor

    class AsBuilt(FeatureExtractorInceptionV3):
        """The network with the weights it is built with, to save as a local weights file."""

        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    torch.save({}, tmp_path / "empty.pth")
    torch.manual_seed(0)
    net = AsBuilt("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(tmp_path / "empty.pth"))
    torch.save(net.state_dict(), tmp_path / "pt_inception.pth")
    space = build_extractor("inception", torch.device("cpu"), inception_weights=tmp_path / "pt_inception.pth")
    assert isinstance(space, InceptionExtractor) and space.name == "inception"
    films = torch.rand(2, 1, 40, 40)
    rgb = (films * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
    with torch.no_grad():
        (expected,) = net.eval()(rgb)
    torch.testing.assert_close(space(films), expected.reshape(2, -1))
    assert space(films).shape == (2, 2048)
    torch.save({"weights": torch.zeros(1), "hook": print}, tmp_path / "pickle.pth")
    with pytest.raises(ValueError, match="not a plain state dict"):
        build_extractor("inception", torch.device("cpu"), inception_weights=tmp_path / "pickle.pth")


def test_evaluate_reports_every_set_in_every_feature_space(tmp_path):
    """--features adds spaces beside the reference classifier's; each number's key names its extractor, and a space
    that cannot be built here is listed with the reason."""
    import torch
    import torchxrayvision as xrv
    from safetensors.torch import save_file

    real = make_tiny_manifest(tmp_path / "real", n=48, size=32, seed=0).parent
    other = make_tiny_manifest(tmp_path / "other", n=24, size=32, seed=7).parent
    fresh = synthetic_like(other, tmp_path / "fresh", read_manifest(other).frame.index).parent
    torch.manual_seed(0)
    state = xrv.models.DenseNet(weights=None).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "xrv.safetensors")
    clip = _tiny_open_clip(tmp_path / "clip")
    out = tmp_path / "eval"
    args = ["evaluate", "--real", str(real), "--synthetic", f"fresh={fresh}", "--out", str(out), "--epochs", "1"]
    args += ["--features", f"reference,xrv,inception,open_clip:local-dir:{clip}"]
    args += ["--xrv-weights", str(tmp_path / "xrv.safetensors"), "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    spaces = report["feature_spaces"]
    assert set(spaces) == {"reference", "xrv", "inception", f"open_clip:local-dir:{clip}"}
    assert "--inception-weights FILE" in spaces["inception"].get("note", "--inception-weights FILE")
    assert spaces["xrv"]["extractor"].startswith("torchxrayvision DenseNet-121")
    metrics = report["metrics"]
    assert set(metrics) == {"real_floor", "fresh"}
    for space in ("reference", "xrv", f"open_clip:local-dir:{clip}"):
        assert metrics["fresh"][f"fid.{space}"] >= 0 and metrics["real_floor"][f"kid.{space}"] is not None
    assert not any(key.endswith(".inception") for key in metrics["fresh"])
    md = (out / "report.md").read_text()
    lead = md.index("## Fidelity in every feature space")
    assert (
        lead < md.index("| set | images |") and "| fresh | xrv |" in md and "| (all) | inception | not computed" in md
    )
    result = CliRunner().invoke(app, [*args[:-4], "--features", "reference,sift"])
    assert result.exit_code == 2 and "unknown feature space" in result.output


def test_evaluate_runs_its_networks_under_the_precision_asked_for(tmp_path):
    """``mixed_precision``: the reference classifier's features and the Inception space's under bf16 autocast stay
    within bf16 rounding of fp32's; the report records the precision used (``auto``: fp32 on a CPU); fp16 on a CPU
    is refused before any work."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from diffcxr_aug.classifiers.models import load_classifier
    from diffcxr_aug.errors import InputError
    from diffcxr_aug.evaluation.features import build_extractor, embed_images
    from diffcxr_aug.evaluation.fidelity import embed
    from diffcxr_aug.evaluation.report import evaluate

    class AsBuilt(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    real = make_tiny_manifest(tmp_path / "real", n=36).parent
    synthetic = tmp_path / "synthetic"
    synthetic_like(real, synthetic, list(range(12)))
    out = tmp_path / "bf16"
    report = json.loads(evaluate(real, synthetic, out, device="cpu", epochs=1, mixed_precision="bf16").read_text())
    assert report["mixed_precision"] == "bf16" and np.isfinite(report["synthetic"]["synthetic"]["fidelity"]["fid"])
    cpu = torch.device("cpu")
    model, config = load_classifier(out / "reference_classifier", cpu)
    manifest = read_manifest(synthetic)
    (f32, s32, _), (f16, s16, _) = (embed(model, config, manifest, cpu, mixed_precision=p) for p in ("no", "bf16"))
    assert f16.dtype == np.float32 and np.abs(f16 - f32).max() <= 0.05 * np.abs(f32).max()
    assert np.abs(s16 - s32).max() < 0.02
    torch.save({}, tmp_path / "empty.pth")
    torch.manual_seed(0)
    net = AsBuilt("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(tmp_path / "empty.pth"))
    torch.save(net.state_dict(), tmp_path / "pt_inception.pth")
    space = build_extractor("inception", cpu, inception_weights=tmp_path / "pt_inception.pth")
    a, b = (embed_images(space, manifest, 32, mixed_precision=p) for p in ("no", "bf16"))
    assert np.abs(b - a).max() <= 0.05 * np.abs(a).max()
    auto = evaluate(real, synthetic, tmp_path / "auto", device="cpu", classifier=out / "reference_classifier")
    assert json.loads(auto.read_text())["mixed_precision"] == "no"
    with pytest.raises(InputError, match="fp16 needs a GPU"):
        evaluate(real, synthetic, tmp_path / "fp16", device="cpu", epochs=1, mixed_precision="fp16")
    assert not (tmp_path / "fp16").exists()


def test_a_judge_no_better_than_chance_withholds_what_depends_on_it(tmp_path):
    # The reference classifier's labels are shuffled against the images, so it learns nothing a test film shows.
    real = make_tiny_manifest(tmp_path / "real", n=48, size=32, seed=0).parent
    manifest = read_manifest(real)
    frame = manifest.frame.copy()
    frame["Cardiomegaly"] = np.random.default_rng(1).permutation(frame["Cardiomegaly"].to_numpy())
    write_manifest(frame, real)
    other = make_tiny_manifest(tmp_path / "other", n=24, size=32, seed=7).parent
    fresh = synthetic_like(other, tmp_path / "fresh", read_manifest(other).frame.index).parent
    out = tmp_path / "eval"
    args = ["evaluate", "--real", str(real), "--synthetic", f"fresh={fresh}", "--out", str(out)]
    result = CliRunner().invoke(app, args + ["--epochs", "1", "--device", "cpu", "--seed", "0"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    judge = report["judge"]
    assert judge["better_than_chance"] is False and judge["ci95"][0] <= 0.5 <= judge["ci95"][1]
    assert "includes chance" in judge["reason"] and judge["labels"] == ["Cardiomegaly"]
    entry = report["synthetic"]["fresh"]
    assert entry["fidelity"] is None and entry["faithfulness"] is None and entry["fidelity_per_label"] == {}
    assert report["real_test"]["floor"] is None and report["metrics"] == {} and report["paired"] == []
    assert report["feature_spaces"]["reference"]["note"].startswith("withheld")
    assert entry["privacy"]["pixel"]["flagged"] >= 0  # pixel privacy does not use the judge: kept
    md = (out / "report.md").read_text()
    assert "It is no better than chance" in md and "No feature space that does not depend on it" in md
    assert "FID (x" not in md and "faithfulness mAUC" not in md and "| fresh | 24 |" in md
    assert "more clearly" not in md and "less clearly" not in md


def test_thin_labels_are_not_scored():
    y = np.array([[1, 0, 1], [0, 0, 1], [1, 1, np.nan], [0, 0, 0]], dtype=float)
    assert thin_labels(y, ["a", "b", "c"], 2) == ["b", "c"] and thin_labels(y, ["a", "b", "c"], 1) == []
    masked = mask_labels(y, ["a", "b", "c"], ["b"])
    assert np.isnan(masked[:, 1]).all() and np.array_equal(masked[:, 0], y[:, 0]) and not np.isnan(y).all(axis=0)[1]
