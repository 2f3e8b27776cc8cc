"""Diff-CXR stage 1 end to end at tiny size: CLI training, checkpoints, exact resume, pipeline round-trip,
sampling, synthesis, and the AVA-TLS switch."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from diffcxr_aug.cli import app
from diffcxr_aug.data.manifest import read_manifest, write_manifest
from diffcxr_aug.errors import InputError
from diffcxr_aug.generator.checkpoints import CHECKPOINT_TRAINING_STATE, CHECKPOINT_WEIGHTS, list_checkpoints
from diffcxr_aug.generator.latent_store import open_latent_store
from diffcxr_aug.generator.pipeline import DiffCXRPipeline
from diffcxr_aug.generator.prompts import template_report
from diffcxr_aug.generator.settings import GeneratorSettings, SynthesisSettings
from diffcxr_aug.generator.synthesize import synthesize
from diffcxr_aug.generator.training import conditioning_manifest, train_generator
from diffcxr_aug.generator.vae import encode_manifest, load_vae
from diffcxr_aug.runtime import resolve_mixed_precision
from tests.conftest import make_tiny_manifest

TINY = dict(
    config="tiny",
    batch_size=4,
    checkpoint_every=2,
    sample_every=2,
    num_validation_reports=2,
    validation_steps=2,
    lr_warmup_steps=1,
    gradient_accumulation_steps=2,
    mixed_precision="no",
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny generator trained for 2 steps through the CLI (one checkpoint, one sample grid)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("generator")
    data = make_tiny_manifest(root / "data").parent
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({"generator": TINY}))
    result = CliRunner().invoke(
        app,
        ["train-generator", "--data", str(data), "--out", str(root / "gen"), "--recipe", str(recipe)]
        + ["--max-steps", "2", "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    return {"data": data, "gen": root / "gen", "root": root}


def test_cli_training_writes_pipeline_checkpoints_logs_and_grids(trained):
    gen = trained["gen"]
    assert (gen / "model_index.json").is_file()
    assert [p.name for p in list_checkpoints(gen)] == ["checkpoint-2"]
    log = pd.read_csv(gen / "logs" / "loss.csv")
    assert log["step"].tolist() == [1, 2] and log["loss"].notna().all() and log["loss_align"].notna().all()
    assert (gen / "logs" / "loss.png").is_file()
    assert (gen / "samples" / "step-000002.png").is_file()
    assert (gen / "trained_vae" / "metrics.json").is_file()
    info = json.loads((gen / "training_info.json").read_text())
    assert info["text_encoder"]["policy"] == "train" and info["text_encoder"]["backend"] == "scratch"
    assert info["ava_tls"] is True and info["gflops_per_denoising_step"] > 0
    assert info["mixed_precision"] == "no" and info["attention"] == "math"  # auto attention is math on a CPU
    assert Path(info["data"]) == (trained["data"] / "manifest.csv").resolve()
    model_index = json.loads((gen / "model_index.json").read_text())
    assert model_index["token_squeeze"] == ["diffcxr_aug.generator.token_squeeze", "TokenSqueeze"]


def test_pipeline_loads_and_same_seed_gives_same_images(trained):
    pipe = DiffCXRPipeline.from_pretrained(trained["gen"])
    pipe.set_progress_bar_config(disable=True)
    assert pipe.token_squeeze.config.mode == "squeeze"
    reports = ["The heart is enlarged.", "Normal heart size. No pneumothorax."]

    def sample(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return pipe(reports, num_inference_steps=2, guidance_scale=2.0, generator=generator, output_type="pt").images

    first, again, other = sample(0), sample(0), sample(1)
    assert first.shape == (2, 1, 32, 32) and 0.0 <= float(first.min()) and float(first.max()) <= 1.0
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    pil = pipe(reports[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert len(pil) == 1 and pil[0].mode == "L" and pil[0].size == (32, 32)


def test_prompt_reports_and_precomputed_embeds_give_the_same_images(trained):
    pipe = DiffCXRPipeline.from_pretrained(trained["gen"])
    pipe.set_progress_bar_config(disable=True)
    reports = ["The heart is enlarged.", "Normal heart size. No pneumothorax."]

    def sample(**kwargs) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return pipe(num_inference_steps=2, guidance_scale=2.0, generator=generator, output_type="pt", **kwargs).images

    first = sample(prompt=reports)
    assert torch.equal(first, sample(reports=reports))
    embeds, mask = pipe.encode_text(reports, torch.device("cpu"))
    assert torch.equal(first, sample(prompt_embeds=embeds, prompt_attention_mask=mask))
    assert not torch.equal(first, sample(prompt_embeds=embeds.flip(0), prompt_attention_mask=mask))
    with pytest.raises(ValueError, match="exactly one of prompt, reports and prompt_embeds"):
        pipe(reports, prompt_embeds=embeds, num_inference_steps=1)
    with pytest.raises(ValueError, match="exactly one"):
        pipe(num_inference_steps=1)


def test_callback_on_step_end_sees_every_step_and_may_replace_the_latents(trained):
    pipe = DiffCXRPipeline.from_pretrained(trained["gen"])
    pipe.set_progress_bar_config(disable=True)
    seen = []

    def record(pipeline, step, timestep, tensors):
        seen.append((step, int(timestep), tuple(tensors["latents"].shape)))
        return {}

    kwargs = {"num_inference_steps": 3, "output_type": "pt"}
    plain = pipe("The heart is enlarged.", generator=torch.Generator().manual_seed(0), **kwargs).images
    watched = pipe("The heart is enlarged.", generator=torch.Generator().manual_seed(0), callback_on_step_end=record,
                   **kwargs).images  # fmt: skip
    assert [s for s, _, _ in seen] == [0, 1, 2] and torch.equal(plain, watched)
    assert [t for _, t, _ in seen] == [int(t) for t in pipe.scheduler.timesteps]

    def zero_at_the_end(pipeline, step, timestep, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])} if step == 2 else {}

    zeroed = pipe("The heart is enlarged.", callback_on_step_end=zero_at_the_end, **kwargs).images
    decoded = pipe.to_output(pipe.decode_latents(torch.zeros(1, *seen[0][2][1:])), "pt")
    assert torch.equal(zeroed, decoded)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe("x", num_inference_steps=1, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["noise"])


def test_pipeline_check_inputs(trained):
    pipe = DiffCXRPipeline.from_pretrained(trained["gen"])
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(["x"], num_inference_steps=0)
    with pytest.raises(ValueError, match="2 generators for 1 reports"):
        pipe(["x"], num_inference_steps=1, generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match="output_type 'jpg'"):
        pipe(["x"], num_inference_steps=1, output_type="jpg")
    with pytest.raises(ValueError, match="empty"):
        pipe([], num_inference_steps=1)


def test_resume_is_bit_identical_to_an_uninterrupted_run(trained, tmp_path):
    """Continue the fixture's 2-step run to 3 steps and compare with a fresh 3-step run, weight for weight."""
    resumed = tmp_path / "resumed"
    shutil.copytree(trained["gen"], resumed)
    section = GeneratorSettings(max_steps=3, **TINY)
    train_generator(trained["data"], resumed, section, resume="latest", device="cpu")
    straight = tmp_path / "straight"
    train_generator(trained["data"], straight, section, device="cpu")
    a = load_file(resumed / "checkpoints" / "checkpoint-3" / CHECKPOINT_WEIGHTS)
    b = load_file(straight / "checkpoints" / "checkpoint-3" / CHECKPOINT_WEIGHTS)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The pipeline (EMA weights) matches too, and the log holds each step once.
    a = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert pd.read_csv(resumed / "logs" / "loss.csv")["step"].tolist() == [1, 2, 3]
    assert [p.name for p in list_checkpoints(resumed)] == ["checkpoint-2", "checkpoint-3"]
    # The run was not a no-op: step 3 moved the weights away from the step-2 checkpoint.
    c = load_file(trained["gen"] / "checkpoints" / "checkpoint-2" / CHECKPOINT_WEIGHTS)
    assert any(
        not torch.equal(a2, c[k])
        for k, a2 in load_file(straight / "checkpoints" / "checkpoint-3" / CHECKPOINT_WEIGHTS).items()
    )

    # Training time adds up over the two invocations: the first one's minutes come from checkpoint-2.
    first = json.loads((trained["gen"] / "training_info.json").read_text())
    info = json.loads((resumed / "training_info.json").read_text())
    assert info["resumed_from_step"] == 2 and info["steps"] == 3
    before = json.loads((resumed / "checkpoints" / "checkpoint-2" / "state.json").read_text())["wall_minutes"]
    assert 0 < before <= first["wall_minutes_total"]  # the checkpoint was written before the pipeline
    assert info["wall_minutes_total"] == pytest.approx(before + info["wall_minutes_this_invocation"], abs=0.02)
    # Rerunning the finished job trains nothing and keeps that record as it was.
    train_generator(trained["data"], resumed, section, resume="latest", device="cpu")
    assert json.loads((resumed / "training_info.json").read_text()) == info


