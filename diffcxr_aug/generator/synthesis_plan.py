"""The plan of a synthesis job: what image ``i`` is, where it goes, which report it is drawn from, its noise seed and
its manifest row.

Image ``i`` of a job is fully determined by the job (generator, prompt source, steps, guidance, seed, balance) and
``i`` alone: its prompt is position ``i`` of a seeded prompt sequence that does not depend on ``n``
(:mod:`diffcxr_aug.generator.prompts`), and its initial noise comes from its own seed (the ``seed`` column). So a
job can grow (``--n 4`` then ``--n 6`` makes only images 4 and 5), and an interrupted run, started again, makes only
what is missing.

The manifest rows are in the contract schema: labels copied from the prompt's row, split ``train``,
``patient_id``/``study_id`` ``synthetic-<i>``, the prompt row's view, plus ``prompt`` (the report the image was
generated from), ``seed``, ``meta_prompt_image`` (the real image whose report it is, if any) and what regenerates
the image exactly: ``meta_generator`` (the generator's id), ``meta_sampler``, ``meta_steps`` and ``meta_guidance``
(and ``meta_precision`` for images sampled under bf16, ``meta_dkim_scale`` for a DKIM model).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from diffcxr_aug.data.manifest import CORE_COLUMNS
from diffcxr_aug.errors import InputError
from diffcxr_aug.generator.pipeline_folder import component_config, has_adapter
from diffcxr_aug.generator.prompts import (
    PromptPool,
    balanced_prompt_rows,
    load_prompt_pool,
    prevalence,
    prompt_rows,
)
from diffcxr_aug.generator.settings import SynthesisSettings

logger = logging.getLogger(__name__)

IMAGE_DIR = "images"
SHARD_SIZE = 1000  # the default of SynthesisSettings.shard_size


def image_name(index: int, shard_size: int = SHARD_SIZE) -> str:
    """``images/<shard>/<index>.png`` of image ``index``, relative to the output folder."""
    return f"{IMAGE_DIR}/{index // shard_size:03d}/{index:06d}.png"


def shard_range(shard: int, n: int, shard_size: int) -> range:
    """The indices of images ``0..n-1`` in shard ``shard``."""
    return range(shard * shard_size, min(n, (shard + 1) * shard_size))


def num_shards(n: int, shard_size: int) -> int:
    return (n + shard_size - 1) // shard_size


def image_seed(seed: int, index: int) -> int:
    """The torch seed of image ``index``'s initial noise (a 32-bit integer derived from the job seed)."""
    return int(np.random.SeedSequence([seed, 4, index]).generate_state(1)[0])


@dataclass
class SynthesisPlan:
    """Every image of the job: its prompt row, its seed and its manifest row."""

    pool: PromptPool
    rows: np.ndarray  # prompt row (position in pool.frame) of images 0..n-1
    seed: int
    shard_size: int
    meta: dict[str, str]  # meta_generator, meta_sampler, meta_steps, meta_guidance (and meta_dkim_scale)
    knowledge: list[str] | None = None  # a DKIM generator: each prompt row's knowledge text
    dkim_scale: float | None = None  # a DKIM generator: the weight of its residuals

    def __post_init__(self) -> None:
        frame = self.pool.frame
        self._reports, self._views, self._images = (frame[c].tolist() for c in ("report", "view", "image"))
        self._labels = [
            ["" if pd.isna(v) else str(int(v)) for v in values]
            for values in frame[self.pool.label_names].to_numpy(dtype=np.float32)
        ]

    def knowledge_of(self, index: int) -> str:
        return self.knowledge[self.rows[index]]

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def columns(self) -> list[str]:
        knowledge = ["meta_knowledge"] if self.knowledge is not None else []
        return [*CORE_COLUMNS, *self.pool.label_names, "prompt", *knowledge, "seed", "meta_prompt_image", *self.meta]

    def report(self, index: int) -> str:
        return self._reports[self.rows[index]]

    def record(self, index: int) -> dict[str, str]:
        row = self.rows[index]
        record = {
            "image_path": image_name(index, self.shard_size),
            "patient_id": f"synthetic-{index}",
            "study_id": f"synthetic-{index}",
            "view": self._views[row],
            "split": "train",
            "report": self._reports[row],
        }
        record.update(zip(self.pool.label_names, self._labels[row], strict=True))
        record["prompt"] = self._reports[row]
        if self.knowledge is not None:
            record["meta_knowledge"] = self.knowledge[row]
        record["seed"] = str(image_seed(self.seed, index))
        record["meta_prompt_image"] = self._images[row]
        return {**record, **self.meta}

    def prevalence(self) -> dict[str, dict[str, float]]:
        """Each label's positive share in the pool and in the job's images."""
        positives = self.pool.positives()
        pool = prevalence(positives)
        output = prevalence(positives, np.bincount(self.rows, minlength=len(self.pool)))
        return {
            name: {"pool": round(float(p), 4), "output": round(float(o), 4)}
            for name, p, o in zip(self.pool.label_names, pool, output, strict=True)
        }


