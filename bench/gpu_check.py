"""One-command GPU check: the CUDA tests, training and sampling speed of the paper's configs, and a recipe end to end.

    python bench/gpu_check.py --out DIR [--device cuda|cpu] [--tiny] [--budget-s 420] [--parts training,...]

One call on one GPU, in about ``--budget-s`` seconds (default 420 on a GPU; a part that overruns its share is stopped
30 s later, so the whole ends within 8 minutes), writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md``:

1. ``cuda_tests``: the suite's CUDA tests (``pytest -m cuda``: stage 1 and 2 in bf16 and fp16, exact resume,
   synthesize in both precisions, a classifier epoch under autocast, evaluate), their summary line and counts;
2. ``training``: ``paper-256`` and ``paper-512`` training steps (bench/perf.py's stage-1 objective on cached latents
   and text states, AdamW, EMA), each with and without gradient checkpointing and ``torch.compile``, at the largest
   batch that fits (doubled from 1 until out of memory, a cap or a slow step; then the last that fitted): seconds a
   step, images/s, TFLOP/s from the model's FLOPs (bench/perf.py's count at batch 1, times the batch: the
   recomputation of checkpointing is not counted as work), MFU against the card's dense peak in the precision
   trained (:data:`PEAK_TFLOPS`), peak memory beside the estimate ``train-generator`` logs;
3. ``sampling``: images/s of the real ``DiffCXRPipeline`` (random weights, the SD VAE's architecture) at 25
   DPM-Solver++ steps with guidance 4, bf16, at 256 and 512 px, and its GFLOPs an image (FlopCounterMode over one
   call at batch 1);
4. ``recipe``: ``recipes/mimic-cxr.yaml`` at tiny size (the fake MIMIC layout and tiny local models of
   tests/test_real_recipes.py) end to end through ``diffcxr-aug run`` on the device.

Each part runs in its own process with its share of the budget, and writes what it did as it goes; a part that
fails, crashes or runs out of time is recorded with the reason and the rest still run, and the JSON and markdown are
always written. ``--device cpu --tiny`` runs every part at toy size on a CPU (``tiny`` and ``tiny-512`` stand in for
the paper's configs, one or two steps) in a few minutes: the suite runs that mode (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
for folder in (REPO_ROOT, REPO_ROOT / "bench"):  # bench/perf.py, and tests/ for the recipe's fakes
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

PARTS = ("cuda_tests", "training", "sampling", "recipe")
# Each part's share of the time left when it starts (the time an early part does not use goes to the later ones).
SHARES = {"cuda_tests": 0.3, "training": 0.35, "sampling": 0.1, "recipe": 0.25}
# Dense (no sparsity) peak TFLOP/s by card, first match of the name, in (bf16, fp16); None: no such tensor cores.
PEAK_TFLOPS: tuple[tuple[str, tuple[float | None, float]], ...] = (
    ("H200", (989.0, 989.0)),
    ("H100 PCIe", (756.0, 756.0)),
    ("H100", (989.0, 989.0)),  # SXM (the name says "HBM3")
    ("A100", (312.0, 312.0)),
    ("L40S", (362.0, 362.0)),
    ("A10G", (125.0, 125.0)),
    ("V100", (None, 125.0)),
    ("T4", (None, 65.0)),
)
# stabilityai/sd-vae-ft-mse's config.json: the paper configs' VAE, built here with random weights (the machine may be
# offline, and the speed does not depend on the weights).
SD_VAE_ARCHITECTURE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}
GIB = 2**30


# ----------------------------------------------------------------------------------------------- records
class Record:
    """One part's record, written to ``path`` (atomically) after every change, so that a part stopped half-way
    leaves what it did."""

    def __init__(self, path: Path, **fields: Any) -> None:
        self.path, self.data = path, {"status": "running", **fields}
        self.save()

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.save()

    def append(self, key: str, item: dict[str, Any]) -> None:
        self.data.setdefault(key, []).append(item)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


def peak_tflops(card: str, precision: str) -> float | None:
    """The card's dense peak in ``precision`` (``bf16`` or ``fp16``), or ``None`` (an unknown card, fp32)."""
    for name, (bf16, fp16) in PEAK_TFLOPS:
        if name in card:
            return {"bf16": bf16, "fp16": fp16}.get(precision)
    return None


