"""How every step of ``bench/mimic_scale.py`` grows with N: its runs at several N side by side, a linear fit of each
step's seconds, and from it an estimate for MIMIC-CXR-JPG's 377,110 films.

    python bench/mimic_scale_growth.py RUN [RUN ...] [--target 377110] [--cores 16] [--out FILE.md]

Each ``RUN`` is the ``--out`` folder of one ``bench/mimic_scale.py`` run or its ``mimic_scale.json`` (or a copy of
it, as in ``docs/results/mimic_scale/``); give at least two N.
Prints (and with ``--out`` writes) markdown:

1. Per step and N: seconds per 1,000 films, peak RSS and peak anonymous memory (MiB), and the ratios of the largest
   N to the smallest: time per film (aim: within 20%) and memory (aim: within 1.2x). ``generator`` (20 steps) and
   ``synthesize`` (1,000 images) do the same work at every N, so their ratio is of seconds, not seconds per film:
   what grows there is the data setup alone (synthesize's estimate is its mean; the generator's data setup is
   extrapolated). A layout reused from an earlier run is left out.
2. The fit ``seconds = a + b * N`` per step (least squares over the runs) and the estimate at ``--target`` films on
   the measured machine. ``layout`` (writing the simulated films) and ``latent-store-again`` are left out of the
   total: a user's films exist, and a rerun is not the first run.
3. The same estimate on a ``--cores``-core machine, by Amdahl's law with the parallel share ``p`` read off the
   measured cache speedup from 1 to 2 workers at the largest N (``p = 2 (1 - 1 / speedup)``): the cache is the
   1-worker build projected to all the cores, and every other step that ran on all the cores here (prepare's
   threads, torch's threads; a store sharded over ranks) is assumed to scale from here as the cache did; LNFS and
   the generator's and synthesize's fixed work are kept as measured. An assumption, stated as one, not a
   measurement.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

MIMIC_FILMS = 377_110
FIXED_WORK = ("generator", "synthesize")  # the same steps or images at every N
CONSTANT = ("synthesize",)  # and nothing else: its estimate is its mean, not an extrapolation (the generator's data
# setup grows with N)
NOT_IN_TOTAL = ("layout", "latent-store-again")
NOT_SCALED = ("lnfs", *FIXED_WORK)  # kept as measured on more cores


def read_runs(folders: list[Path]) -> list[dict[str, Any]]:
    """The ``mimic_scale.json`` of each folder (or each JSON file given), sorted by N; refuses two runs of one N or a
    single run."""
    runs = []
    for folder in folders:
        path = folder if folder.suffix == ".json" else folder / "mimic_scale.json"
        if not path.is_file():
            raise SystemExit(f"{path}: not found; give the --out folders of bench/mimic_scale.py runs or their JSON")
        runs.append(json.loads(path.read_text()))
    runs.sort(key=lambda run: run["n"])
    sizes = [run["n"] for run in runs]
    if len(set(sizes)) != len(sizes) or len(sizes) < 2:
        raise SystemExit(f"need runs at two or more different N, got N = {sizes}")
    return runs


def step_table(runs: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """``{step: {n: row}}`` for the steps every run measured, in the order of the first run."""
    by_run = [{row["step"]: row for row in run["steps"]} for run in runs]
    common = [step for step in by_run[0] if all(step in rows for rows in by_run)]
    return {step: {run["n"]: rows[step] for run, rows in zip(runs, by_run, strict=True)} for step in common}


def fit(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """``(a, b)`` of ``seconds = a + b * N`` by least squares."""
    b, a = np.polyfit(np.asarray(sizes, float), np.asarray(seconds, float), 1)
    return float(a), float(b)


def parallel_share(table: dict[str, dict[int, dict[str, float]]]) -> float | None:
    """Amdahl's parallel share from the cache's 1- and 2-worker seconds at the largest N (None without both)."""
    if "cache-w1" not in table or "cache-w2" not in table:
        return None
    n = max(table["cache-w1"])
    speedup = table["cache-w1"][n]["seconds"] / table["cache-w2"][n]["seconds"]
    return float(np.clip(2 * (1 - 1 / speedup), 0.0, 1.0))


def growth(runs: list[dict[str, Any]], target: int = MIMIC_FILMS, cores: int = 16) -> dict[str, Any]:
    """Per step: the ratios of the largest N to the smallest, the fit and the estimates at ``target``."""
    table = step_table(runs)
    sizes = [run["n"] for run in runs]
    small, large = sizes[0], sizes[-1]
    share = parallel_share(table)
    here_cores = runs[-1]["machine"]["cpus"]
    cache_steps = [step for step in table if step.startswith("cache-w")]

    def amdahl(k: int) -> float:  # time on k cores relative to one core
        return (1 - share) + share / k

    steps = {}
    for step, rows in table.items():
        if any("reused" in str(rows[n].get("result", {}).get("note", "")) for n in sizes):
            continue  # a layout written by an earlier run: nothing measured
        seconds = [rows[n]["seconds"] for n in sizes]
        a, b = fit(sizes, seconds)
        fixed = step in FIXED_WORK
        per = [s if fixed else 1000 * s / n for s, n in zip(seconds, sizes, strict=True)]
        here = float(np.mean(seconds)) if step in CONSTANT else max(a + b * target, 0.0)
        # The steps below read the last cache built here (all the cores); on more cores the one build is the
        # 1-worker build projected.
        in_total = step not in NOT_IN_TOTAL and (not step.startswith("cache-w") or step == cache_steps[-1])
        in_cores_total = step not in NOT_IN_TOTAL and (not step.startswith("cache-w") or step == cache_steps[0])
        if share is None or not in_cores_total:
            scaled = None
        elif step in NOT_SCALED:
            scaled = here
        elif step.startswith("cache-w"):
            scaled = here * amdahl(cores) / amdahl(int(step.removeprefix("cache-w")))
        else:  # ran on all the cores here
            scaled = here * amdahl(cores) / amdahl(here_cores)
        steps[step] = {
            "per_1000": dict(zip(sizes, per, strict=True)),
            "time_ratio": per[-1] / per[0] if per[0] > 0 else float("nan"),
            "rss_mib": {n: rows[n]["peak_rss_mib"] for n in sizes},
            "anon_mib": {n: rows[n]["peak_anon_mib"] for n in sizes},
            "rss_ratio": rows[large]["peak_rss_mib"] / rows[small]["peak_rss_mib"],
            "anon_ratio": rows[large]["peak_anon_mib"] / max(rows[small]["peak_anon_mib"], 1.0),
            "fit": (a, b),
            "estimate_s": here if in_total else None,
            "estimate_cores_s": scaled,
            "fixed_work": fixed,
        }
    total_cores = None if share is None else sum(r["estimate_cores_s"] or 0.0 for r in steps.values())
    return {
        "sizes": sizes,
        "target": target,
        "cores": cores,
        "parallel_share": share,
        "steps": steps,
        "total_s": sum(r["estimate_s"] or 0.0 for r in steps.values()),
        "total_cores_s": total_cores,
        "machine": runs[-1]["machine"],
        "dates": [run["date"] for run in runs],
    }


def _hours(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def markdown(result: dict[str, Any]) -> str:
    sizes, target, cores = result["sizes"], result["target"], result["cores"]
    head = " / ".join(f"{n:,}" for n in sizes)
    lines = [
        f"| step | s / 1,000 films at N = {head} | time ratio | peak RSS MiB | peak anon MiB | RSS ratio |"
        f" anon ratio | estimate at {target:,} | on {cores} cores |",
        "|---|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for step, row in result["steps"].items():
        per = " / ".join(f"{v:.1f}" for v in row["per_1000"].values())
        if row["fixed_work"]:
            per = f"{per} s (fixed work{'' if step in CONSTANT else ' + data setup'})"
        rss = " / ".join(f"{v:.0f}" for v in row["rss_mib"].values())
        anon = " / ".join(f"{v:.0f}" for v in row["anon_mib"].values())
        here = "-" if row["estimate_s"] is None else _hours(row["estimate_s"])
        scaled = "-" if row["estimate_cores_s"] is None else _hours(row["estimate_cores_s"])
        lines.append(
            f"| {step} | {per} | {row['time_ratio']:.2f} | {rss} | {anon} | {row['rss_ratio']:.2f} | "
            f"{row['anon_ratio']:.2f} | {here} | {scaled} |"
        )
    share = result["parallel_share"]
    lines += [
        "",
        f"Fit `seconds = a + b * N` per step over N = {', '.join(f'{n:,}' for n in sizes)}. Total at {target:,} films "
        f"(every step but layout and the rerun): **{_hours(result['total_s'])}** on this machine "
        f"({result['machine']['cpus']} CPUs).",
    ]
    if share is not None:
        lines.append(
            f"On {cores} cores, assuming every parallel step scales as the cache did from 1 to 2 workers (Amdahl, "
            f"parallel share p = {share:.2f}; LNFS and the fixed work kept as measured): "
            f"**{_hours(result['total_cores_s'])}**."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", help="bench/mimic_scale.py --out folders or their JSON")
    parser.add_argument("--target", type=int, default=MIMIC_FILMS, help="films to estimate for")
    parser.add_argument("--cores", type=int, default=16, help="cores of the machine to project to")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args(argv)
    result = growth(read_runs(args.folders), args.target, args.cores)
    text = markdown(result)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.out)
    print(text)
    return result


if __name__ == "__main__":
    main()
