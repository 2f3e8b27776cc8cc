"""DKIM at equal budget (issue #16): from one stage-1 model, stage 2 (the DKIM adapter) for S minutes against stage 1
continued for the same S minutes, three training seeds each, sampled from the same prompts and seeds and scored by
one ``evaluate``; then knowledge edits (a finding added through the knowledge alone, the report unchanged).

    python bench/dkim_budget.py --stage1 runs/quickstart/generator --data runs/quickstart/filtered \\
        --real runs/quickstart/data --recipe recipes/quickstart.yaml --out runs/dkim-budget \\
        --minutes 8 --seeds 0 1 2 --n 500 --edits 100 [--dest docs/results/dkim_budget]

Each phase is a real CLI command (``diffcxr-aug train-generator / synthesize / evaluate``) and is skipped when its
output is complete, so an interrupted run continues where it stopped (an arm cut off mid-training is trained
again from its start: its budget is one uninterrupted invocation).

- **Arms** (``OUT/arms/``): ``dkim-sK`` is ``train-generator --stage 2 --generator STAGE1 --seed K``; ``cont-sK`` is
  ``train-generator --resume STAGE1/checkpoints/<latest> --reseed --seed K`` (stage 1 continued from its last
  checkpoint: weights, optimizer, EMA and LR schedule, with seed K's batches and noise). Both get
  ``--time-limit-minutes S`` (the whole invocation, set-up included) and run one at a time, alternating, so that
  neither gets a quieter machine. The steps each reached are in the summary.
- **Sampling** (``OUT/synthetic/``): every arm and the stage-1 model itself, ``synthesize --n N --prompts REAL
  --seed 0``: the same prompts and per-image seeds for all, so ``evaluate`` pairs them.
- **Evaluate** (``OUT/evaluate/``): one reference classifier for every set; FID/KID, precision/recall,
  density/coverage, faithfulness mAUC with bootstrap intervals and paired differences.
- **Edits** (``OUT/edits/``): for ``--edits`` normal-report prompts of the real test split (No Finding = 1), each DKIM
  arm draws the image with the prompt's own knowledge (the No Finding sentence) and, with the same report and
  seed, with one finding's knowledge instead ("There is cardiomegaly."); the reference classifier's AUC for that
  finding, edited against unedited images, says how much the knowledge alone moves the image (0.5: not at all).

Writes ``OUT/summary.md`` and ``OUT/summary.json`` (and with ``--dest`` copies them there with the small records).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from diffcxr_aug.io import atomic_write_json, atomic_write_text

logger = logging.getLogger("dkim_budget")

EDIT_FINDINGS = ("Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Lung Lesion", "Edema", "Consolidation")
# The findings stage 1 draws worst on the phantom world (docs/results/phantom128): called out in the summary.
WORST_DRAWN = ("Pneumothorax", "Lung Lesion", "Pleural Effusion")
BIG = 1_000_000  # --max-steps: the time limit stops every arm


def _command(*args: str) -> list[str]:
    """The ``diffcxr-aug`` of this interpreter's environment (``python -m`` would import a ``diffcxr_aug`` folder
    in the working directory first, which may be another checkout)."""
    logger.info("$ diffcxr-aug %s", " ".join(args))
    script = Path(sys.executable).with_name("diffcxr-aug")
    prefix = [str(script)] if script.is_file() else [sys.executable, "-m", "diffcxr_aug.cli"]
    return [*prefix, *args]


def _cli(*args: str) -> None:
    subprocess.run(_command(*args), check=True)


def _latest_checkpoint(folder: Path) -> Path:
    from diffcxr_aug.generator.checkpoints import list_checkpoints

    found = list_checkpoints(folder)
    if not found:
        raise SystemExit(f"{folder}: no checkpoints/checkpoint-N to continue stage 1 from")
    return found[-1]


def _arm_command(args: argparse.Namespace, kind: str, seed: int, folder: Path, checkpoint: Path) -> list[str]:
    common = ["--data", str(args.data), "--out", str(folder), "--seed", str(seed), "--max-steps", str(BIG)]
    common += ["--time-limit-minutes", str(args.minutes)]
    if args.recipe is not None:
        common += ["--recipe", str(args.recipe)]
    if kind == "dkim":
        return _command("train-generator", "--stage", "2", "--generator", str(args.stage1), *common)
    if (args.stage1 / "trained_vae").is_dir():  # a VAE that run trained itself: the branch keeps it
        shutil.copytree(args.stage1 / "trained_vae", folder / "trained_vae")
    return _command("train-generator", "--resume", str(checkpoint), "--reseed", *common)


def train_arms(args: argparse.Namespace) -> dict[str, Path]:
    """The 2 x len(seeds) arms; finished ones are skipped. One at a time (DKIM, then continuation, seed by seed), or
    with ``--parallel`` a seed's two arms at once, each on ``--threads`` threads: the same machine load for both."""
    arms: dict[str, Path] = {}
    checkpoint = _latest_checkpoint(args.stage1)
    (args.out / "arms").mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        pending = []
        for kind in ("dkim", "cont"):
            name, folder = f"{kind}-s{seed}", args.out / "arms" / f"{kind}-s{seed}"
            arms[name] = folder
            if (folder / "training_info.json").is_file():
                continue
            if folder.exists():  # cut off mid-training: its budget is one invocation, so it starts again
                shutil.rmtree(folder)
            pending.append(_arm_command(args, kind, seed, folder, checkpoint))
        if not args.parallel:
            for command in pending:
                subprocess.run(command, check=True)
            continue
        env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        logs = [open(args.out / "arms" / f"log-s{seed}-{i}.txt", "w") for i in range(len(pending))]  # noqa: SIM115
        procs = [
            subprocess.Popen(c, env=env, stdout=log, stderr=subprocess.STDOUT)
            for c, log in zip(pending, logs, strict=True)
        ]
        codes = [p.wait() for p in procs]
        for log in logs:
            log.close()
        if any(codes):
            raise SystemExit(f"an arm of seed {seed} failed (exit codes {codes}); see {args.out / 'arms'}/log-s*.txt")
    return arms