def device_facts(device: Any) -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts |= {
            "card": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / GIB, 1),
            "cuda": torch.version.cuda,
        }
    else:
        facts |= {"card": f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"}
    return facts


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: Any) -> float:
    """Peak memory since the last reset: allocated CUDA memory, or this process's peak RSS on a CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _reset_memory(device: Any) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _text(output: bytes | str | None) -> str:
    """A subprocess's captured output (bytes when it timed out, whatever ``text`` asked for)."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def _child_env() -> dict[str, str]:
    """The environment of a command run from here: the repository first on the path, before what was there (a
    machine without the project installed may carry its packages on PYTHONPATH)."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def _is_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


# ------------------------------------------------------------------------------------------ 1. CUDA tests
def part_cuda_tests(record: Record, args: argparse.Namespace) -> None:
    """``pytest -m cuda`` over the suite, as a subprocess: its summary line and counts. A test module that cannot be
    imported on the machine (a missing optional package) is listed, and the CUDA tests of the others still run."""
    # -v: a run stopped at its time limit still shows, in its tail, which tests passed.
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-p", "no:cacheprovider"]
    command += ["--continue-on-collection-errors", str(REPO_ROOT / "tests")]
    record.update(command=" ".join(command[1:]))
    env = _child_env()
    timeout = max(10.0, args.deadline - time.monotonic() - 5)
    try:
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        record.update(status="stopped", note=f"pytest ran past {timeout:.0f} s", tail=_text(error.stdout)[-3000:])
        return
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    summary = next(
        (line.strip("= ") for line in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|error)", line)), ""
    )
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", summary)}
    reasons = sorted({line for line in lines if line.startswith(("SKIPPED", "FAILED", "ERROR"))})
    # "ERROR tests/test_x.py - ..." is a module that was not collected; "ERROR tests/test_x.py::test - ..." a test.
    not_collected = [line for line in reasons if line.startswith("ERROR") and "::" not in line.split(" - ")[0]]
    broken = counts.get("failed", 0) + sum(v for k, v in counts.items() if k.startswith("error")) - len(not_collected)
    status = "failed" if broken > 0 or result.returncode not in (0, 1, 5) else "ok"  # 5: no test selected
    record.update(
        status=status,
        returncode=result.returncode,
        summary=summary,
        counts=counts,
        not_collected=not_collected,
        reasons=reasons[:40],
        tail=result.stdout[-3000:] if status == "failed" else "",
    )


# --------------------------------------------------------------------------------------------- 2. training
def _train_inputs(parts: dict[str, Any], batch: int, device: Any) -> dict[str, Any]:
    """Random cached latents and text states of one batch, as bench/perf.py's step reads them."""
    import torch

    cfg, latent = parts["cfg"], parts["latent"]
    latents = torch.randn(batch, 4, latent, latent, device=device)
    states = torch.randn(batch, cfg.max_text_tokens, 384, device=device)
    mask = torch.ones(batch, cfg.max_text_tokens, dtype=torch.long, device=device)
    return {
        "latents": latents,
        "noise": torch.randn_like(latents),
        "timesteps": torch.randint(0, 1000, (batch,), device=device),
        "drop": torch.zeros(batch, dtype=torch.bool, device=device),
        "text": {"states": states, "attention_mask": mask},
        "null_text": {"states": states[:1], "attention_mask": mask[:1]},
        "positive_mask": torch.eye(batch, dtype=torch.bool, device=device),
    }


def _step(parts: dict[str, Any], inputs: dict[str, Any], precision: str, attention: str) -> None:
    """One training step as bench/perf.py times it: forward and backward under autocast, clipping, AdamW, EMA."""
    import perf
    import torch

    device = inputs["latents"].device
    with perf.autocast(precision, device, attention):
        losses = parts["objective"](**inputs)
        losses["loss"].backward()
    torch.nn.utils.clip_grad_norm_(parts["params"], 1.0)
    parts["optimizer"].step()
    parts["optimizer"].zero_grad(set_to_none=True)
    parts["ema"].step(parts["params"])