def _store_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("latent store")]


def test_a_second_run_and_a_resume_read_the_latent_store_and_encode_nothing(trained, tmp_path, caplog):
    """The fixture's run encoded the manifest into its latent store; a second run (in another folder, training the
    same VAE) and a resume read it and encode no image. The store holds the VAE's latents of the whole manifest."""
    resumed = tmp_path / "resumed"
    shutil.copytree(trained["gen"], resumed)
    with caplog.at_level(logging.INFO, logger="diffcxr_aug.generator.latent_store"):
        train_generator(trained["data"], tmp_path / "second", GeneratorSettings(max_steps=1, **TINY), device="cpu")
        train_generator(
            trained["data"], resumed, GeneratorSettings(max_steps=3, **TINY), resume="latest", device="cpu"
        )
    lines = _store_lines(caplog)
    assert len(lines) == 2 and all(line.endswith(": encoded 0 of 24 images (24 reused)") for line in lines)
    path = Path(re.match(r"latent store (.*): encoded", lines[0]).group(1))
    assert lines[0] == lines[1] and path.parent == trained["data"] / "cache"

    vae, manifest = load_vae(trained["gen"] / "trained_vae"), read_manifest(trained["data"])
    direct = encode_manifest(vae, manifest, 32, device="cpu", progress=False)
    np.testing.assert_array_equal(np.load(path), direct.numpy())
    # Against the train split encoded on its own (as training did before the store), the batches differ, and so
    # does the rounding of the convolutions: by a few float32 ulps, nothing more.
    train = manifest.split("train")
    alone = encode_manifest(vae, train, 32, device="cpu", progress=False)
    torch.testing.assert_close(direct[train.frame.index.tolist()], alone, rtol=1e-5, atol=1e-5)