def synthesize_sets(args: argparse.Namespace, arms: dict[str, Path]) -> dict[str, Path]:
    sets = {"stage1": args.stage1, **arms}
    out = {}
    for name, generator in sets.items():
        folder = args.out / "synthetic" / name
        out[name] = folder
        command = ["synthesize", "--n", str(args.n), "--generator", str(generator), "--out", str(folder)]
        command += ["--prompts", str(args.real), "--seed", "0"]
        if args.recipe is not None:
            command += ["--recipe", str(args.recipe)]
        _cli(*command)  # resumable: a finished set is checked and left as it is
    return out


def evaluate_sets(args: argparse.Namespace, sets: dict[str, Path]) -> dict:
    report = args.out / "evaluate" / "report.json"
    if not report.is_file():
        command = ["evaluate", "--real", str(args.real), "--out", str(report.parent)]
        for name, folder in sets.items():
            command += ["--synthetic", f"{name}={folder}"]
        if args.recipe is not None:
            command += ["--recipe", str(args.recipe)]
        _cli(*command)
    return json.loads(report.read_text())


# ----------------------------------------------------------------------------------------------------- the edits
def _classifier_scores(model, config, images: torch.Tensor) -> np.ndarray:
    """The reference classifier's sigmoid scores for images in [0, 1], quantised as synthesize's PNGs are."""
    from diffcxr_aug.classifiers.train import build_transforms

    transform = build_transforms((config.mean,), (config.std,), train=False)
    images = torch.floor(images.float().clamp(0, 1) * 255.0 + 0.5) / 255.0
    with torch.no_grad():
        return torch.sigmoid(model(transform(images))).numpy()


def _bootstrap_auc(neg: np.ndarray, pos: np.ndarray, seed: int = 0, n: int = 1000) -> list[float]:
    """95% interval of the paired edit AUC, resampling prompts (each prompt gives one edited and one unedited)."""
    rng, values = np.random.default_rng(seed), []
    for _ in range(n):
        idx = rng.integers(0, len(neg), len(neg))
        y = np.r_[np.zeros(len(idx)), np.ones(len(idx))]
        values.append(roc_auc_score(y, np.r_[neg[idx], pos[idx]]))
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


