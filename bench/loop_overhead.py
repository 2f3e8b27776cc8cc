"""Where the training loop's step differs from the bare step ``bench/perf.py`` times: A/B blocks in one process.

    python bench/loop_overhead.py [--config phantom-128] [--manifest runs/X/data/manifest.csv] [--blocks 3]

``train-generator``'s bf16 step took 0.484 s in the recipe's hour against 0.381 s in ``bench/perf.py`` (README,
"Performance"). This times the stage-1 step (UNet, token squeeze, image tower, InfoNCE, clipping, AdamW, EMA; bf16
autocast, math attention; random weights) in variants that each add one thing the loop does and the bench does not,
interleaved in blocks so that a drifting machine affects every variant alike:

- ``bench``: as ``bench/perf.py`` times it: 256 text tokens every step, autocast around forward and backward;
- ``text-lengths``: each step's text as long as the longest report of a batch drawn from ``--manifest``'s train
  reports (the loop pads to the batch's longest; oneDNN builds kernels per shape), or 120-256 tokens without one;
- ``text-buckets``: the same lengths rounded up to a multiple of 64 (a few shapes only);
- ``accelerate``: the objective and optimiser through ``accelerate``'s ``prepare`` (autocast on the forward only,
  outputs cast to fp32), ``accelerator.backward`` and ``accelerator.clip_grad_norm_``, as the loop runs them.

With ``--compile`` every variant runs its networks compiled, as ``train-generator --compile`` does
(``compile_networks``: UNet, token squeeze, image tower); each variant's first steps, which compile (and, for the
varying text lengths, recompile), are timed apart and printed as its compile seconds.

Prints the median seconds a step of each and its ratio to ``bench``; never pass/fail.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from perf import autocast, build  # noqa: E402


def batch_lengths(manifest: str | None, batch: int, n: int, cap: int, seed: int = 0) -> list[int]:
    """The text length of ``n`` training batches: the longest report (in the MiniLM tokenizer's tokens, capped)."""
    rng = np.random.default_rng(seed)
    if manifest is None:
        return [int(x) for x in rng.integers(120, cap + 1, n)]
    import pandas as pd
    from transformers import AutoTokenizer

    from diffcxr_aug.generator.text_encoder import minilm_path, token_lengths

    frame = pd.read_csv(manifest)
    reports = frame.loc[frame["split"] == "train", "report"].fillna("").tolist()
    lengths = np.array(token_lengths(AutoTokenizer.from_pretrained(minilm_path()), reports))
    return [int(min(cap, lengths[rng.integers(0, len(lengths), batch)].max())) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="phantom-128")
    parser.add_argument("--manifest", help="a manifest.csv whose train reports give the text lengths")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="steps a block")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--compile", action="store_true", help="the networks under torch.compile, as the loop's")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from accelerate import Accelerator
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from diffcxr_aug.generator.objective import compile_networks

    device = torch.device("cpu")
    parts = build(args.config, device, channels_last=False)
    objective, optimizer, ema, params = parts["objective"], parts["optimizer"], parts["ema"], parts["params"]
    cap, batch, latent = parts["cfg"].max_text_tokens, args.batch_size, parts["latent"]
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    wrapped = copy.deepcopy(objective)
    if args.compile:
        compile_networks(objective)
        compile_networks(wrapped)
    wrapped_optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-4)
    wrapped, wrapped_optimizer = accelerator.prepare(wrapped, wrapped_optimizer)
    lengths = batch_lengths(args.manifest, batch, args.blocks * args.steps * 4 + 16, cap)

    def inputs(length: int) -> tuple:
        latents = torch.randn(batch, 4, latent, latent)
        mask = torch.ones(batch, length, dtype=torch.long)
        text = {"states": torch.randn(batch, length, 384), "attention_mask": mask}
        null = {"states": torch.randn(1, 2, 384), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
        timesteps = torch.randint(0, 1000, (batch,))
        return latents, torch.randn_like(latents), timesteps, torch.rand(batch) < 0.1, text, null, torch.eye(batch) > 0

    def plain(length: int) -> None:
        with autocast("bf16", device, "math"):
            objective(*inputs(length))["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(params)

    def through_accelerate(length: int) -> None:
        with sdpa_kernel([SDPBackend.MATH]):
            accelerator.backward(wrapped(*inputs(length))["loss"])
        accelerator.clip_grad_norm_(wrapped.parameters(), 1.0)
        wrapped_optimizer.step()
        wrapped_optimizer.zero_grad(set_to_none=True)
        ema.step(params)  # the same EMA work as the others (of the unwrapped weights)

    variants = {
        "bench": lambda i: plain(cap),
        "text-lengths": lambda i: plain(lengths[i]),
        "text-buckets": lambda i: plain(-(-lengths[i] // 64) * 64),
        "accelerate": lambda i: through_accelerate(cap),
    }
    warmup = 3 if args.compile else 1  # compiled: a few lengths, so the varying shapes have recompiled
    first: dict[str, float] = {}
    i = 0
    for name, fn in variants.items():  # warm-up (and compile)
        start = time.perf_counter()
        for _ in range(warmup):
            fn(i)
            i += 1
        first[name] = time.perf_counter() - start
    if args.compile:
        print("warm-up (compile and first steps): " + ", ".join(f"{k} {v:.0f} s" for k, v in first.items()))
    times: dict[str, list[float]] = {k: [] for k in variants}
    for block in range(args.blocks):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                fn(i)
                i += 1
            times[name].append((time.perf_counter() - start) / args.steps)
        print(f"block {block}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()), flush=True)
    base = statistics.median(times["bench"])
    source = f"from {args.manifest}" if args.manifest else "120-256 uniform"
    compiled = ", compiled" if args.compile else ""
    print(f"\n{args.config}{compiled}, batch {batch}, {torch.get_num_threads()} threads, text lengths {source} "
          f"(median {int(np.median(lengths))})")  # fmt: skip
    print("| variant | s/step (median of blocks) | / bench |\n|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.3f} | {statistics.median(values) / base:.3f} |")


if __name__ == "__main__":
    main()
