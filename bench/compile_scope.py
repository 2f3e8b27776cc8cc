"""What each speed setting of the generator's training step buys, in one process: A/B blocks of the bare step.

    python bench/compile_scope.py [BLOCKS]      (default 3; each block times 6 steps of every arm)

Arms, each its own random-weight stage-1 objective (``bench/perf.py``'s ``build``: UNet, token squeeze, image tower,
InfoNCE, clipping, AdamW, EMA; phantom-128, batch 32, 256 text tokens):

- ``fp32``: fp32, torch's default attention, eager (the settings before issue 15);
- ``bf16``: bf16 autocast, the math attention backend, eager;
- ``bf16+unet``: and the UNet compiled (``train-generator --compile`` until 2026-12-06);
- ``bf16+unet+sq``: and the token squeeze and image tower compiled too (``compile_networks``, now);
- ``bf16+unet+sq+fused``: and AdamW's fused CPU kernel (``fused=True``).

Blocks interleave the arms, so a drifting machine affects each alike; prints each block and the medians with
their ratio to ``fp32``; never pass/fail. The compiles run first (minutes when inductor's cache is cold).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import perf  # noqa: E402

from diffcxr_aug.generator.objective import compile_networks  # noqa: E402


def main() -> None:
    blocks = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    device = torch.device("cpu")
    torch._dynamo.config.cache_size_limit = 64
    arms = {}

    def make(name: str, precision: str, attention: str, compiled: str, fused: bool = False) -> None:
        parts = perf.build("phantom-128", device, False)
        if fused:
            parts["optimizer"] = torch.optim.AdamW(parts["params"], lr=1e-4, fused=True)
        objective = parts["objective"]
        if compiled == "unet":
            objective.unet.compile()
        elif compiled == "all":
            compile_networks(objective)  # UNet, token squeeze, image tower: what train-generator --compile compiles
        arms[name] = (parts, precision, attention)

    make("fp32", "no", "default", "")
    make("bf16", "bf16", "math", "")
    make("bf16+unet", "bf16", "math", "unet")
    make("bf16+unet+sq", "bf16", "math", "all")
    make("bf16+unet+sq+fused", "bf16", "math", "all", fused=True)
    times: dict[str, list[float]] = {k: [] for k in arms}
    for block in range(blocks):
        for name, (parts, precision, attention) in arms.items():
            figures = perf.train_step_figures(parts, 32, precision, attention, device, 6)
            times[name].append(figures["seconds_per_step"])
            print(block, name, round(figures["seconds_per_step"], 3), flush=True)
    base = statistics.median(times["fp32"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:22s} median {median:.3f} s/step  ratio vs fp32 {base / median:.2f}x  "
              f"blocks {[round(x, 3) for x in values]}")  # fmt: skip


if __name__ == "__main__":
    main()