def test_reseed_branches_a_checkpoint_into_another_folder(trained, tmp_path):
    """`--resume CHECKPOINT --reseed --seed K` continues one model with seed K's batches and noise elsewhere (the
    equal-budget continuation arms of bench/dkim_budget.py): the branch is reproducible, differs from the
    checkpoint's own continuation, and keeps the run's VAE."""
    checkpoint = trained["gen"] / "checkpoints" / "checkpoint-2"
    section = GeneratorSettings(max_steps=3, **TINY)
    with pytest.raises(InputError, match="pass it with --resume"):
        train_generator(trained["data"], tmp_path / "x", section, device="cpu", seed=5, reseed=True)
    # The tiny config trains its VAE inside the run: a branch elsewhere must take that VAE along, not train one.
    with pytest.raises(InputError, match="copy that folder to"):
        train_generator(trained["data"], tmp_path / "x", section, resume=checkpoint, device="cpu", seed=5, reseed=True)

    def branch(name: str, seed: int, reseed: bool) -> dict[str, torch.Tensor]:
        out = tmp_path / name
        shutil.copytree(trained["gen"] / "trained_vae", out / "trained_vae")
        args = ["train-generator", "--data", str(trained["data"]), "--out", str(out), "--resume", str(checkpoint)]
        args += ["--max-steps", "3", "--seed", str(seed), "--device", "cpu"] + (["--reseed"] if reseed else [])
        recipe = tmp_path / "tiny.yaml"
        recipe.write_text(yaml.safe_dump({"generator": TINY}))
        result = CliRunner().invoke(app, args + ["--recipe", str(recipe)])
        assert result.exit_code == 0, result.output
        info = json.loads((out / "training_info.json").read_text())
        assert info["resumed_from_step"] == 2 and info["steps"] == 3 and info["seed"] == (seed if reseed else 0)
        state = json.loads((out / "checkpoints" / "checkpoint-3" / "state.json").read_text())
        assert state["seed"] == info["seed"]  # the branch resumes exactly with its own seed
        return load_file(out / "checkpoints" / "checkpoint-3" / CHECKPOINT_WEIGHTS)

    a, again, own = branch("a", 5, True), branch("again", 5, True), branch("own", 5, False)
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert any(not torch.equal(a[k], own[k]) for k in a)
    straight = tmp_path / "straight"
    train_generator(trained["data"], straight, section, device="cpu")
    b = load_file(straight / "checkpoints" / "checkpoint-3" / CHECKPOINT_WEIGHTS)
    assert all(torch.equal(own[k], b[k]) for k in own)  # without --reseed: the checkpoint's own continuation


def test_a_folder_being_trained_is_locked(trained, tmp_path):
    import fcntl

    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".train.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 12345\n")
        held.flush()
        with pytest.raises(FileExistsError, match="being trained by pid 12345"):
            train_generator(trained["data"], out, GeneratorSettings(**TINY), device="cpu")


def test_existing_checkpoints_need_resume(trained):
    with pytest.raises(FileExistsError, match="--resume latest"):
        train_generator(trained["data"], trained["gen"], GeneratorSettings(max_steps=2, **TINY), device="cpu")
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        train_generator(
            trained["data"], trained["gen"], GeneratorSettings(**TINY), resume=trained["root"], device="cpu"
        )


def test_resume_from_a_checkpoint_with_another_trainable_set_says_so(trained, tmp_path):
    """A checkpoint whose optimizer covers other parameters (written by another version) fails by name."""
    old = tmp_path / "old"
    shutil.copytree(trained["gen"], old)
    state_path = list_checkpoints(old)[-1] / CHECKPOINT_TRAINING_STATE
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    state["optimizer"]["param_groups"][0]["params"] = state["optimizer"]["param_groups"][0]["params"][:-1]
    torch.save(state, state_path)
    with pytest.raises(ValueError, match="written by another version of diffcxr-aug"):
        train_generator(trained["data"], old, GeneratorSettings(max_steps=3, **TINY), resume="latest", device="cpu")