def timed_steps(
    parts: dict[str, Any], batch: int, precision: str, attention: str, device: Any, warmup: int, repeats: int
) -> list[float]:
    """Seconds of ``repeats`` steps at ``batch`` after ``warmup`` untimed ones (a compiled network compiles in the
    first); raises out-of-memory as torch does.

    bench/perf.py's ``train_step_figures`` is not used here: it counts the FLOPs of each batch in a FlopCounterMode
    pass, which a compiled network compiles a second time for; the FLOPs are counted once, eagerly, at batch 1."""
    inputs = _train_inputs(parts, batch, device)
    for _ in range(warmup):
        _step(parts, inputs, precision, attention)
    seconds = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        _step(parts, inputs, precision, attention)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def _fits(
    parts: dict[str, Any], batch: int, precision: str, attention: str, device: Any, warmup: int, repeats: int
) -> list[float] | None:
    """:func:`timed_steps`, or ``None`` when ``batch`` ran out of memory (the memory then freed)."""
    import torch

    failed = False
    try:
        return timed_steps(parts, batch, precision, attention, device, warmup, repeats)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
        if not _is_oom(error):
            raise
        failed = True  # out of the except block first, so the failed step's tensors can be freed
    if failed:
        parts["optimizer"].zero_grad(set_to_none=True)
        _reset_memory(device)
    return None


def largest_batch(
    parts: dict[str, Any], precision: str, attention: str, device: Any, cap: int, slow_s: float
) -> tuple[int, str]:
    """The largest batch that trains: doubled from 1 until out of memory, ``cap``, or a step slower than ``slow_s``
    (a larger one would not fit the time budget); then the last one that fitted. Returns it and why the doubling
    stopped."""
    batch, fitted, why = 1, 0, f"cap {cap}"
    while batch <= cap:
        # A first step loads kernels and sets up cuBLAS: batch 1 is warmed up before it is timed.
        seconds = _fits(parts, batch, precision, attention, device, warmup=int(batch == 1), repeats=1)
        if seconds is None:
            why = f"out of memory at {batch}"
            break
        fitted = batch
        if seconds[0] > slow_s:
            why = f"a step at {batch} took {seconds[0]:.1f} s"
            break
        batch *= 2
    return fitted, why


@contextlib.contextmanager
def _built(config: str, device: Any, checkpointing: bool, compiled: str | None) -> Iterator[dict[str, Any]]:
    """bench/perf.py's training parts of ``config``, built on ``device`` (initialised there: seconds, not minutes,
    for 374 M parameters), with gradient checkpointing and ``torch.compile`` (the backend named) as train-generator
    applies them."""
    import perf
    import torch

    from diffcxr_aug.generator.objective import compile_networks, enable_gradient_checkpointing

    with torch.device(device):
        parts = perf.build(config, device, channels_last=False)
    if checkpointing:
        enable_gradient_checkpointing(parts["objective"])
    if compiled == "inductor":
        compile_networks(parts["objective"])  # as train-generator's `compile: true`
    elif compiled:  # the toy mode: the same graphs captured; inductor's code generation takes minutes on a CPU
        for name in ("unet", "token_squeeze", "image_tower"):  # the networks compile_networks compiles here
            getattr(parts["objective"], name).compile(backend=compiled)
    try:
        yield parts
    finally:
        del parts
        if compiled:
            torch._dynamo.reset()
        _reset_memory(device)


