"""The recipe runner: step records (skip, continue, redo), progress lines, and the run report."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from diffcxr_aug.augment.steps import STEPS_NAME, SUPERSEDED_DIR, Step, StepLedger, run_steps, setting_changes
from diffcxr_aug.cli import app
from diffcxr_aug.config import load_recipe
from diffcxr_aug.data.manifest import read_manifest
from diffcxr_aug.generator.knowledge import knowledge_texts
from diffcxr_aug.types import PIPELINE_STEPS

runner = CliRunner()


def _step(tmp_path, settings, calls, extendable=frozenset()):
    out = tmp_path / "out"

    def run():
        calls.append(dict(settings))
        out.mkdir(exist_ok=True)
        (out / "done.txt").write_text(json.dumps(settings))

    return Step("prepare", settings, [out], [out / "done.txt"], run, frozenset(extendable), estimate_seconds=90)


def test_a_finished_step_with_the_same_settings_is_skipped(tmp_path):
    calls, lines = [], []
    step = _step(tmp_path, {"data": {"n": 10}}, calls)
    run_steps([step], StepLedger(tmp_path), echo=lines.append)
    assert lines[0].startswith("[1/1] prepare ...") and "estimate 1.5 min" in lines[0]
    happened = run_steps([step], StepLedger(tmp_path), echo=lines.append)
    assert len(calls) == 1 and happened[0]["action"] == "skipped"
    assert "skipped" in lines[-1]
    record = json.loads((tmp_path / STEPS_NAME).read_text())["prepare"]
    assert record["status"] == "done" and record["settings"] == {"data": {"n": 10}}


def test_a_finished_step_whose_output_is_gone_runs_again(tmp_path):
    calls = []
    step = _step(tmp_path, {"n": 1}, calls)
    run_steps([step], StepLedger(tmp_path), echo=lambda _: None)
    (tmp_path / "out" / "done.txt").unlink()
    run_steps([step], StepLedger(tmp_path), echo=lambda _: None)
    assert len(calls) == 2


def test_changed_settings_say_what_changed_and_keep_the_old_outputs(tmp_path):
    calls, lines = [], []
    run_steps([_step(tmp_path, {"data": {"n": 10, "size": 64}}, calls)], StepLedger(tmp_path), echo=lines.append)
    run_steps([_step(tmp_path, {"data": {"n": 20, "size": 64}}, calls)], StepLedger(tmp_path), echo=lines.append)
    assert len(calls) == 2
    assert any("data.n: 10 -> 20" in line for line in lines)
    kept = list((tmp_path / SUPERSEDED_DIR).glob("prepare-*/out/done.txt"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["data"]["n"] == 10
    assert json.loads((tmp_path / "out" / "done.txt").read_text())["data"]["n"] == 20


def test_extendable_changes_continue_on_the_same_outputs(tmp_path):
    calls, lines = [], []
    ledger = StepLedger(tmp_path)
    run_steps([_step(tmp_path, {"g": {"max_steps": 4, "lr": 1}}, calls, {"g.max_steps"})], ledger, echo=lines.append)
    (tmp_path / "out" / "marker").write_text("kept")
    more = _step(tmp_path, {"g": {"max_steps": 8, "lr": 1}}, calls, {"g.max_steps"})
    run_steps([more], StepLedger(tmp_path), echo=lines.append)
    assert len(calls) == 2 and (tmp_path / "out" / "marker").is_file()
    assert not (tmp_path / SUPERSEDED_DIR).exists()
    assert any("continues from its outputs" in line for line in lines)


def test_an_interrupted_step_runs_again_without_moving_its_outputs(tmp_path):
    calls = []
    step = _step(tmp_path, {"n": 1}, calls)

    def crash():
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "partial").write_text("x")
        raise KeyboardInterrupt

    interrupted = Step(step.name, step.settings, step.outputs, step.done_files, crash)
    with pytest.raises(KeyboardInterrupt):
        run_steps([interrupted], StepLedger(tmp_path), echo=lambda _: None)
    assert json.loads((tmp_path / STEPS_NAME).read_text())["prepare"]["status"] == "started"
    run_steps([step], StepLedger(tmp_path), echo=lambda _: None)
    assert len(calls) == 1 and (tmp_path / "out" / "partial").is_file()


def test_setting_changes_lists_nested_keys():
    assert setting_changes({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 4}) == ["a.c: 2 -> 3", "d: None -> 4"]


def test_upstream_changes_reach_every_later_step(recipes_dir, tmp_path):
    from diffcxr_aug.augment.plan import plan_steps

    base = load_recipe(recipes_dir / "quickstart.yaml", [f"output_dir={tmp_path}"])
    changed = load_recipe(recipes_dir / "quickstart.yaml", [f"output_dir={tmp_path}", "vae.steps=10"])
    before = {s.name: s.fingerprint for s in plan_steps(base)}
    after = {s.name: s.fingerprint for s in plan_steps(changed)}
    assert before["prepare"] == after["prepare"]
    later = ("train-vae", "filter", "train-generator", "synthesize", "train-classifier")
    assert all(before[n] != after[n] for n in later)


def test_run_drops_lateral_views_when_it_trains_the_generator(recipes_dir, tmp_path):
    """filter.drop_views unset: LATERAL rows go before LNFS when the run trains the generator, none otherwise; set, it
    is kept. New keys at the value older runs had (noise_rate 0.05, compile off) leave fingerprints as they were."""
    from diffcxr_aug.augment.layout import filter_section
    from diffcxr_aug.augment.plan import _dump, plan_steps

    def recipe(*overrides: str):
        return load_recipe(recipes_dir / "quickstart.yaml", [f"output_dir={tmp_path}", *overrides])

    assert recipe("filter.drop_views=null").filter.drop_views is None
    assert filter_section(recipe("filter.drop_views=null")).drop_views == ["LATERAL"]
    assert filter_section(recipe("filter.drop_views=null", "steps=[prepare,filter]")).drop_views == []
    assert filter_section(recipe("filter.drop_views=[AP]")).drop_views == ["AP"]
    base = recipe()
    assert "noise_rate" not in _dump(base.data) and "compile" not in _dump(base.generator)
    assert _dump(recipe("data.noise_rate=0.12").data)["noise_rate"] == 0.12
    before = {s.name: s.fingerprint for s in plan_steps(base)}
    after = {s.name: s.fingerprint for s in plan_steps(recipe("data.noise_rate=0.12"))}
    assert before["prepare"] != after["prepare"]


def test_quickstart_runs_the_whole_loop_with_both_synthetic_sources(recipes_dir):
    recipe = load_recipe(recipes_dir / "quickstart.yaml")
    assert tuple(recipe.steps) == PIPELINE_STEPS
    assert set(recipe.classifier.synthetic) == {"generated", "ceiling"}
    assert set(recipe.classifier.modes) == {"real", "mix"} and len(recipe.classifier.seeds) == 3
    assert min(recipe.classifier.real_fracs) < 0.1 and max(recipe.classifier.real_fracs) == 1.0
    smoke = load_recipe(recipes_dir / "smoke.yaml")
    assert smoke.steps == recipe.steps and set(smoke.classifier.synthetic) == set(recipe.classifier.synthetic)


REPORT_SECTIONS = [
    "## What ran",
    "## What it means",
    "## LNFS: the training images it filtered out",
    "## Generated images",
    "## Evaluation",
    "## Classifiers: real only, real + generated, real + ceiling",
]


@pytest.mark.integration
@pytest.mark.usefixtures("one_thread")
def test_smoke_run_writes_the_report_and_a_rerun_skips_every_step(tmp_path, recipes_dir):
    """`run recipes/smoke.yaml` twice: the report's sections and figures, then every step skipped."""
    out = tmp_path / "smoke"
    args = ["run", str(recipes_dir / "smoke.yaml"), "--set", f"output_dir={out}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == f"report: {out / 'report.md'}"
    for i, name in enumerate(PIPELINE_STEPS, 1):
        assert f"[{i}/7] {name} ..." in result.output
    assert (out / "recipe.resolved.yaml").is_file()
    data = pd.read_csv(out / "data" / "manifest.csv")
    scores = pd.read_csv(out / "filtered" / "scores.csv")
    kept = pd.read_csv(out / "filtered" / "manifest.csv")
    assert len(scores) == len(data) == 120 and len(kept) == len(data) - scores["flagged"].sum() < len(data)
    info = json.loads((out / "generator" / "training_info.json").read_text())
    # generator.use_filtered (default true): stage 1 trains on the manifest the filter kept, in the VAE of the
    # train-vae step, which the filter encoded with too (no other VAE is trained).
    assert info["steps"] == 4 and info["data"] == str(out / "filtered" / "manifest.csv")
    assert info["vae"]["vae"] == str(out / "vae") and info["vae"]["trained"] is False
    assert json.loads((out / "filtered" / "filter_report.json").read_text())["vae"]["source"] == str(out / "vae")
    assert not (out / "filtered" / "vae").exists() and not (out / "generator" / "trained_vae").exists()
    assert len(pd.read_csv(out / "synthetic" / "manifest.csv")) == 8
    evaluation = json.loads((out / "evaluation" / "report.json").read_text())
    assert evaluation["synthetic"]["synthetic"]["n_images"] == 8
    # generator.dkim: stage 2 trains the adapter on the stage-1 model, and synthesize uses that model.
    dkim = json.loads((out / "generator-dkim" / "training_info.json").read_text())
    assert dkim["stage"] == 2 and dkim["steps"] == 2 and dkim["dkim"]["stage1"] == str((out / "generator").resolve())
    compute = evaluation["synthetic"]["synthetic"]["compute"]["generator"]
    assert compute["stage"] == 2 and compute["training_steps"] == 2 and compute["stage1_training_steps"] == 4
    # Each image's knowledge is its prompt row's labels as sentences ("" for one with only uncertain findings).
    synthetic = read_manifest(out / "synthetic")
    written = synthetic.frame["meta_knowledge"].fillna("").tolist()
    assert written == knowledge_texts(synthetic.frame[synthetic.label_names]) and any(written)
    report = (out / "report.md").read_text()
    positions = [report.index(section) for section in REPORT_SECTIONS]
    assert positions == sorted(positions)
    for figure in ("filtered/montage_flagged.png", "synthetic/preview.png", "classifiers/mauc_vs_real_fraction.png"):
        assert f"]({figure})" in report and (out / figure).is_file()
    assert "not run" not in report.split("## What it means")[0]
    results = pd.read_csv(out / "classifiers" / "results.csv")
    runs = set(zip(results["real_frac"], results["mode"], results["source"], results["seed"], strict=True))
    assert runs == {
        (0.5, "real", "none", 0),
        (0.5, "mix", "generated", 0),
        (0.5, "mix", "ceiling", 0),
        (1.0, "real", "none", 0),
        (1.0, "mix", "generated", 0),
        (1.0, "mix", "ceiling", 0),
    }
    assert results["mauc"].between(0, 1).all() and set(results.loc[results["mode"] == "mix", "n_synthetic"]) == {8}
    for source in ("generated", "ceiling"):
        assert f"| 0.5 | mix | {source} |" in report

    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("skipped") == 7, again.output
    assert {record["status"] for record in json.loads((out / STEPS_NAME).read_text()).values()} == {"done"}