def test_bad_stage_and_stage_mismatches(trained, tmp_path):
    with pytest.raises(ValueError, match="Unsupported stage 3"):
        train_generator(trained["data"], tmp_path, GeneratorSettings(**TINY), stage=3)
    with pytest.raises(ValueError, match="pass it with --stage 2"):
        train_generator(trained["data"], tmp_path, GeneratorSettings(**TINY), generator=trained["gen"])
    result = CliRunner().invoke(
        app, ["train-generator", "--data", str(trained["data"]), "--out", str(tmp_path), "--stage", "2"]
    )
    assert result.exit_code == 2 and "pass --generator STAGE1_DIR" in result.output


def test_ava_tls_off_is_the_truncation_baseline(trained, tmp_path):
    """AVA-TLS off, with v-prediction and a one-checkpoint limit (three switches, one short run)."""
    out = tmp_path / "off"
    settings = {**TINY, "checkpoint_every": 1, "checkpoints_total_limit": 1, "prediction_type": "v_prediction"}
    settings["attention"] = "default"
    train_generator(trained["data"], out, GeneratorSettings(max_steps=2, ava_tls=False, **settings), device="cpu")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    pipe = DiffCXRPipeline.from_pretrained(out)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    assert pipe.token_squeeze.config.mode == "truncate"
    assert pipe.text_max_length == pipe.token_squeeze.config.num_tokens == 8
    assert not (out / "image_tower").exists()
    assert pd.read_csv(out / "logs" / "loss.csv")["loss_align"].isna().all()
    info = json.loads((out / "training_info.json").read_text())
    assert info["ava_tls"] is False and "first K tokens" in info["ava_tls_meaning"]
    assert info["attention"] == "default"
    images = pipe(["The heart is enlarged."], num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 1)


def test_unknown_config_is_a_recipe_error(tmp_path, tiny_manifest):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("generator:\n  config: phantom-1024\n")
    result = CliRunner().invoke(
        app,
        [
            "train-generator",
            "--data",
            str(tiny_manifest.parent),
            "--out",
            str(tmp_path / "o"),
            "--recipe",
            str(recipe),
        ],
    )
    assert result.exit_code == 2
    assert "phantom-1024" in result.output and "phantom-128" in result.output


# ---------------------------------------------------------------- synthesize (its own tests: test_synthesize.py)
def test_synthesize_cli_and_missing_generator(trained, tmp_path):
    result = CliRunner().invoke(
        app,
        ["synthesize", "--n", "2", "--generator", str(trained["gen"]), "--out", str(tmp_path / "s")]
        + ["--steps", "1", "--device", "cpu", "--prompts", str(trained["data"])],
    )
    assert result.exit_code == 0, result.output
    assert len(read_manifest(tmp_path / "s").frame) == 2
    result = CliRunner().invoke(
        app, ["synthesize", "--n", "2", "--generator", str(tmp_path / "none"), "--out", str(tmp_path / "t")]
    )
    assert result.exit_code == 2 and "not a trained pipeline folder" in result.output


def test_evaluate_reads_generated_images_and_their_cost(trained, tmp_path):
    """synthesize -> evaluate: the report carries the generator's GFLOPs and the sampling time."""
    synthetic = tmp_path / "s"
    synthesize(trained["gen"], synthetic, SynthesisSettings(n=4, steps=2, guidance=2.0), device="cpu", seed=1)
    job = json.loads((synthetic / "synthesis.json").read_text())
    assert job["images_timed"] == 4 and job["seconds"] > 0 and job["images_per_second"] > 0
    assert job["device"] == "cpu"
    # A rerun with nothing left to make keeps the timing of the images it did make.
    synthesize(trained["gen"], synthetic, SynthesisSettings(n=4, steps=2, guidance=2.0), device="cpu", seed=1)
    assert json.loads((synthetic / "synthesis.json").read_text()) == job
    result = CliRunner().invoke(
        app,
        ["evaluate", "--real", str(trained["data"]), "--synthetic", str(synthetic), "--out", str(tmp_path / "e")]
        + ["--epochs", "1", "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    entry = json.loads((tmp_path / "e" / "report.json").read_text())["synthetic"]["s"]
    info = json.loads((trained["gen"] / "training_info.json").read_text())
    assert entry["compute"]["generator"]["training_steps"] == info["steps"] == 2
    # Two UNet passes per sampler step with classifier-free guidance.
    assert entry["compute"]["gflops_per_image"] == pytest.approx(info["gflops_per_denoising_step"] * 2 * 2)
    assert entry["n_images"] == 4 and entry["fidelity"]["n_synthetic"] == 4
    assert entry["compute"]["images_timed"] == 4 and entry["compute"]["device"] == "cpu"
    assert entry["compute"]["generator"]["training_wall_minutes"] == info["wall_minutes_total"]


@pytest.mark.integration
def test_two_process_training_with_torchrun(trained, tmp_path):
    """Two gloo ranks on CPU through accelerate (torchrun): the VAE is trained once, checkpoints written once."""
    import os
    import subprocess
    import sys

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({"generator": TINY}))
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "diffcxr_aug.cli"]
    command += ["train-generator", "--data", str(trained["data"]), "--out", str(out), "--recipe", str(recipe)]
    command += ["--max-steps", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).parents[1]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((out / "training_info.json").read_text())
    assert info["num_processes"] == 2 and info["steps"] == 2
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    DiffCXRPipeline.from_pretrained(out)
    # Both ranks opened the data's one latent store, which the fixture's run had encoded: neither encoded again.
    assert len(re.findall(r"latent store \S+: encoded 0 of 24 images \(24 reused\)", result.stderr)) == 2


