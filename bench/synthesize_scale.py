"""Images per second and peak memory of ``synthesize`` as N grows, on a randomly initialised generator.

    python bench/synthesize_scale.py [--config phantom-64] [--flat-n 1000 5000] [--flat-steps 2] [--flat-guidance 1]
                                     [--speed-n 200] [--speed-steps 20] [--speed-guidance 4] [--device cpu]
                                     [--work DIR]

Random weights sample as fast as trained ones (same architecture, same FLOPs), so speed and memory need no
training. The script writes a ``--config`` pipeline (VAE, text encoder, token squeeze, UNet at their
initialisation; the registry's pretrained text encoder, MiniLM for the phantom configs) and a small phantom
prompt manifest, then runs ``diffcxr-aug synthesize`` in a fresh process per measurement, so each peak RSS
is that run's alone:

* flatness: ``--flat-n`` images each at ``--flat-steps`` sampler steps without guidance (few steps and one
  UNet pass a step keep the CPU cost low; neither changes what memory holds as N grows), then the same
  command again on the finished folder (every image checked, nothing made);
* speed: ``--speed-n`` images at ``--speed-steps`` steps and guidance 4, the setting a user runs.

Prints one JSON object: per run the images, seconds, images/s, peak RSS (the process's, from ``wait4``, and
the one ``synthesis.json`` records), peak CUDA memory, GFLOPs per image, batch size; and the ratio of each
flatness run's peak RSS to the first's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]


def build_random_pipeline(config: str, out: Path) -> Path:
    """A ``DiffCXRPipeline`` folder for a registered config, at its random initialisation (seed 0)."""
    from diffcxr_aug.generator.configs import build_unet, get_config
    from diffcxr_aug.generator.pipeline import DiffCXRPipeline, default_scheduler
    from diffcxr_aug.generator.text_encoder import load_text_encoder
    from diffcxr_aug.generator.token_squeeze import TokenSqueeze
    from diffcxr_aug.generator.vae import build_vae, latent_shape

    cfg = get_config(config)
    torch.manual_seed(0)
    vae = build_vae(cfg.vae, cfg.image_size)
    channels, height, _ = latent_shape(vae, cfg.image_size)
    bundle = load_text_encoder(cfg.text_encoder, cfg.max_text_tokens, reports=["no acute findings"], seed=0)
    squeeze = TokenSqueeze(
        text_dim=bundle.hidden_size,
        cross_attention_dim=cfg.cross_attention_dim,
        num_tokens=cfg.num_tokens,
        **cfg.squeeze,
    )
    pipeline = DiffCXRPipeline(
        vae=vae,
        text_encoder=bundle.model,
        tokenizer=bundle.tokenizer,
        token_squeeze=squeeze,
        unet=build_unet(cfg, latent_channels=channels, latent_size=height),
        scheduler=default_scheduler(cfg.num_train_timesteps, cfg.beta_schedule, cfg.prediction_type),
        max_text_tokens=bundle.max_length,
    )
    pipeline.save_pretrained(out, safe_serialization=True)
    return out


def run_synthesize(generator: Path, prompts: Path, out: Path, n: int, setting: dict) -> dict:
    """One ``diffcxr-aug synthesize`` process: its wall time and peak RSS, and what ``synthesis.json`` recorded
    (the timing and memory of the run that made the images: on a rerun that makes none, the earlier run's)."""
    command = [sys.executable, "-m", "diffcxr_aug.cli", "synthesize", "--n", str(n), "--generator", str(generator)]
    command += ["--out", str(out), "--prompts", str(prompts)]
    command += [f"--{key}={value}" for key, value in setting.items()]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage: its peak RSS, whatever it records
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit status {os.waitstatus_to_exitcode(status)}")
    job = json.loads((out / "synthesis.json").read_text())
    return {
        "n": n,
        **setting,
        "wall_seconds": round(wall, 1),
        "process_peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "images_made": job["rank_images"],
        "sampling_seconds": round(job["seconds"], 1),
        "images_per_second": round(job["images_per_second"], 3),
        "peak_rss_mib": job["peak_rss_mib"],
        "peak_cuda_mib": job["peak_cuda_mib"],
        "gflops_per_image": round(job["gflops_per_image"], 2),
        "batch_size": job["batch_size"],
        "manifest_rows": len(pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)),
        "image_files": sum(1 for _ in out.glob("images/*/*.png")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="phantom-64")
    parser.add_argument("--flat-n", type=int, nargs="*", default=[1000, 5000])
    parser.add_argument("--flat-steps", type=int, default=2)
    parser.add_argument(
        "--flat-guidance", type=float, default=1.0, help="1: no classifier-free guidance (half the cost)"
    )
    parser.add_argument("--speed-n", type=int, default=200)
    parser.add_argument("--speed-steps", type=int, default=20)
    parser.add_argument("--speed-guidance", type=float, default=4.0, help="the synthesize default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=None, help="folder for the pipeline and outputs (default: temp)")
    args = parser.parse_args()

    from diffcxr_aug.data.prepare import prepare_dataset
    from diffcxr_aug.generator.configs import get_config

    work = args.work or Path(tempfile.mkdtemp(prefix="synthesize_scale_"))
    generator = build_random_pipeline(args.config, work / "generator")
    prompts = prepare_dataset("phantom", work / "prompts", size=get_config(args.config).image_size, n=200)
    flat_setting = {"steps": args.flat_steps, "guidance": args.flat_guidance, "device": args.device}
    flat = [run_synthesize(generator, prompts, work / f"flat-{n}", n, flat_setting) for n in args.flat_n]
    last = args.flat_n[-1]
    rerun = run_synthesize(generator, prompts, work / f"flat-{last}", last, flat_setting)
    speed_setting = {"steps": args.speed_steps, "guidance": args.speed_guidance, "device": args.device}
    speed = run_synthesize(generator, prompts, work / "speed", args.speed_n, speed_setting)
    base = flat[0]["process_peak_rss_mib"]
    print(
        json.dumps(
            {
                "config": args.config,
                "device": args.device,
                "torch_threads": torch.get_num_threads(),
                "flatness_runs": flat,
                "peak_rss_ratio_to_first": [round(run["process_peak_rss_mib"] / base, 3) for run in flat],
                f"rerun_of_finished_{last}": {k: rerun[k] for k in ("wall_seconds", "process_peak_rss_mib")},
                "speed_run": speed,
                "work": str(work),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