def part_training(record: Record, args: argparse.Namespace) -> None:
    """Training steps of the two configs, eager rows first (their batch is searched), compiled rows after."""
    import perf

    from diffcxr_aug.generator.objective import memory_at, training_memory
    from diffcxr_aug.runtime import resolve_device, resolve_mixed_precision

    device = resolve_device(args.device)
    facts = device_facts(device)
    precision = resolve_mixed_precision("auto", device, cpu_auto="bf16")  # as train-generator resolves auto
    attention = "math" if device.type == "cpu" else "default"  # train-generator's attention: auto
    peak = peak_tflops(facts["card"], precision) if device.type == "cuda" else None
    configs = {"paper-256": "tiny", "paper-512": "tiny-512"} if args.tiny else {"paper-256": None, "paper-512": None}
    cap, repeats, slow_s = (2, 2, 30.0) if args.tiny else (1024, 10, 2.0)
    record.update(
        precision=precision,
        attention=attention,
        peak_tflops=peak,
        batch_cap=cap,
        timed_steps=repeats,
        compile_backend=args.compile_backend,
        rows=[],
    )
    deadline = args.deadline
    flops_per_image: dict[str, float] = {}
    searched: dict[tuple[str, bool], int] = {}
    # What the aim is measured on first (paper-256, eager then compiled), then the rest; a compiled row runs at its
    # eager row's batch, so it comes after it.
    small, large = configs
    plan = [(small, False, False), (small, False, True), (large, False, False), (small, True, False)]
    plan += [(large, True, False), (large, False, True), (small, True, True), (large, True, True)]
    for stands_for, checkpointing, compiled in plan:
        config = configs[stands_for] or stands_for
        row: dict[str, Any] = {
            "config": config,
            "stands_for": stands_for,
            "checkpointing": checkpointing,
            "compile": compiled,
        }
        left = deadline - time.monotonic()
        needs = 60.0 if compiled and not args.tiny else 10.0
        if left < needs:
            record.append("rows", {**row, "status": "skipped", "note": f"{left:.0f} s of the budget left"})
            continue
        started = time.monotonic()
        try:
            if config not in flops_per_image:  # the model's FLOPs: forward and backward at batch 1, eager
                with _built(config, device, False, None) as parts:
                    one = perf.train_step_figures(parts, 1, precision, attention, device, repeats=1)
                flops_per_image[config] = one["gflops_per_step"] * 1e9
            with _built(config, device, checkpointing, args.compile_backend if compiled else None) as parts:
                if compiled:  # the eager row's batch: a search would recompile for every size
                    batch, why = searched.get((config, checkpointing), 0), "the eager row's batch"
                else:
                    batch, why = largest_batch(parts, precision, attention, device, cap, slow_s)
                    searched[(config, checkpointing)] = batch
                if batch == 0:
                    raise RuntimeError(f"no batch fits ({why})")
                _reset_memory(device)
                seconds = _fits(parts, batch, precision, attention, device, warmup=2, repeats=repeats)
                while seconds is None and batch > 1:  # the timed steps need a little more than the search's one
                    batch //= 2
                    why += f"; the timed steps ran out of memory, backed off to {batch}"
                    seconds = _fits(parts, batch, precision, attention, device, warmup=2, repeats=repeats)
                if seconds is None:
                    raise RuntimeError(f"out of memory at batch 1 ({why})")
                step_s = sorted(seconds)[len(seconds) // 2]
                memory = training_memory(
                    parts["objective"], [parts["vae"]], parts["params"], precision, parts["cfg"].num_tokens
                )
                tflops = flops_per_image[config] * batch / step_s / 1e12
                row |= {
                    "status": "ok",
                    "batch": batch,
                    "batch_search": why,
                    "seconds_per_step": step_s,
                    "images_per_s": batch / step_s,
                    "model_gflops_per_image": flops_per_image[config] / 1e9,
                    "tflops": tflops,
                    "mfu": None if peak is None else tflops / peak,
                    "peak_memory_gib": _peak_gib(device),
                    "estimated_memory_gib": memory_at(memory, batch, checkpointing) / GIB,
                }
        except Exception as error:  # noqa: BLE001 - a row that fails is recorded and the next one runs
            row |= {"status": "error", "note": f"{type(error).__name__}: {str(error)[:300]}"}
            _reset_memory(device)
        row["seconds"] = round(time.monotonic() - started, 1)
        record.append("rows", row)
    rows = record.data["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    status = "ok" if len(ok) == len(rows) else "failed" if any(r["status"] == "error" for r in rows) else "stopped"
    record.update(status=status)


# --------------------------------------------------------------------------------------------- 3. sampling
def _random_pipeline(config: str, device: Any) -> Any:
    """A ``DiffCXRPipeline`` of ``config`` with random weights: its UNet and squeeze, the scratch BERT of its
    config as the text encoder (the paper's PubMedBERT encodes each report once; 25 x 2 UNet passes follow), and the
    SD VAE's architecture (or the registry VAE the config trains)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler

    from diffcxr_aug.generator.configs import build_unet, get_config, vae_downsample_factor_of
    from diffcxr_aug.generator.pipeline import DiffCXRPipeline, default_scheduler
    from diffcxr_aug.generator.text_encoder import load_text_encoder
    from diffcxr_aug.generator.token_squeeze import TokenSqueeze
    from diffcxr_aug.generator.vae import VAE_CONFIGS, build_vae

    cfg = get_config(config)
    factor = vae_downsample_factor_of(cfg) or 8
    torch.manual_seed(0)
    with torch.device(device):
        if cfg.vae in VAE_CONFIGS:
            vae = build_vae(cfg.vae, sample_size=cfg.image_size)
        else:
            vae = AutoencoderKL(**SD_VAE_ARCHITECTURE, sample_size=cfg.image_size)
        reports = ["The heart is enlarged. Small left pleural effusion.", "No acute cardiopulmonary abnormality."]
        bundle = load_text_encoder("scratch", cfg.max_text_tokens, reports=reports, scratch_config=cfg.scratch_text)
        squeeze = TokenSqueeze(
            text_dim=bundle.hidden_size,
            cross_attention_dim=cfg.cross_attention_dim,
            num_tokens=cfg.num_tokens,
            **cfg.squeeze,
        )
        unet = build_unet(cfg, latent_channels=4, latent_size=cfg.image_size // factor)
    training = DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
    )
    pipe = DiffCXRPipeline(
        vae=vae,
        text_encoder=bundle.model,
        tokenizer=bundle.tokenizer,
        token_squeeze=squeeze,
        unet=unet,
        scheduler=default_scheduler(training),
        max_text_tokens=bundle.max_length,
    )
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def part_sampling(record: Record, args: argparse.Namespace) -> None:
    """Images/s at 25 DPM-Solver++ steps with guidance, bf16, at 256 and 512 px; GFLOPs an image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffcxr_aug.runtime import attention_backend, autocast, cuda_has_bf16, resolve_device

    device = resolve_device(args.device)
    precision = "fp16" if device.type == "cuda" and not cuda_has_bf16(device) else "bf16"
    steps, guidance = (2, 4.0) if args.tiny else (25, 4.0)
    sizes = {256: ("paper-256", "tiny"), 512: ("paper-512", "tiny-512")}
    batches = {256: 2, 512: 2} if args.tiny else {256: 128, 512: 32}
    record.update(precision=precision, steps=steps, guidance=guidance, rows=[])
    deadline = args.deadline
    for size, (paper, tiny) in sizes.items():
        config = tiny if args.tiny else paper
        row: dict[str, Any] = {"size": size, "config": config, "stands_for": paper}
        if deadline - time.monotonic() < 5:
            record.append("rows", {**row, "status": "skipped", "note": "budget spent"})
            continue
        started = time.monotonic()
        try:
            pipe = _random_pipeline(config, device)

            def sample(batch: int, n_steps: int, pipe: Any = pipe) -> None:
                reports = ["The heart is enlarged. Small left pleural effusion."] * batch
                generator = torch.Generator().manual_seed(0)
                with torch.inference_mode(), autocast(device, precision), attention_backend("auto", device):
                    pipe(
                        reports,
                        num_inference_steps=n_steps,
                        guidance_scale=guidance,
                        generator=generator,
                        output_type="pt",
                    )

            counter = FlopCounterMode(display=False)
            with counter:
                sample(1, steps)
            batch = batches[size]
            while True:
                failed = False
                try:
                    sample(batch, 2)  # warm-up: kernels chosen, memory reserved
                    _reset_memory(device)
                    _sync(device)
                    began = time.perf_counter()
                    sample(batch, steps)
                    _sync(device)
                    seconds = time.perf_counter() - began
                except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
                    if not _is_oom(error) or batch == 1:
                        raise
                    failed = True
                if not failed:
                    break
                _reset_memory(device)
                batch //= 2
            row |= {
                "status": "ok",
                "batch": batch,
                "images_per_s": batch / seconds,
                "seconds_per_batch": seconds,
                "gflops_per_image": counter.get_total_flops() / 1e9,
                "peak_memory_gib": _peak_gib(device),
            }
            del pipe
        except Exception as error:  # noqa: BLE001 - recorded; the other size still runs
            row |= {"status": "error", "note": f"{type(error).__name__}: {str(error)[:300]}"}
        _reset_memory(device)
        row["seconds"] = round(time.monotonic() - started, 1)
        record.append("rows", row)
    rows = record.data["rows"]
    record.update(status="ok" if all(r["status"] == "ok" for r in rows) else "failed")


# ----------------------------------------------------------------------------------------------- 4. recipe
def part_recipe(record: Record, args: argparse.Namespace) -> None:
    """``diffcxr-aug run recipes/mimic-cxr.yaml`` at tiny size on the fake MIMIC layout, on the device."""
    from tests.test_real_recipes import FAKES, build_tiny_models, tiny_overrides

    work = Path(tempfile.mkdtemp(prefix="gpu_check_recipe_"))
    try:
        FAKES["mimic-cxr"](work / "dataset")
        models = build_tiny_models(work / "models")
        overrides = [*tiny_overrides(work, models), f"device={args.device}"]
        command = [sys.executable, "-m", "diffcxr_aug.cli", "run", str(REPO_ROOT / "recipes" / "mimic-cxr.yaml")]
        command += [item for text in overrides for item in ("--set", text)]
        record.update(overrides=overrides)
        env = _child_env()
        started = time.monotonic()
        try:
            result = subprocess.run(
                command,
                capture_output=True,
                text=True,
                cwd=REPO_ROOT,
                env=env,
                timeout=max(10.0, args.deadline - started - 5),
            )
        except subprocess.TimeoutExpired:
            record.update(status="stopped", note="diffcxr-aug run ran past the part's budget")
            return
        out = work / "run"
        facts: dict[str, Any] = {"returncode": result.returncode, "run_seconds": round(time.monotonic() - started, 1)}
        if result.returncode != 0:
            record.update(status="failed", **facts, tail=(result.stdout + result.stderr)[-3000:])
            return
        stage1 = json.loads((out / "generator" / "training_info.json").read_text())
        job = json.loads((out / "synthetic" / "synthesis.json").read_text())
        sweep = json.loads((out / "classifiers" / "sweep.json").read_text())
        evaluation = json.loads((out / "evaluation" / "report.json").read_text())
        facts |= {
            "report_md": (out / "report.md").is_file(),
            "generator": {k: stage1.get(k) for k in ("device", "mixed_precision", "attention", "steps")},
            "stage2": (out / "generator-dkim" / "adapter").is_dir(),
            "synthesize": {k: job.get(k) for k in ("device", "mixed_precision", "images_per_second")},
            "classifiers": {k: sweep.get(k) for k in ("device", "precision")},
            "evaluate_precision": evaluation.get("mixed_precision"),
        }
        record.update(status="ok" if facts["report_md"] else "failed", **facts)
    finally:
        shutil.rmtree(work, ignore_errors=True)


PART_FUNCTIONS: dict[str, Callable[[Record, argparse.Namespace], None]] = {
    "cuda_tests": part_cuda_tests,
    "training": part_training,
    "sampling": part_sampling,
    "recipe": part_recipe,
}


def run_part(args: argparse.Namespace) -> None:
    """The ``--part`` process: one part, its record written as it goes."""
    import torch

    if args.device == "cpu":
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    record = Record(Path(args.out) / "parts" / f"{args.part}.json", part=args.part, budget_s=round(args.budget_s, 1))
    started = time.monotonic()
    args.deadline = started + args.budget_s
    try:
        PART_FUNCTIONS[args.part](record, args)
    except Exception:  # noqa: BLE001 - recorded for the report; the orchestrator goes on with the next part
        record.update(status="error", note=traceback.format_exc()[-3000:])
    record.update(seconds=round(time.monotonic() - started, 1))


# ------------------------------------------------------------------------------------------ orchestration
def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Every part in its own process with its share of the time left; the JSON and markdown written at the end."""
    from diffcxr_aug.runtime import resolve_device

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "parts", ignore_errors=True)
    device = resolve_device(args.device)
    started, began = time.monotonic(), datetime.datetime.now(datetime.timezone.utc)
    result: dict[str, Any] = {
        "tool": "bench/gpu_check.py",
        "started": began.isoformat(timespec="seconds"),
        "mode": "tiny" if args.tiny else "full",
        "budget_s": args.budget_s,
        **device_facts(device),
        "parts": {},
    }
    todo = [p for p in PARTS if p in args.parts]
    for index, part in enumerate(todo):
        left = args.budget_s - (time.monotonic() - started)
        share = SHARES[part] / sum(SHARES[p] for p in todo[index:])
        budget = max(5.0, left * share)
        command = [sys.executable, __file__, "--part", part, "--out", str(out), "--device", args.device]
        command += ["--budget-s", f"{budget:.1f}", "--compile-backend", args.compile_backend]
        command += ["--tiny"] if args.tiny else []
        part_started = time.monotonic()
        try:
            process = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=budget + 30)
            crash = process.returncode != 0
            tail = (process.stderr or "")[-2000:]
        except subprocess.TimeoutExpired as error:
            crash, tail = True, f"killed after {budget + 30:.0f} s: " + _text(error.stderr)[-1500:]
        path = out / "parts" / f"{part}.json"
        entry = json.loads(path.read_text()) if path.is_file() else {"status": "error", "budget_s": round(budget, 1)}
        if crash and entry.get("status") in ("running", "ok"):
            entry |= {"status": "error" if entry.get("status") == "ok" else "stopped", "note": tail}
        entry["seconds"] = round(time.monotonic() - part_started, 1)
        result["parts"][part] = entry
        print(f"{part}: {entry['status']} ({entry['seconds']:.0f} s of {budget:.0f})", flush=True)
    for part in PARTS:
        result["parts"].setdefault(part, {"status": "skipped", "note": "not asked for (--parts)"})
    result["seconds"] = round(time.monotonic() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(result))
    return result


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec) if isinstance(value, (int, float)) else str(value)


def markdown(result: dict[str, Any]) -> str:
    """The check's tables: one section a part, its status first."""
    parts = result["parts"]
    lines = [
        f"# GPU check: {result['card']} ({result['mode']} mode)",
        "",
        f"{result['started']}; torch {result['torch']}"
        + (f", CUDA {result['cuda']}" if result.get("cuda") else "")
        + f"; {result['seconds']:.0f} s of a {result['budget_s']:.0f} s budget. `python bench/gpu_check.py` wrote it;"
        " the numbers are in gpu_check.json. Peak memory: CUDA memory allocated on a GPU, the part process's peak "
        "resident memory on a CPU.",
        "",
        "| part | status | seconds | budget s |",
        "|---|---|---:|---:|",
    ]
    for name in PARTS:
        entry = parts[name]
        lines.append(
            f"| {name} | {entry['status']} | {_fmt(entry.get('seconds'), '.0f')} | "
            f"{_fmt(entry.get('budget_s'), '.0f')} |"
        )
    tests = parts["cuda_tests"]
    lines += ["", "## 1. CUDA tests (`pytest -m cuda`)", "", f"{tests.get('summary') or tests.get('note', '')}"]
    lines += [f"- {reason}" for reason in tests.get("reasons", [])[:12]]
    training = parts["training"]
    lines += [
        "",
        "## 2. Training steps at the largest batch that fits",
        "",
        f"Precision {training.get('precision')}, attention {training.get('attention')}, torch.compile backend "
        f"{training.get('compile_backend')}; peak "
        f"{_fmt(training.get('peak_tflops'), '.0f')} TFLOP/s dense; {training.get('timed_steps')} timed steps after "
        "warm-up; TFLOP/s from the model's FLOPs (no recomputation counted).",
        "",
        "| config | checkpointing | compile | batch | s/step | img/s | TFLOP/s | MFU | peak GiB | est. GiB | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in training.get("rows", []):
        name = row["config"] if row["config"] == row["stands_for"] else f"{row['config']} (for {row['stands_for']})"
        note = row.get("note") or row.get("batch_search", "")
        lines.append(
            f"| {name} | {'on' if row['checkpointing'] else 'off'} | {'on' if row['compile'] else 'off'} | "
            f"{_fmt(row.get('batch'), 'd')} | {_fmt(row.get('seconds_per_step'), '.3f')} | "
            f"{_fmt(row.get('images_per_s'), '.1f')} | {_fmt(row.get('tflops'), '.3g')} | "
            f"{_fmt(None if row.get('mfu') is None else 100 * row['mfu'], '.1f')}{'%' if row.get('mfu') else ''} | "
            f"{_fmt(row.get('peak_memory_gib'), '.1f')} | {_fmt(row.get('estimated_memory_gib'), '.1f')} | "
            f"{row['status'] if row['status'] != 'ok' else ''}{': ' if row['status'] != 'ok' and note else ''}"
            f"{note.replace('|', '/')[:120]} |"
        )
    sampling = parts["sampling"]
    lines += [
        "",
        f"## 3. Sampling ({sampling.get('steps')} DPM-Solver++ steps, guidance {sampling.get('guidance')}, "
        f"{sampling.get('precision')})",
        "",
        "| size | config | batch | img/s | GFLOPs / image | peak GiB | note |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for row in sampling.get("rows", []):
        lines.append(
            f"| {row['size']} | {row['config']} | {_fmt(row.get('batch'), 'd')} | {_fmt(row.get('images_per_s'))} | "
            f"{_fmt(row.get('gflops_per_image'), '.1f')} | {_fmt(row.get('peak_memory_gib'), '.1f')} | "
            f"{(row.get('note') or '').replace('|', '/')[:120]} |"
        )
    recipe = parts["recipe"]
    lines += [
        "",
        "## 4. recipes/mimic-cxr.yaml at tiny size through `diffcxr-aug run`",
        "",
        f"Status {recipe['status']}",
    ]
    for key in ("run_seconds", "generator", "synthesize", "classifiers", "evaluate_precision"):
        if key in recipe:
            lines.append(f"- {key}: {recipe[key]}")
    for name in PARTS:
        if parts[name]["status"] in ("error", "failed", "stopped") and (
            parts[name].get("note") or parts[name].get("tail")
        ):
            text = (parts[name].get("note") or parts[name].get("tail"))[-1500:]
            lines += ["", f"### {name}: {parts[name]['status']}", "", "```", text.strip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and parts/")
    parser.add_argument("--device", default=None, help="cuda (default when torch sees a GPU), cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: tiny and tiny-512, one or two steps")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds for the whole check (GPU 420, CPU 300)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend of the compiled training rows: inductor (train-generator's; the default), or "
        "eager (the default with --tiny: dynamo captures the same graphs, without inductor's minutes of code "
        "generation on a CPU; aot_eager also traces the backward pass, 20 s more a row there)",
    )
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # one part, in its own process
    args = parser.parse_args(argv)
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.compile_backend is None:
        args.compile_backend = "eager" if args.tiny else "inductor"
    if args.budget_s is None:
        args.budget_s = 420.0 if args.device.startswith("cuda") else 300.0
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    if args.part is not None:
        run_part(args)
        return 0
    result = run_all(args)
    print(markdown(result), flush=True)  # the table last: a remote call's output tail holds it
    print(f"wrote {Path(args.out) / 'gpu_check.json'} and gpu_check.md")
    return 0 if all(p["status"] in ("ok", "skipped") for p in result["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