def knowledge_edits(args: argparse.Namespace, arms: dict[str, Path], sample: dict) -> dict:
    """Edit AUCs per DKIM arm and finding (cached in OUT/edits/NAME.json) and one figure of the first arm's edits."""
    from diffcxr_aug.classifiers.models import load_classifier
    from diffcxr_aug.data.manifest import read_manifest
    from diffcxr_aug.generator.pipeline import DiffCXRPipeline

    test = read_manifest(args.real).split("test").frame
    normal = test[test["No Finding"] == 1].reset_index(drop=True)
    if len(normal) < args.edits:
        raise SystemExit(f"{args.real}: {len(normal)} normal test reports, fewer than --edits {args.edits}")
    normal = normal.iloc[np.random.default_rng(0).permutation(len(normal))[: args.edits]].reset_index(drop=True)
    reports = normal["report"].tolist()
    model, config = load_classifier(args.out / "evaluate" / "reference_classifier")
    model.eval()
    index = {name: i for i, name in enumerate(config.label_names)}
    findings = [f for f in EDIT_FINDINGS if f in index]
    results, montage = {}, None
    for name, folder in arms.items():
        if not name.startswith("dkim"):
            continue
        cache = args.out / "edits" / f"{name}.json"
        if cache.is_file():
            results[name] = json.loads(cache.read_text())
            continue
        started = time.time()
        pipe = DiffCXRPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        variants = {"unedited": pipe.knowledge_text(reports, labels=normal)}
        variants |= {f: pipe.knowledge_text(reports, labels=[{f: 1.0}] * len(reports)) for f in findings}
        images: dict[str, torch.Tensor] = {}
        for key, knowledge in variants.items():
            parts = []
            for start in range(0, len(reports), args.batch_size):
                stop = min(start + args.batch_size, len(reports))
                generators = [torch.Generator().manual_seed(i) for i in range(start, stop)]
                with torch.inference_mode():
                    parts.append(
                        pipe(
                            reports[start:stop],
                            num_inference_steps=sample["steps"],
                            guidance_scale=sample["guidance"],
                            generator=generators,
                            knowledge=knowledge[start:stop],
                            output_type="pt",
                        ).images
                    )
            images[key] = torch.cat(parts)
        scores = {key: _classifier_scores(model, config, batch) for key, batch in images.items()}
        entry = {"n_prompts": len(reports), "knowledge": {k: v[0] for k, v in variants.items()}, "findings": {}}
        for f in findings:
            neg, pos = scores["unedited"][:, index[f]], scores[f][:, index[f]]
            y = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
            entry["findings"][f] = {
                "auc": float(roc_auc_score(y, np.r_[neg, pos])),
                "auc_ci95": _bootstrap_auc(neg, pos),
                "mean_score_unedited": float(neg.mean()),
                "mean_score_edited": float(pos.mean()),
                "share_raised": float((pos > neg).mean()),
            }
        entry["minutes"] = round((time.time() - started) / 60, 2)
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache, entry)
        results[name] = entry
        if montage is None:
            montage = _edit_montage(images, reports, args.out / "edits" / f"{name}_edits.png")
    return results


