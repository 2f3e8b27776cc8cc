"""Image-report alignment: how well each synthetic image matches its own prompt, in the generator's AVA-TLS space.

AVA-TLS trains an image tower (on VAE latents) and the pooled squeezed report tokens to agree by a contrastive
loss. The same two towers score a set: the cosine similarity of every image to its own prompt ("matched") against
its similarity to another image's prompt of the same set ("shuffled", a seeded derangement). Real test images with
their own reports, through the same towers, give the reference. A second measure of faithfulness beside the
reference classifier's mAUC, and one that reads the whole report, not only the 14 labels. It needs the generator's
towers: a set made by ``synthesize`` names its generator in ``synthesis.json`` (a stage-2 DKIM generator is scored
with the towers of its stage-1 folder); a generator trained with AVA-TLS off has no image tower, and the set gets a
note instead.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffcxr_aug.data.manifest import Manifest
from diffcxr_aug.generator.prompts import template_report

logger = logging.getLogger(__name__)


def set_generator(folder: Path) -> Path | None:
    """The generator a synthetic folder was made with (``synthesis.json``), or None."""
    job = Path(folder) / "synthesis.json"
    if not job.is_file():
        return None
    generator = json.loads(job.read_text(encoding="utf-8")).get("generator")
    return Path(generator) if generator else None


def report_source(generator: Path) -> str:
    """What a generator was conditioned on in training (``training_info.json``): ``report`` or ``labels``."""
    info = Path(generator) / "training_info.json"
    if not info.is_file():
        return "report"
    return json.loads(info.read_text(encoding="utf-8")).get("report_source", "report")


def towers_folder(generator: Path) -> Path:
    """The folder whose AVA-TLS towers score ``generator``'s images: the folder itself, or for a stage-2 (DKIM)
    folder, which keeps no image tower, the stage-1 folder it was trained on (``training_info.json``), whose image
    tower was trained with the same text towers."""
    generator = Path(generator)
    info = generator / "training_info.json"
    if not (generator / "image_tower").is_dir() and info.is_file():
        stage1 = (json.loads(info.read_text(encoding="utf-8")).get("dkim") or {}).get("stage1")
        if stage1 and (Path(stage1) / "image_tower").is_dir():
            return Path(stage1)
    return generator


class AlignmentScorer:
    """The image tower and the text towers (encoder, token squeeze) of one AVA-TLS generator folder."""

    def __init__(self, generator: Path, device: torch.device) -> None:
        from diffcxr_aug.generator.ava_tls import ImageTower
        from diffcxr_aug.generator.pipeline import DiffCXRPipeline

        self.generator = Path(generator)
        self.pipe = DiffCXRPipeline.from_pretrained(self.generator).to(device)
        self.tower = ImageTower.from_pretrained(self.generator / "image_tower").to(device).eval()
        self.device = device

    @staticmethod
    def available(generator: Path | None) -> str | None:
        """None when ``generator`` has the towers; else why the alignment cannot be measured."""
        if generator is None:
            return "the set names no generator (no synthesis.json)"
        if not (Path(generator) / "model_index.json").is_file():
            return f"its generator {generator} is not a pipeline folder here"
        if not (towers_folder(generator) / "image_tower").is_dir():
            return f"its generator {generator} has no image tower (trained with AVA-TLS off)"
        return None

    @torch.inference_mode()
    def images(self, manifest: Manifest, batch_size: int = 64) -> np.ndarray:
        from diffcxr_aug.generator.vae import encode_manifest

        latents = encode_manifest(self.pipe.vae, manifest, self.pipe.image_size, batch_size, self.device, False)
        out = []
        for start in range(0, len(latents), batch_size):
            chunk = latents[start : start + batch_size].to(self.device, self.tower.dtype)
            out.append(F.normalize(self.tower(chunk).float(), dim=-1).cpu().numpy())
        return np.concatenate(out)

    @torch.inference_mode()
    def texts(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        from diffcxr_aug.generator.text_encoder import encode_tokens, tokenize

        pipe, out = self.pipe, []
        for start in range(0, len(texts), batch_size):
            tokens = tokenize(pipe.tokenizer, texts[start : start + batch_size], pipe.text_max_length, self.device)
            states, mask = encode_tokens(pipe.text_encoder, tokens)
            pooled = pipe.token_squeeze(states.to(pipe.token_squeeze.dtype), mask).pooled
            out.append(F.normalize(pooled.float(), dim=-1).cpu().numpy())
        return np.concatenate(out)

    def score(self, manifest: Manifest, text_column: str, seed: int, texts: list[str] | None = None) -> dict[str, Any]:
        """Matched and shuffled cosine similarities of a manifest's images and texts (its ``text_column``, or
        ``texts`` row for row), and their difference."""
        images = self.images(manifest)
        if texts is None:
            texts = manifest.frame[text_column].fillna("").astype(str).tolist()
        return alignment_summary(images, self.texts(texts), seed)


def alignment_summary(images: np.ndarray, texts: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """From unit-norm image and text embeddings (row i: image i and its text): mean matched and shuffled cosine,
    their difference, and the share of images closer to their own text than to the shuffled one."""
    n = len(images)
    if n < 2:
        raise ValueError(f"alignment needs at least 2 image-text pairs, got {n}")
    # A random n-cycle: a derangement, so no image is paired with its own text.
    order = np.random.default_rng(seed).permutation(n)
    perm = np.empty(n, dtype=int)
    perm[order] = np.roll(order, 1)
    matched = np.sum(images * texts, axis=1)
    shuffled = np.sum(images * texts[perm], axis=1)
    return {
        "n": n,
        "matched": float(matched.mean()),
        "shuffled": float(shuffled.mean()),
        "difference": float((matched - shuffled).mean()),
        "own_text_closer": float((matched > shuffled).mean()),
    }


def set_alignment(
    folder: Path,
    manifest: Manifest,
    real_test: Manifest,
    aligners: dict[Path, tuple[AlignmentScorer, dict[str, Any]]],
    device: Any,
    seed: int,
) -> dict[str, Any]:
    """The set's image-prompt alignment in its generator's AVA-TLS towers, beside real test pairs' (one scorer and
    one real reference per generator, shared by the sets it made), or a note saying why there is none."""
    generator = set_generator(folder)
    why = AlignmentScorer.available(generator)
    if why is not None:
        return {"note": why}
    key = towers_folder(generator).resolve()
    if key not in aligners:
        scorer = AlignmentScorer(key, device)
        # The real films' text as the generator read it in training: their reports, or (a generator trained on
        # label-only data) the template reports written from their labels, which the towers were aligned to.
        texts = None
        if report_source(key) == "labels":
            labels = real_test.frame[real_test.label_names].to_dict("records")
            texts = [template_report(row) for row in labels]
        aligners[key] = (scorer, scorer.score(real_test, "report", seed, texts))
    scorer, real = aligners[key]
    text = "prompt" if "prompt" in manifest.frame.columns else "report"
    entry = {"generator": str(generator), "synthetic": scorer.score(manifest, text, seed), "real_test": real}
    return entry | ({"towers": str(key)} if key != generator.resolve() else {})
