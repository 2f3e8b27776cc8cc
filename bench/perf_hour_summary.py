"""The tables of ``bench/perf_hour.sh``: the two arms of the hour, and the sampler sweep, from one evaluation.

    python bench/perf_hour_summary.py runs/p128v4 [--dest docs/results/perf_hour]

Writes ``OUT/summary.md`` and ``OUT/summary.json`` (and with ``--dest`` copies them there, with the small records:
training_info.json and loss.csv of each arm, the filter report, the evaluation's report.md and report.json, the
warm-up's time and the box monitor's logs where the run has them).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pandas as pd

from diffcxr_aug.io import atomic_write_json, atomic_write_text

ARMS = ("fast", "fp32")


def _settings(info: dict) -> str:
    """What an arm ran with, from its training_info.json."""
    precision = "bf16 autocast" if info["mixed_precision"] == "bf16" else info["mixed_precision"].replace("no", "fp32")
    attention = {"math": "math attention", "default": "torch's default attention"}.get(
        info.get("attention", "default")
    )
    # Runs before compile_networks compiled the UNet alone and did not record the list.
    compiled = info.get("compiled_networks") or (["unet"] if info.get("compiled") else [])
    names = {"unet": "UNet", "token_squeeze": "token squeeze", "image_tower": "image tower", "adapter": "adapter"}
    return ", ".join(
        [precision, attention or str(info.get("attention"))]
        + (["compiled " + ", ".join(names.get(n, n) for n in compiled)] if compiled else [])
    )


def _arm(out: Path, name: str) -> dict:
    info = json.loads((out / f"gen-{name}" / "training_info.json").read_text())
    loss = pd.read_csv(out / f"gen-{name}" / "logs" / "loss.csv")
    minutes = info["wall_minutes_total"]
    return {
        "settings": _settings(info),
        "mixed_precision": info["mixed_precision"],
        "attention": info.get("attention", "default"),
        "steps": info["steps"],
        "minutes": minutes,
        "seconds_per_step": 60 * minutes / info["steps"],
        "loss_last_200_steps": float(loss["loss"].tail(200).mean()),
        # The loop's clock at the end of step 1: setting up, and for a compiled arm its compile.
        "first_step_s": float(loss["elapsed_s"].iloc[0]),
        "box": _box(out, name),
    }


def _box(out: Path, name: str) -> dict | None:
    """The box during an arm, from ``monitor-NAME.txt`` (``perf_hour.sh`` logs it every 30 s; older runs lack it):
    the median 1-minute load and the share of CPU time the hypervisor stole, from /proc/stat's first and last line."""
    path = out / f"monitor-{name}.txt"
    lines = [line.split("|") for line in path.read_text().splitlines() if "|" in line] if path.exists() else []
    if len(lines) < 2:
        return None
    loads = sorted(float(line[0].split()[2]) for line in lines)
    first, last = ([int(x) for x in line[1].split()[1:]] for line in (lines[0], lines[-1]))
    delta = [b - a for a, b in zip(first, last, strict=True)]
    return {"load_1min_median": loads[len(loads) // 2], "steal_share": delta[7] / max(sum(delta[:8]), 1),
            "samples": len(lines)}  # fmt: skip


def _paired(report: dict, a: str, b: str) -> dict | None:
    for row in report["paired"]:
        if {row["a"], row["b"]} == {a, b} and row.get("ci95") and row.get("mauc_difference") is not None:
            sign = 1 if row["a"] == a else -1
            low, high = sorted(sign * x for x in row["ci95"])
            return {"difference": sign * row["mauc_difference"], "ci95": [low, high]}
    return None


def _set(report: dict, name: str) -> dict:
    s = report["synthetic"][name]
    return {
        "fid": s["fidelity"]["fid"],
        "kid": s["fidelity"]["kid"],
        "kid_std": s["fidelity"]["kid_std"],
        "faithfulness": s["faithfulness"]["mauc"],
        "faithfulness_ci95": s["faithfulness"]["mauc_ci95"],
        "images": s["n_images"],
        "images_per_second": s["compute"].get("images_per_second"),
        "gflops_per_image": s["compute"].get("gflops_per_image"),
    }


def _fmt_diff(d: dict | None) -> str:
    return "" if d is None else f"{d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"


def summarize(out: Path) -> dict:
    report = json.loads((out / "evaluation" / "report.json").read_text())
    filter_s = float((out / "filter_time.txt").read_text().split()[1])
    arms = {name: _arm(out, name) for name in ARMS}
    warmup = out / "warmup_time.txt"  # WARM=1: the fast arm's networks compiled before its clock started
    sets = {name: _set(report, name) for name in report["synthetic"]}
    sweep = {}
    for sampler, prefix in (("dpm-solver++", "dpm"), ("unipc", "unipc")):
        for steps in (10, 15, 25, 50):
            name = "fast-bf16" if (prefix, steps) == ("dpm", 25) else f"{prefix}{steps}"
            if name in sets:
                sweep[f"{sampler} {steps}"] = {
                    "set": name,
                    **sets[name],
                    "vs_dpm25": _paired(report, name, "fast-bf16"),
                }
    summary = {
        "filter_minutes": filter_s / 60,
        "arms": arms,
        "step_ratio": arms["fast"]["steps"] / arms["fp32"]["steps"],
        "warmup_s": float(warmup.read_text().split()[1]) if warmup.exists() else None,
        "sets": sets,
        "fast_minus_fp32": _paired(report, "fast", "fp32"),
        "bf16_sampling_minus_fp32_sampling": _paired(report, "fast-bf16", "fast"),
        "floor_fid": report["real_test"]["floor"]["fid"],
        "real_test_faithfulness": report["real_test"]["faithfulness"]["mauc"],
        "sweep": sweep,
    }
    return summary


def markdown(s: dict) -> str:
    lines = [
        f"VAE + LNFS filter (shared by both arms): {s['filter_minutes']:.1f} min. Step ratio fast / fp32: "
        f"{s['step_ratio']:.2f}x. Inductor's cache: "
        + (
            "cold (the fast arm compiled inside its hour)."
            if s.get("warmup_s") is None
            else f"warm (a one-step run of the fast arm's settings compiled first, outside the clock: "
            f"{s['warmup_s']:.0f} s)."
        ),
        "",
        "| arm | settings | steps | minutes | first step ends at (s) | s/step | loss (last 200 steps) | FID "
        "| KID x1000 "
        "| faithfulness mAUC |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, arm in s["arms"].items():
        st = s["sets"][name]
        lines.append(
            f"| {name} | {arm['settings']} | {arm['steps']} | {arm['minutes']:.1f} "
            f"| {arm['first_step_s']:.0f} | {arm['seconds_per_step']:.3f} "
            f"| {arm['loss_last_200_steps']:.4f} | {st['fid']:.2f} "
            f"| {1000 * st['kid']:.1f} ± {1000 * st['kid_std']:.1f} "
            f"| {st['faithfulness']:.3f} [{st['faithfulness_ci95'][0]:.3f}, {st['faithfulness_ci95'][1]:.3f}] |"
        )
    lines += [
        "",
        f"Paired faithfulness, fast - fp32 (same prompts and seeds): {_fmt_diff(s['fast_minus_fp32'])}. "
        f"bf16 sampling - fp32 sampling of the fast model: {_fmt_diff(s['bf16_sampling_minus_fp32_sampling'])} "
        f"(FID {s['sets']['fast-bf16']['fid']:.2f} vs {s['sets']['fast']['fid']:.2f}). Floor FID (real vs real) "
        f"{s['floor_fid']:.2f}; real test faithfulness {s['real_test_faithfulness']:.3f}.",
    ]
    boxes = [(name, arm["box"]) for name, arm in s["arms"].items() if arm.get("box")]
    if boxes:
        lines += [
            "",
            "The box during each arm (monitor-NAME.txt): "
            + "; ".join(
                f"{name}: median load {b['load_1min_median']:.2f}, steal {100 * b['steal_share']:.1f}% of CPU time"
                for name, b in boxes
            )
            + ".",
        ]
    if s["sweep"]:  # SWEEP=0 runs have none
        lines += [
            "",
            "| sampler | steps | GFLOPs / image | FID | faithfulness mAUC | vs DPM-Solver++ 25 (paired) | img/s |",
            "|---|---|---|---|---|---|---|",
        ]
    for key, row in s["sweep"].items():
        sampler, steps = key.rsplit(" ", 1)
        ips, gflops = row["images_per_second"], row["gflops_per_image"]
        lines.append(
            f"| {sampler} | {steps} | {'' if gflops is None else f'{gflops:.1f}'} | {row['fid']:.2f} "
            f"| {row['faithfulness']:.3f} "
            f"| {_fmt_diff(row['vs_dpm25']) or '(reference)'} | {'' if ips is None else f'{ips:.2f}'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dest", type=Path, help="copy the summary and the small records here")
    args = parser.parse_args()
    summary = summarize(args.out)
    text = markdown(summary)
    atomic_write_json(args.out / "summary.json", summary)
    atomic_write_text(args.out / "summary.md", text)
    print(text)
    if args.dest:
        args.dest.mkdir(parents=True, exist_ok=True)
        for name in ("summary.json", "summary.md", "filtered/filter_report.json", "filter_time.txt",
                     "evaluation/report.md", "evaluation/report.json"):  # fmt: skip
            shutil.copy(args.out / name, args.dest / Path(name).name)
        for name in ("warmup_time.txt", *(f"monitor-{arm}.txt" for arm in ARMS)):  # where the run has them
            if (args.out / name).exists():
                shutil.copy(args.out / name, args.dest / name)
        for arm in ARMS:
            for name in ("training_info.json", "logs/loss.csv"):
                shutil.copy(args.out / f"gen-{arm}" / name, args.dest / f"{arm}_{Path(name).name}")


if __name__ == "__main__":
    main()
