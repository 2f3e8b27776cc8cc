"""The record of a recipe run, step by step: what each step ran with, whether it finished, and how long it took.

``run`` keeps ``OUTPUT_DIR/steps.json``. Before a step starts, its settings (the recipe keys that decide its
outputs, and the fingerprints of the steps it reads from) are written there with ``status: started``; when it
returns, ``status: done`` and its wall time. On the next ``run`` of the same recipe:

* a step that finished with the same settings, whose outputs are all there, is skipped (and says so);
* a step whose settings changed only in keys the step itself can extend (more generator steps, more synthetic
  images, more seeds) runs again on its own outputs, which it continues;
* a step whose other settings changed says which, moves its old outputs to ``OUTPUT_DIR/superseded/`` (nothing
  is deleted) and runs afresh; the steps after it see a new fingerprint and are redone too;
* a step that started and never finished runs again and resumes from what it left (each step is resumable).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffcxr_aug.io import atomic_write_json

logger = logging.getLogger(__name__)

STEPS_NAME = "steps.json"
SUPERSEDED_DIR = "superseded"


def fingerprint(settings: dict[str, Any]) -> str:
    """A short hash of ``settings`` (canonical JSON): equal settings, equal fingerprint."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def setting_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every leaf key that differs between two settings dicts."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


@dataclass
class Step:
    """One step of a recipe run.

    Attributes:
        name: the pipeline step (``prepare``, ``filter``, ...).
        settings: what decides its outputs; upstream steps enter as their fingerprints.
        outputs: folders the step writes (moved aside, not deleted, when its settings change).
        done_files: files a finished step has left (a finished step missing one of them runs again).
        run: does the work; resumable.
        extendable: top-level or dotted setting keys the step can change on its own outputs and continue.
        estimate_seconds: the expected wall time on this machine, when known.
    """

    name: str
    settings: dict[str, Any]
    outputs: Sequence[Path]
    done_files: Sequence[Path]
    run: Callable[[], Any]
    extendable: frozenset[str] = field(default_factory=frozenset)
    estimate_seconds: float | None = None

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.settings)


class StepLedger:
    """``steps.json`` of one output folder: one record per step, rewritten atomically after every change."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / STEPS_NAME
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            self.records = json.loads(self.path.read_text(encoding="utf-8"))

    def _save(self) -> None:
        atomic_write_json(self.path, self.records)

    def plan(self, step: Step) -> tuple[str, list[str]]:
        """What a run does with ``step``: ``skip``, ``continue`` (extendable changes or unfinished), ``redo``
        (other settings changed: outputs move aside) or ``new``; with the changed settings, if any."""
        record = self.records.get(step.name)
        if record is None:
            return "new", []
        changes = setting_changes(record["settings"], step.settings)
        if not changes:
            complete = record["status"] == "done" and all(p.exists() for p in step.done_files)
            return ("skip" if complete else "continue"), []
        if all(_is_extendable(change.split(":", 1)[0], step.extendable) for change in changes):
            return "continue", changes
        return "redo", changes

    def supersede(self, step: Step) -> Path | None:
        """Move the step's existing outputs to ``superseded/<step>-<time>/``; returns that folder."""
        present = [p for p in step.outputs if p.exists()]
        if not present:
            return None
        target = self.root / SUPERSEDED_DIR / f"{step.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        target.mkdir(parents=True, exist_ok=True)
        for path in present:
            shutil.move(str(path), str(target / path.name))
        return target

    def start(self, step: Step) -> None:
        previous = self.records.get(step.name, {})
        self.records[step.name] = {
            "status": "started",
            "settings": step.settings,
            "fingerprint": step.fingerprint,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            # Wall time adds up over the invocations that worked on the same outputs.
            "seconds": previous.get("seconds", 0.0) if previous.get("fingerprint") == step.fingerprint else 0.0,
        }
        self._save()

    def finish(self, step: Step, seconds: float) -> None:
        record = self.records[step.name]
        record.update(
            status="done", finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"), seconds=record["seconds"] + seconds
        )
        self._save()

    def mark_skipped(self, step: Step) -> None:
        self.records[step.name]["last_skipped_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self._save()


def _is_extendable(key: str, extendable: frozenset[str]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in extendable)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def run_steps(steps: Sequence[Step], ledger: StepLedger, echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run ``steps`` in order through ``ledger``, one progress line per step; returns what happened to each."""
    started = time.monotonic()
    happened = []
    for i, step in enumerate(steps, 1):
        head = f"[{i}/{len(steps)}] {step.name}"
        action, changes = ledger.plan(step)
        elapsed = _minutes(time.monotonic() - started)
        if action == "skip":
            seconds = ledger.records[step.name].get("seconds", 0.0)
            echo(f"{head}: done earlier with the same settings ({_minutes(seconds)}); skipped  [elapsed {elapsed}]")
            ledger.mark_skipped(step)
            happened.append({"step": step.name, "action": "skipped", "seconds": 0.0})
            continue
        if action == "redo":
            echo(f"{head}: settings changed since it ran ({'; '.join(changes)})")
            moved = ledger.supersede(step)
            if moved is not None:
                echo(f"{head}: its earlier outputs are kept in {moved}; running it afresh")
        elif action == "continue" and changes:
            echo(f"{head}: settings changed ({'; '.join(changes)}); the step continues from its outputs")
        estimate = f"; estimate {_minutes(step.estimate_seconds)}" if step.estimate_seconds else ""
        echo(f"{head} ...  [elapsed {elapsed}{estimate}]")
        ledger.start(step)
        step_started = time.monotonic()
        step.run()
        seconds = time.monotonic() - step_started
        ledger.finish(step, seconds)
        echo(f"{head}: done in {_minutes(seconds)}")
        happened.append(
            {"step": step.name, "action": "ran" if action != "continue" else "continued", "seconds": seconds}
        )
    return happened