def plan_job(generator: Path, section: SynthesisSettings, seed: int) -> tuple[SynthesisPlan, dict[str, Any]]:
    """The prompt order and the job record's settings (without the generator id, which process 0 adds)."""
    source, labels_only = _prompt_source(generator, section)
    pool = load_prompt_pool(source, labels_only=labels_only, split=section.prompt_split)
    if section.balance is None:
        rows = prompt_rows(len(pool), section.n, seed)
    else:
        rows = balanced_prompt_rows(pool.positives(), section.n, seed, section.balance)
    scheduler = component_config(generator, "scheduler")["_class_name"]
    if section.sampler != "pipeline":
        from diffcxr_aug.generator.pipeline import SAMPLERS

        scheduler = SAMPLERS[section.sampler][0].__name__
    meta = {
        "meta_generator": "",
        "meta_sampler": scheduler,
        "meta_steps": str(section.steps),
        "meta_guidance": str(section.guidance),
    }
    dkim_scale, knowledge = _dkim(generator, section, pool)
    if dkim_scale is not None:
        meta["meta_dkim_scale"] = str(dkim_scale)
    if section.mixed_precision != "no":  # fp32 rows (and folders made before the option) have no column
        meta["meta_precision"] = section.mixed_precision
    job = {
        "generator": str(generator.resolve()),
        "prompts": str(pool.source.resolve()),
        "prompt_kind": pool.kind,
        "prompts_sha256": pool.fingerprint(),
        "steps": section.steps,
        "guidance": section.guidance,
        "seed": seed,
        "balance": section.balance,
        "shard_size": section.shard_size,
        "dkim_scale": dkim_scale,
        "sampler_option": section.sampler,  # "sampler" is the scheduler class, in the record
        "mixed_precision": section.mixed_precision,
    }
    if section.prompt_split != "train":  # job folders made before the option drew from train: no key, as then
        job["prompt_split"] = section.prompt_split
    return SynthesisPlan(pool, rows, seed, section.shard_size, meta, knowledge, dkim_scale), job


def _prompt_source(generator: Path, section: SynthesisSettings) -> tuple[Path, bool]:
    """The prompt source and whether its reports are written from its labels (``--labels-from``)."""
    if section.labels_from is not None:
        if section.prompts is not None:
            logger.info(
                "labels_from %s is the prompt source; prompts %s is not used", section.labels_from, section.prompts
            )
        return Path(section.labels_from), True
    if section.prompts is not None:
        return Path(section.prompts), False
    info_path = generator / "training_info.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("data"):
            # A generator trained on template reports (report_source: labels) gets its prompts written the same way.
            return Path(info["data"]), info.get("section", {}).get("report_source") == "labels"
    raise InputError(
        f"{generator} records no training manifest (no training_info.json with 'data'); pass --prompts with a "
        "manifest folder or a CSV / text file of reports, or --labels-from with a manifest"
    )


def _dkim(generator: Path, section: SynthesisSettings, pool: PromptPool) -> tuple[float | None, list[str] | None]:
    """A DKIM generator's residual weight and the knowledge text of every prompt row (written from the row's labels
    with the adapter's own templates); ``(None, None)`` for a stage-1 generator."""
    from diffcxr_aug.generator.knowledge import knowledge_texts, load_templates

    if not has_adapter(generator):
        if section.dkim_scale is not None:
            logger.info("%s has no DKIM adapter (a stage-1 model): dkim_scale is not used", generator)
        return None, None
    scale = section.dkim_scale
    if scale is None:
        info = generator / "training_info.json"
        recorded = json.loads(info.read_text()).get("section", {}) if info.is_file() else {}
        scale = float(recorded.get("dkim_scale", 1.0))
    adapter = component_config(generator, "adapter")
    templates = load_templates(adapter.get("knowledge_templates"))
    return scale, knowledge_texts(
        pool.frame[pool.label_names], templates, adapter.get("knowledge_states", "positive-only")
    )