@pytest.mark.integration
def test_two_ranks_under_torchrun_build_one_latent_store_and_image_cache(trained, tmp_path):
    """On data without a cache, two gloo ranks build one image cache (rank 0 first, the other waits) and one latent
    store, each encoding the chunks dealt to it (24 images are one chunk: rank 0's); a run after them encodes
    nothing."""
    import os
    import subprocess
    import sys

    data = tmp_path / "data"
    shutil.copytree(trained["data"], data, ignore=shutil.ignore_patterns("cache"))
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({"generator": {**TINY, "sample_every": 10, "checkpoint_every": 10}}))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "diffcxr_aug.cli"]
    command += ["train-generator", "--data", str(data), "--out", str(tmp_path / "ddp"), "--recipe", str(recipe)]
    command += ["--max-steps", "1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).parents[1]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    encoded = re.findall(
        r"latent store (\S+): encoded (\d+) of 24 images \(0 reused\) on rank (\d) of 2", result.stderr
    )
    assert sorted((int(n), int(rank)) for _, n, rank in encoded) == [(0, 1), (24, 0)]
    assert encoded[0][0] == encoded[1][0] and len(list((data / "cache").glob("images_32_*.npy"))) == 1
    assert not list((data / "cache").glob("*.partial.*"))
    vae = load_vae(tmp_path / "ddp" / "trained_vae")
    again = open_latent_store(read_manifest(data), vae, 32, build=False, device="cpu", progress=False)
    assert again.encoded == 0 and str(again.path) == encoded[0][0] and again.array.shape == (24, 4, 16, 16)


def test_auto_precision_is_bf16_where_the_cpu_has_native_bf16(monkeypatch):
    """Training asks for bf16 where the CPU has it (cpu_auto="bf16"), fp32 where it has not; callers that do not ask
    (cpu_auto "no") get fp32 on every CPU; an explicit choice is kept."""
    import diffcxr_aug.runtime as runtime

    cpu = torch.device("cpu")
    for native, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(runtime, "cpu_has_bf16", lambda native=native: native)
        assert resolve_mixed_precision("auto", cpu, cpu_auto="bf16") == expected
        assert resolve_mixed_precision("auto", cpu) == "no" and resolve_mixed_precision("bf16", cpu) == "bf16"


def test_samplers_share_the_models_schedule():
    from diffcxr_aug.generator.pipeline import SAMPLERS, sampler_scheduler

    config = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction"}
    config |= {"clip_sample": True}  # as a DDPM training scheduler's config carries it
    for name in SAMPLERS:
        made = sampler_scheduler(name, config)
        assert made.config.prediction_type == "v_prediction" and made.config.beta_schedule == "scaled_linear"
    assert sampler_scheduler("ddim", config).config.clip_sample is False  # latents are not in [-1, 1]
    assert sampler_scheduler("dpm-solver++", config).config.algorithm_type == "dpmsolver++"
    with pytest.raises(InputError, match="unipc"):
        sampler_scheduler("euler", config)


