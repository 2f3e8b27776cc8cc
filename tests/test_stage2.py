"""DKIM stage 2 end to end at tiny size: the adapter trained on a frozen stage-1 model through the CLI, exact
resume, dkim_scale=0 giving stage 1's images after training, and synthesize with a stage-2 generator."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from diffcxr_aug.cli import app
from diffcxr_aug.data.manifest import read_manifest
from diffcxr_aug.evaluation.alignment import AlignmentScorer, set_generator, towers_folder
from diffcxr_aug.generator.checkpoints import CHECKPOINT_WEIGHTS, list_checkpoints
from diffcxr_aug.generator.pipeline import DiffCXRPipeline
from diffcxr_aug.generator.settings import GeneratorSettings, SynthesisSettings
from diffcxr_aug.generator.synthesize import synthesize
from diffcxr_aug.generator.training import train_generator
from tests.conftest import make_tiny_manifest
from tests.test_generator import TINY

pytestmark = pytest.mark.usefixtures("one_thread")
STAGE1_COMPONENTS = ("unet", "token_squeeze", "text_encoder", "vae")


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict[str, Path]:
    """A tiny stage-1 model (2 steps), then stage 2 on it for 2 steps through the CLI."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("stage2")
    data = make_tiny_manifest(root / "data").parent
    train_generator(data, root / "gen", GeneratorSettings(max_steps=2, **TINY), device="cpu")
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({"generator": {**TINY, "knowledge_cfg_dropout": 0.25}}))
    result = CliRunner().invoke(
        app,
        ["train-generator", "--stage", "2", "--generator", str(root / "gen"), "--data", str(data)]
        + ["--out", str(root / "dkim"), "--recipe", str(recipe), "--max-steps", "2", "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    return {"data": data, "gen": root / "gen", "dkim": root / "dkim", "root": root}


def _weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    return load_file(next((folder / component).glob("*.safetensors")))


def test_stage2_trains_only_the_adapter(stages):
    dkim, gen = stages["dkim"], stages["gen"]
    info = json.loads((dkim / "training_info.json").read_text())
    assert info["stage"] == 2 and info["steps"] == 2
    assert info["dkim"]["stage1"] == str(gen.resolve()) and info["dkim"]["knowledge_dropout"] == 0.25
    assert info["dkim"]["adapter_params"] > 0 and info["text_encoder"]["policy"] == "frozen"
    # The stage-1 weights are carried over unchanged; the adapter's zero convolutions have left zero.
    for component in STAGE1_COMPONENTS:
        a, b = _weights(dkim, component), _weights(gen, component)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), component
    adapter = _weights(dkim, "adapter")
    assert any(k.startswith("zero_conv") and v.abs().sum() > 0 for k, v in adapter.items())
    # Checkpoints hold what trains, not the frozen model; the loop's logs and grids are there.
    saved = load_file(list_checkpoints(dkim)[-1] / CHECKPOINT_WEIGHTS)
    assert saved and all(k.startswith("adapter.") for k in saved)
    assert pd.read_csv(dkim / "logs" / "loss.csv")["step"].tolist() == [1, 2]
    assert (dkim / "samples" / "step-000002.png").is_file() and (dkim / "logs" / "loss.png").is_file()
    index = json.loads((dkim / "model_index.json").read_text())
    assert index["adapter"][1] == "DiseaseKnowledgeAdapter"


def test_dkim_scale_zero_gives_stage1_images_after_training(stages):
    stage1 = DiffCXRPipeline.from_pretrained(stages["gen"])
    dkim = DiffCXRPipeline.from_pretrained(stages["dkim"])
    assert stage1.adapter is None and dkim.adapter is not None
    reports = ["Small left pleural effusion.", "No acute cardiopulmonary abnormality."]

    def images(pipe: DiffCXRPipeline, **kwargs) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
        pipe.set_progress_bar_config(disable=True)
        out = pipe(
            reports, num_inference_steps=2, guidance_scale=2.0, generator=generators, output_type="pt", **kwargs
        )
        return out.images

    reference = images(stage1)
    assert torch.equal(images(dkim, dkim_scale=0.0), reference)
    assert not torch.equal(images(dkim), reference)
    # Loaded without its adapter, the stage-2 folder is the stage-1 model.
    assert torch.equal(images(DiffCXRPipeline.from_pretrained(stages["dkim"], adapter=None)), reference)


def test_stage2_resume_is_bit_identical(stages, tmp_path):
    section = GeneratorSettings(stage2_steps=3, knowledge_cfg_dropout=0.25, **TINY)  # the fixture's settings
    resumed = tmp_path / "resumed"
    shutil.copytree(stages["dkim"], resumed)
    kwargs = dict(stage=2, generator=stages["gen"], device="cpu")
    train_generator(stages["data"], resumed, section, resume="latest", **kwargs)
    straight = tmp_path / "straight"
    train_generator(stages["data"], straight, section, **kwargs)
    a = load_file(resumed / "checkpoints" / "checkpoint-3" / CHECKPOINT_WEIGHTS)
    b = load_file(straight / "checkpoints" / "checkpoint-3" / CHECKPOINT_WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert pd.read_csv(resumed / "logs" / "loss.csv")["step"].tolist() == [1, 2, 3]


def test_stage2_refuses_what_it_cannot_train_on(stages, tmp_path):
    data, gen = stages["data"], stages["gen"]
    section = GeneratorSettings(stage2_steps=1, **TINY)
    with pytest.raises(FileNotFoundError, match="not a trained pipeline folder"):
        train_generator(data, tmp_path / "a", section, stage=2, generator=tmp_path / "missing")
    with pytest.raises(ValueError, match="is the stage-1 folder itself"):
        train_generator(data, gen, section, stage=2, generator=gen)
    with pytest.raises(ValueError, match="is a stage-2 model"):
        train_generator(data, tmp_path / "b", section, stage=2, generator=stages["dkim"])
    # A stage-1 run's checkpoints are not resumed as stage 2.
    copy = tmp_path / "copy"
    shutil.copytree(gen, copy)
    with pytest.raises(ValueError, match="a stage-1 checkpoint"):
        train_generator(data, copy, section, stage=2, generator=gen, resume="latest", device="cpu")


def test_synthesize_with_a_dkim_generator_records_knowledge(stages, tmp_path):
    prompts = stages["data"]
    section = SynthesisSettings(n=3, steps=2, guidance=2.0, batch_size=2, prompts=prompts)
    out = synthesize(stages["dkim"], tmp_path / "dkim", section, device="cpu", seed=5)
    frame = read_manifest(out).frame
    assert len(frame) == 3 and frame["meta_dkim_scale"].astype(float).eq(1.0).all()
    assert frame["meta_knowledge"].str.len().gt(0).all()
    positive = frame["Cardiomegaly"].astype(float) == 1.0
    assert frame.loc[positive, "meta_knowledge"].str.contains("cardiomegaly").all()
    # evaluate's image-report alignment scores a DKIM set with its stage-1 folder's AVA-TLS towers.
    assert (stages["gen"] / "image_tower").is_dir() and not (stages["dkim"] / "image_tower").exists()
    assert towers_folder(stages["dkim"]).resolve() == stages["gen"].resolve()
    assert AlignmentScorer.available(set_generator(out.parent)) is None
    # Another dkim_scale in the same folder is refused, naming the option.
    with pytest.raises(ValueError, match="--dkim-scale"):
        synthesize(stages["dkim"], tmp_path / "dkim", section.model_copy(update={"dkim_scale": 0.0}), device="cpu")
    # dkim_scale 0 draws stage 1's images exactly, file for file; a stage-1 manifest has no knowledge column.
    zero = synthesize(
        stages["dkim"], tmp_path / "zero", section.model_copy(update={"dkim_scale": 0.0}), device="cpu", seed=5
    )
    plain = synthesize(stages["gen"], tmp_path / "plain", section, device="cpu", seed=5)
    assert "meta_knowledge" not in read_manifest(plain).frame.columns
    for name in read_manifest(plain).frame["image_path"]:
        assert np.array_equal(np.asarray(Image.open(zero.parent / name)), np.asarray(Image.open(plain.parent / name)))


@pytest.mark.integration
def test_stage2_compiled_trains_like_the_eager_run(stages, tmp_path):
    """``compile: true`` in stage 2 compiles the adapter beside the frozen UNet and squeeze: the same first-step
    loss as the eager stage-2 run of the fixture (to compiler rounding), and the run records what it compiled."""
    torch._dynamo.reset()
    section = GeneratorSettings(max_steps=2, compile=True, knowledge_cfg_dropout=0.25, **TINY)
    out = tmp_path / "dkim-compiled"
    train_generator(stages["data"], out, section, stage=2, generator=stages["gen"], device="cpu")
    info = json.loads((out / "training_info.json").read_text())
    assert info["compiled_networks"] == ["unet", "token_squeeze", "adapter"]
    losses = [pd.read_csv(folder / "logs" / "loss.csv")["loss"] for folder in (stages["dkim"], out)]
    assert losses[1].iloc[0] == pytest.approx(losses[0].iloc[0], rel=1e-3)
    assert set(_weights(out, "adapter")) == set(_weights(stages["dkim"], "adapter"))
    torch._dynamo.reset()


def test_stage2_with_gradient_checkpointing_trains_like_the_plain_run(stages, tmp_path):
    """``--gradient-checkpointing`` in stage 2 checkpoints the frozen UNet, through which the adapter's gradients
    flow: the same two losses as the fixture's plain stage-2 run (to 1e-5), so the adapter learned the same step."""
    out = tmp_path / "dkim-checkpointed"
    result = CliRunner().invoke(
        app,
        ["train-generator", "--stage", "2", "--generator", str(stages["gen"]), "--data", str(stages["data"])]
        + ["--out", str(out), "--recipe", str(stages["root"] / "tiny.yaml"), "--max-steps", "2", "--device", "cpu"]
        + ["--gradient-checkpointing"],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "training_info.json").read_text())["section"]["gradient_checkpointing"] is True
    losses = [pd.read_csv(folder / "logs" / "loss.csv")["loss"].to_numpy() for folder in (stages["dkim"], out)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=0, atol=1e-5)
    adapter, plain = _weights(out, "adapter"), _weights(stages["dkim"], "adapter")
    assert all(torch.allclose(adapter[k], plain[k], atol=1e-5) for k in plain)