def _edit_montage(images: dict[str, torch.Tensor], reports: list[str], path: Path, n: int = 6) -> Path:
    """Rows: the first prompts; columns: unedited, then each finding added through the knowledge."""
    from diffcxr_aug.figures import pyplot, save_figure

    plt = pyplot()
    keys = list(images)
    n = min(n, len(reports))
    fig, axes = plt.subplots(n, len(keys), figsize=(1.6 * len(keys), 1.7 * n + 0.4), squeeze=False)
    for r in range(n):
        for c, key in enumerate(keys):
            ax = axes[r, c]
            ax.imshow(images[key][r, 0].float().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("unedited" if key == "unedited" else f"+ {key}", fontsize=7)
        axes[r, 0].set_ylabel(reports[r][:28] + "...", fontsize=5)
    fig.suptitle("Same report and seed; only the knowledge text changes", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


# --------------------------------------------------------------------------------------------------- the summary
def _mean_std(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.{digits}f}"


def summarise(args: argparse.Namespace, arms: dict[str, Path], report: dict, edits: dict) -> dict:
    infos = {name: json.loads((folder / "training_info.json").read_text()) for name, folder in arms.items()}
    stage1_info = json.loads((args.stage1 / "training_info.json").read_text())
    synthetic = report["synthetic"]
    paired = {(p["a"], p["b"]): p for p in report["paired"]}

    def pair(a: str, b: str) -> dict | None:
        if (a, b) in paired:
            return paired[(a, b)]
        if (b, a) in paired:
            p = paired[(b, a)]
            ci = p["ci95"]
            return p | {"mauc_difference": -p["mauc_difference"], "ci95": None if ci is None else [-ci[1], -ci[0]]}
        return None

    rows = []
    for name in ["stage1", *arms]:
        entry, info = synthetic[name], infos.get(name, stage1_info)
        fid = entry["fidelity"]
        rows.append(
            {
                "set": name,
                "steps_this_budget": None
                if name == "stage1"
                else info["steps"] - (info.get("resumed_from_step") or 0),
                "total_steps": info["steps"] if info.get("stage", 1) == 1 else stage1_info["steps"],
                "adapter_steps": info["steps"] if info.get("stage", 1) == 2 else None,
                "minutes": None if name == "stage1" else info.get("wall_minutes_this_invocation"),
                "fid": fid["fid"],
                "kid": fid["kid"],
                "precision": fid.get("precision"),
                "recall": fid.get("recall"),
                "density": fid.get("density"),
                "coverage": fid.get("coverage"),
                "faithfulness": entry["faithfulness"]["mauc"],
                "faithfulness_ci95": entry["faithfulness"].get("mauc_ci95"),
            }
        )
    diffs = []
    for seed in args.seeds:
        p = pair(f"dkim-s{seed}", f"cont-s{seed}")
        diffs.append({"seed": seed, **({} if p is None else {"diff": p["mauc_difference"], "ci95": p["ci95"]})})
    labels = sorted(report["real_test"]["faithfulness"]["per_label"])
    per_label = []
    for label in labels:

        def vals(kind: str, label: str = label) -> list[float]:
            return [
                synthetic[f"{kind}-s{s}"]["faithfulness"]["per_label"].get(label)
                for s in args.seeds
                if synthetic[f"{kind}-s{s}"]["faithfulness"]["per_label"].get(label) is not None
            ]

        d, c = vals("dkim"), vals("cont")
        paired_d = [a - b for a, b in zip(d, c, strict=False)] if len(d) == len(c) else []
        per_label.append(
            {
                "label": label,
                "real_test": report["real_test"]["faithfulness"]["per_label"].get(label),
                "stage1": synthetic["stage1"]["faithfulness"]["per_label"].get(label),
                "dkim": d,
                "cont": c,
                "diff": paired_d,
                "worst_drawn": label in WORST_DRAWN,
            }
        )
    summary = {
        "stage1": str(args.stage1),
        "stage1_steps": stage1_info["steps"],
        "minutes_per_arm": args.minutes,
        "seeds": args.seeds,
        "n_images": args.n,
        "sets": rows,
        "paired_dkim_minus_cont": diffs,
        "per_label": per_label,
        "edits": edits,
        "real_test_mauc": report["real_test"]["faithfulness"]["mauc"],
        "floor_fid": report["real_test"]["floor"]["fid"],
    }
    atomic_write_json(args.out / "summary.json", summary)
    atomic_write_text(args.out / "summary.md", _markdown(summary))
    return summary


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _markdown(s: dict) -> str:
    lines = [
        f"# DKIM at equal budget: stage 2 vs stage 1 continued, {s['minutes_per_arm']} min each",
        "",
        f"From one stage-1 model ({s['stage1']}, {s['stage1_steps']} steps); {len(s['seeds'])} training seeds per "
        f"arm; {s['n_images']} images per set from the same prompts and seeds; one reference classifier (real test "
        f"mAUC {s['real_test_mauc']:.3f}; real-to-real FID floor {s['floor_fid']:.2f}).",
        "",
        "| set | steps in the budget | UNet steps | minutes | FID | KID | precision | recall | density | coverage "
        "| faithfulness mAUC [95% CI] |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in s["sets"]:
        ci = r["faithfulness_ci95"]
        ci_text = "" if ci is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]"
        lines.append(
            f"| {r['set']} | {r['steps_this_budget'] if r['steps_this_budget'] is not None else '–'} | "
            f"{r['total_steps']} | {_fmt(r['minutes'], 1)} | {_fmt(r['fid'], 2)} | {_fmt(r['kid'], 4)} | "
            f"{_fmt(r['precision'])} | {_fmt(r['recall'])} | {_fmt(r['density'])} | {_fmt(r['coverage'])} | "
            f"{r['faithfulness']:.3f}{ci_text} |"
        )
    by_kind = {k: [r for r in s["sets"] if r["set"].startswith(k)] for k in ("dkim", "cont")}
    lines += [
        "",
        "Mean ± std over training seeds:",
        "",
        "| arm | steps in the budget | FID | recall | faithfulness mAUC |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, label in (("dkim", "stage 2 (DKIM adapter)"), ("cont", "stage 1 continued")):
        rs = by_kind[kind]
        lines.append(
            f"| {label} | {_mean_std([r['steps_this_budget'] for r in rs], 0)} | "
            f"{_mean_std([r['fid'] for r in rs], 2)} | "
            f"{_mean_std([r['recall'] for r in rs])} | {_mean_std([r['faithfulness'] for r in rs])} |"
        )
    lines += [
        "",
        "Paired faithfulness difference, DKIM minus continuation, same training seed (bootstrap over images):",
        "",
    ]
    for d in s["paired_dkim_minus_cont"]:
        if "diff" in d:
            ci = d["ci95"]
            lines.append(f"- seed {d['seed']}: {d['diff']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]")
    values = [d["diff"] for d in s["paired_dkim_minus_cont"] if "diff" in d]
    if values:
        lines.append(f"- over seeds: {np.mean(values):+.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.3f}")
    lines += [
        "",
        "Per label (faithfulness AUC, mean over seeds; diff: paired by seed, mean ± std; * = drawn worst by stage 1):",
        "",
        "| label | real test | stage 1 | DKIM | continued | DKIM - continued |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in s["per_label"]:
        star = " *" if r["worst_drawn"] else ""
        mean = lambda v: _fmt(float(np.mean(v))) if v else "–"  # noqa: E731
        lines.append(
            f"| {r['label']}{star} | {_fmt(r['real_test'])} | {_fmt(r['stage1'])} | {mean(r['dkim'])} | "
            f"{mean(r['cont'])} | {_mean_std(r['diff']) if r['diff'] else '–'} |"
        )
    if s["edits"]:
        findings = list(next(iter(s["edits"].values()))["findings"])
        lines += [
            "",
            "Knowledge edits: the reference classifier's AUC for the added finding, edited vs unedited images "
            "(same normal report and seed; 0.5 = the knowledge does not move the image):",
            "",
            "| arm | " + " | ".join(findings) + " |",
            "|---|" + "---|" * len(findings),
        ]
        for name, entry in s["edits"].items():
            cells = []
            for f in findings:
                e = entry["findings"][f]
                cells.append(f"{e['auc']:.3f} [{e['auc_ci95'][0]:.3f}, {e['auc_ci95'][1]:.3f}]")
            lines.append(f"| {name} ({entry['n_prompts']} prompts) | " + " | ".join(cells) + " |")
        lines.append(
            "| mean ± std | "
            + " | ".join(_mean_std([e["findings"][f]["auc"] for e in s["edits"].values()]) for f in findings)
            + " |"
        )
    return "\n".join(lines) + "\n"


def copy_records(args: argparse.Namespace, arms: dict[str, Path]) -> None:
    dest = args.dest
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("summary.md", "summary.json"):
        shutil.copy2(args.out / name, dest / name)
    for name in ("report.md", "report.json", "faithfulness_per_label.png"):
        if (args.out / "evaluate" / name).is_file():
            shutil.copy2(args.out / "evaluate" / name, dest / name)
    for path in (args.out / "edits").glob("*"):
        shutil.copy2(path, dest / f"edits_{path.name}")
    for name, folder in arms.items():
        (dest / name).mkdir(exist_ok=True)
        shutil.copy2(folder / "training_info.json", dest / name / "training_info.json")
        shutil.copy2(folder / "logs" / "loss.csv", dest / name / "loss.csv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage1", type=Path, required=True, help="the stage-1 pipeline folder (with checkpoints/)")
    parser.add_argument("--data", type=Path, required=True, help="the manifest the arms train on")
    parser.add_argument("--real", type=Path, required=True, help="the real manifest: prompts, judge and references")
    parser.add_argument("--recipe", type=Path, default=None, help="recipe whose generator/synthesize/evaluate apply")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=8.0, help="each arm's wall-clock budget")
    parser.add_argument("--parallel", action="store_true", help="train a seed's two arms at once (same load)")
    parser.add_argument("--threads", type=int, default=1, help="--parallel: threads per arm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n", type=int, default=500, help="images per set")
    parser.add_argument("--edits", type=int, default=100, help="normal-report prompts edited per finding")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps of the edits (default: the recipe's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance of the edits (default: the recipe's)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--dest", type=Path, default=None, help="copy the summary and small records here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from diffcxr_aug.config import load_recipe

    section = load_recipe(args.recipe).synthesize if args.recipe is not None else None
    sample = {
        "steps": args.steps or (section.steps if section else 25),
        "guidance": args.guidance if args.guidance is not None else (section.guidance if section else 4.0),
    }
    arms = train_arms(args)
    sets = synthesize_sets(args, arms)
    report = evaluate_sets(args, sets)
    edits = knowledge_edits(args, arms, sample) if args.edits > 0 else {}
    summary = summarise(args, arms, report, edits)
    print(_markdown(summary))
    if args.dest is not None:
        copy_records(args, arms)


if __name__ == "__main__":
    main()