def test_the_smallest_settings_train_and_sample(trained, tmp_path):
    """One step on one image with one condition token under bf16 (in the process that trained the fixture in fp32),
    then one image from one UniPC step without guidance under bf16; another sampler is another job. fp16 training on
    a CPU is refused before a step."""
    recipe = trained["root"] / "tiny.yaml"
    args = ["train-generator", "--data", str(trained["data"]), "--out", str(tmp_path / "gen"), "--recipe", str(recipe)]
    args += ["--max-steps", "1", "--batch-size", "1", "--num-tokens", "1", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args[:4], str(tmp_path / "fp16"), *args[5:], "--mixed-precision", "fp16"])
    assert (
        result.exit_code == 2
        and "fp16 needs a GPU" in result.output
        and not list((tmp_path / "fp16").glob("checkpoint-*"))
    )
    result = CliRunner().invoke(app, [*args, "--mixed-precision", "bf16"])  # after the fixture's "no", in-process
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "gen" / "training_info.json").read_text())
    assert info["mixed_precision"] == "bf16" and info["attention"] == "math"
    args = ["synthesize", "--n", "1", "--generator", str(tmp_path / "gen"), "--out", str(tmp_path / "s")]
    args += ["--steps", "1", "--batch-size", "1", "--guidance", "0", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--sampler", "unipc", "--mixed-precision", "bf16"])
    assert result.exit_code == 0, result.output
    frame = read_manifest(tmp_path / "s").frame
    assert len(frame) == 1 and frame["meta_sampler"].tolist() == ["UniPCMultistepScheduler"]
    assert frame["meta_precision"].tolist() == ["bf16"]
    assert json.loads((tmp_path / "s" / "synthesis.json").read_text())["mixed_precision"] == "bf16"
    result = CliRunner().invoke(app, [*args, "--sampler", "ddim", "--mixed-precision", "bf16"])
    assert result.exit_code == 2 and "'unipc' -> 'ddim'" in result.output and "--sampler unipc" in result.output


@pytest.mark.integration
def test_compiled_networks_train_like_the_eager_ones(trained, tmp_path):
    """``compile: true`` runs the UNet, the token squeeze and the image tower through inductor (graphs are
    compiled), in place, with every text batch padded to one length: the same first-step loss as eager (to compiler
    rounding), the same checkpoint keys, grids drawn eagerly, a loadable pipeline, and the run records it."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    settings = {**TINY, "gradient_accumulation_steps": 1, "sample_every": 2, "checkpoint_every": 2}
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    train_generator(trained["data"], eager, GeneratorSettings(max_steps=2, **settings), device="cpu")
    assert sum(counters["stats"].values()) == 0  # nothing compiled so far
    train_generator(trained["data"], compiled, GeneratorSettings(max_steps=2, compile=True, **settings), device="cpu")
    assert counters["stats"]["unique_graphs"] >= 3  # at least one graph for each of the three networks
    losses = [pd.read_csv(out / "logs" / "loss.csv")["loss"] for out in (eager, compiled)]
    assert losses[1].iloc[0] == pytest.approx(losses[0].iloc[0], rel=1e-3)
    keys = [set(load_file(out / "checkpoints" / "checkpoint-2" / CHECKPOINT_WEIGHTS)) for out in (eager, compiled)]
    assert keys[0] == keys[1] and not any("_orig_mod" in k for k in keys[1])
    assert (compiled / "samples" / "step-000002.png").is_file()
    info = json.loads((compiled / "training_info.json").read_text())
    assert info["compiled"] is True and json.loads((eager / "training_info.json").read_text())["compiled"] is False
    assert info["compiled_networks"] == ["unet", "token_squeeze", "image_tower"]
    images = DiffCXRPipeline.from_pretrained(compiled)(["Clear lungs."], num_inference_steps=2, output_type="np")
    assert np.isfinite(images.images).all()
    torch._dynamo.reset()


def test_evaluate_scores_image_prompt_alignment_in_the_generators_towers(trained, tmp_path):
    """A set made by `synthesize` names its generator; evaluate reads that generator's AVA-TLS image tower and text
    towers and compares each image with its own prompt and with a shuffled one, beside real test pairs."""
    from diffcxr_aug.evaluation.alignment import alignment_summary
    from diffcxr_aug.evaluation.report import evaluate

    args = ["synthesize", "--n", "4", "--generator", str(trained["gen"]), "--out", str(tmp_path / "s")]
    args += ["--prompts", str(trained["data"]), "--steps", "2", "--batch-size", "4", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(
        evaluate(trained["data"], tmp_path / "s", tmp_path / "eval", device="cpu", epochs=1).read_text()
    )
    alignment = report["synthetic"]["s"]["alignment"]
    assert Path(alignment["generator"]) == trained["gen"].resolve()
    for side in ("synthetic", "real_test"):
        entry = alignment[side]
        assert (
            -1.0 <= entry["shuffled"] <= 1.0 and -1.0 <= entry["matched"] <= 1.0 and 0 <= entry["own_text_closer"] <= 1
        )
    assert alignment["synthetic"]["n"] == 4
    assert "Image-report alignment" in (tmp_path / "eval" / "report.md").read_text()
    # By hand: texts equal to their images are matched at 1; a derangement never pairs an image with its own text.
    eye = np.eye(5)
    assert alignment_summary(eye, eye, seed=3) == {
        "n": 5, "matched": 1.0, "shuffled": 0.0, "difference": 1.0, "own_text_closer": 1.0
    }  # fmt: skip


def test_reports_from_labels_condition_a_dataset_without_reports(tmp_path):
    """A train split whose reports are all empty (NIH ChestX-ray14) is refused with the fix; report_source labels
    conditions on each row's labels written as the template report that synthesize --labels-from writes."""
    manifest = read_manifest(make_tiny_manifest(tmp_path / "tiny", n=12).parent)
    write_manifest(manifest.frame.assign(report=""), tmp_path / "bare")
    with pytest.raises(InputError, match="every train report is empty.*report_source: labels"):
        train_generator(tmp_path / "bare", tmp_path / "gen", GeneratorSettings(config="tiny"), device="cpu")
    assert not (tmp_path / "gen").exists()
    written = conditioning_manifest(read_manifest(tmp_path / "bare"), "labels")
    first = written.frame.iloc[0]
    assert first["report"] == template_report(first[written.label_names].to_dict()) == "Cardiomegaly. No pneumothorax."
    assert conditioning_manifest(manifest, "report") is manifest
    with pytest.raises(InputError, match="choose report or labels"):
        conditioning_manifest(manifest, "knowledge")


# ------------------------------------------------------------------------ GPU precision, 512 px, several GPUs
def test_auto_precision_on_a_gpu_is_bf16_where_it_runs_natively_else_fp16(monkeypatch):
    """``auto`` on CUDA: bf16 on Ampere and later, fp16 (with loss scaling in training) on a V100 or T4. No GPU here:
    the capability probe is replaced, the device is only named."""
    import diffcxr_aug.runtime as runtime

    gpu = torch.device("cuda", 1)
    for native, expected in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(runtime, "cuda_has_bf16", lambda device, native=native: native)
        assert resolve_mixed_precision("auto", gpu) == expected
        assert resolve_mixed_precision("auto", gpu, cpu_auto="bf16") == expected
    assert resolve_mixed_precision("fp16", gpu) == "fp16" and resolve_mixed_precision("no", gpu) == "no"
    with pytest.raises(InputError, match="choose one of: auto, no, bf16, fp16"):
        resolve_mixed_precision("fp8", gpu)


@pytest.fixture(scope="module")
def trained_512(tmp_path_factory) -> dict[str, Path]:
    """The paper-512 geometry at test size (``tiny-512``: 512 px, a factor-8 KL-VAE, 4 x 64 x 64 latents, paper-256's
    block layout at tiny widths), 2 steps at batch 2, without gradient checkpointing. The full paper-512 UNet (374 M
    parameters, 233 GFLOPs a step) is no CPU test, and the registry's overrides do not reach the channel widths, so
    the registry carries this stand-in of the same geometry."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("generator512")
    data = make_tiny_manifest(root / "data", n=12).parent  # 6 train films, 3 val, 3 test
    section = GeneratorSettings(max_steps=2, **{**TINY, "config": "tiny-512", "batch_size": 2})
    train_generator(data, root / "gen", section, device="cpu")
    return {"data": data, "gen": root / "gen", "root": root, "section": section}


def test_paper_512_geometry_trains_the_same_with_gradient_checkpointing(trained_512, tmp_path, caplog):
    """Gradient checkpointing of the UNet and of the trained (scratch) text encoder recomputes what it dropped: the
    same two losses to 1e-5; the memory estimate at the start is logged, smaller an image with checkpointing."""
    info = json.loads((trained_512["gen"] / "training_info.json").read_text())
    assert info["config"]["image_size"] == 512 and info["section"]["gradient_checkpointing"] is False
    assert DiffCXRPipeline.from_pretrained(trained_512["gen"]).unet.config.sample_size == 64
    section = trained_512["section"].model_copy(
        update={"gradient_checkpointing": True, "vae": str(trained_512["gen"] / "trained_vae")}
    )
    with caplog.at_level(logging.INFO, logger="diffcxr_aug.generator.training"):
        train_generator(trained_512["data"], tmp_path / "gen", section, device="cpu")
    assert "Gradient checkpointing: unet, text_encoder" in caplog.text
    estimate = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Memory estimate"))
    plain, checkpointed = map(float, re.search(r"activations an image ([\d.]+) \(([\d.]+) with", estimate).groups())
    assert 0 < checkpointed < plain and "This run: batch 2, gradient checkpointing on" in estimate
    columns = ["loss", "loss_diffusion", "loss_align"]
    eager = pd.read_csv(trained_512["gen"] / "logs" / "loss.csv")[columns].to_numpy()
    recomputed = pd.read_csv(tmp_path / "gen" / "logs" / "loss.csv")[columns].to_numpy()
    assert eager.shape == (2, 3)
    np.testing.assert_allclose(recomputed, eager, rtol=0, atol=1e-5)


def test_activation_estimate_matches_a_real_forward():
    """The meta-device count of the activations autograd saves equals a real fp32 forward's (shared storage counted
    once, weights not at all) for the tiny-512 UNet at batch 1 under the math attention backend (the attention
    probabilities kept, as training on a CPU runs it); bf16 scales it by 0.6, checkpointing keeps a fraction."""
    from diffcxr_aug.generator.configs import build_unet, get_config
    from diffcxr_aug.generator.objective import activation_bytes
    from diffcxr_aug.runtime import attention_backend

    torch.manual_seed(0)
    unet = build_unet(get_config("tiny-512")).train()
    weights = {w.untyped_storage().data_ptr() for w in unet.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in weights:  # the weights are counted once, not an image
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
    with hooks, attention_backend("math", torch.device("cpu")):
        unet(torch.zeros(1, 4, 64, 64), torch.tensor([500]), encoder_hidden_states=torch.zeros(1, 8, 16))
    estimate = activation_bytes(unet, num_tokens=8)
    assert estimate["plain"] == sum(storages.values())
    assert 0 < estimate["checkpointed"] < estimate["plain"] / 2
    assert activation_bytes(unet, 8, precision="bf16")["plain"] == int(0.6 * estimate["plain"])


def test_paper_512_geometry_synthesizes_and_evaluates_at_512(trained_512, tmp_path):
    """synthesize writes 512 px films from the 64 x 64 latents; evaluate scores them at 512 px, fp32 on a CPU."""
    from PIL import Image

    synthetic = tmp_path / "s"
    synthesize(trained_512["gen"], synthetic, SynthesisSettings(n=4, steps=1, guidance=2.0), device="cpu", seed=1)
    frame = read_manifest(synthetic).frame
    with Image.open(synthetic / frame["image_path"].iloc[0]) as image:
        assert image.size == (512, 512)
    assert json.loads((synthetic / "synthesis.json").read_text())["mixed_precision"] == "no"  # auto on a CPU
    result = CliRunner().invoke(
        app,
        ["evaluate", "--real", str(trained_512["data"]), "--synthetic", str(synthetic), "--out", str(tmp_path / "e")]
        + ["--epochs", "1", "--device", "cpu", "--mixed-precision", "auto"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["classifier"]["size"] == 512 and report["mixed_precision"] == "no"
    assert report["synthetic"]["s"]["n_images"] == 4


def _accelerate_launch(*args: str, timeout: int = 900) -> str:
    """``accelerate launch --multi_gpu --num_processes 2 -m diffcxr_aug.cli ARGS`` on this machine's CPUs: accelerate
    1.16's ``--multi_gpu`` starts torchrun (two ranks), and ``--device cpu`` gives each a gloo process group (its
    ``--cpu --num_processes 2`` starts one process, for Intel MPI). Returns stderr."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:  # a free port: other tests may hold torchrun's default 29500
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", str(port), "-m", "diffcxr_aug.cli", *args, "--device", "cpu"]
    root = Path(__file__).parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


@pytest.mark.integration
def test_readme_accelerate_launch_forms_on_two_cpu_processes(trained, tmp_path):
    """The README's several-GPU command lines (stage 1, stage 2, synthesize under ``accelerate launch --multi_gpu``)
    as written, with two CPU processes: each training records two processes and one set of checkpoints, and the
    two processes split the synthesis shards, each making its share."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({"generator": TINY, "synthesize": {"shard_size": 2, "steps": 1}}))
    data, stage1, stage2, synthetic = trained["data"], tmp_path / "generator", tmp_path / "dkim", tmp_path / "syn"
    _accelerate_launch(
        "train-generator", "--recipe", str(recipe), "--data", str(data), "--out", str(stage1), "--max-steps", "2"
    )
    _accelerate_launch(
        "train-generator", "--recipe", str(recipe), "--stage", "2", "--generator", str(stage1), "--data", str(data),
        "--out", str(stage2), "--max-steps", "2",
    )  # fmt: skip
    log = _accelerate_launch(
        "synthesize", "--recipe", str(recipe), "--n", "10", "--generator", str(stage2), "--out", str(synthetic),
        "--prompts", str(data),
    )  # fmt: skip
    for folder, stage in ((stage1, 1), (stage2, 2)):
        info = json.loads((folder / "training_info.json").read_text())
        assert (info["stage"], info["num_processes"], info["steps"]) == (stage, 2, 2)
        assert [p.name for p in list_checkpoints(folder)] == ["checkpoint-2"]
        assert json.loads((folder / "checkpoints" / "checkpoint-2" / "state.json").read_text())["num_processes"] == 2
    assert DiffCXRPipeline.from_pretrained(stage2).adapter is not None
    job = json.loads((synthetic / "synthesis.json").read_text())
    assert job["world_size"] == 2 and sum(job["rank_images"]) == 10 and min(job["rank_images"]) > 0
    first, second = map(set, job["rank_shards"])
    assert not first & second and first | second == set(range(5))
    frame = read_manifest(synthetic).frame
    assert len(frame) == 10 and frame["meta_knowledge"].notna().all()
    assert all((synthetic / name).is_file() for name in frame["image_path"]), log[-2000:]


def test_diffusers_own_loader_finds_the_pipeline_class(trained):
    """A saved pipeline folder holds a pipeline.py naming the class, so diffusers' custom-pipeline loader returns the
    package's own DiffCXRPipeline (not a copy) from the folder alone."""
    from diffusers import DiffusionPipeline

    folder = str(trained["gen"])
    assert (trained["gen"] / "pipeline.py").is_file()
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)
    assert type(pipe) is DiffCXRPipeline
    pipe.set_progress_bar_config(disable=True)
    assert pipe("The heart is enlarged.", num_inference_steps=1, output_type="pt").images.shape == (1, 1, 32, 32)
