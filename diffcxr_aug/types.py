"""The leaf of the package: the named choices every layer shares, as ``Literal`` types, the base of every settings
model, and the defaults more than one layer needs. It imports nothing of the package, so any module may import it.

The library checks its arguments against these (``typing.get_args``), the command line lists them in its help, and
pydantic validates recipes with them: one home for each set of choices.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict

PipelineStep = Literal[
    "prepare", "train-vae", "filter", "train-generator", "synthesize", "train-classifier", "evaluate"
]
PIPELINE_STEPS: tuple[str, ...] = get_args(PipelineStep)
DatasetName = Literal["phantom", "mimic-cxr", "iu-xray", "nih-cxr14", "ieee8023", "csv"]
ClassifierMode = Literal["real", "mix", "pretrain-finetune", "synthetic-only"]
ClassifierMetric = Literal["report", "truth"]
SyntheticChoice = Literal["generated", "ceiling", "dkim", "dkim-balanced", "none"] | Path
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "cuda:N")  # cuda:N: the GPU of index N (cuda:1)
CUDA_DEVICE_PATTERN = r"cuda(:\d+)?"
ThresholdRule = Literal["contamination", "quantile"]
FilterNormalize = Literal["none", "equalize"]
TextEncoderPolicy = Literal["frozen", "finetune", "train"]
PredictionType = Literal["epsilon", "v_prediction"]
UncertaintyPolicy = Literal["ignore", "ones", "zeros"]
MixedPrecision = Literal["auto", "no", "bf16", "fp16"]
Attention = Literal["auto", "math", "default"]
Sampler = Literal["pipeline", "dpm-solver++", "unipc", "ddim"]
ReportSource = Literal["report", "labels"]
View = Literal["PA", "AP", "LATERAL", "UNKNOWN"]  # the manifest's `view` (diffcxr_aug.data.labels.VIEWS)
FeatureSpaceKind = Literal["reference", "inception", "xrv", "open_clip"]  # open_clip takes ":NAME_OR_DIR"
FEATURE_KINDS: tuple[str, ...] = get_args(FeatureSpaceKind)


# Defaults that a recipe and the library functions below it share (one home for each).
DEFAULT_IMAGE_SIZE = 128  # the image cache's side in pixels
DEFAULT_PHANTOM_N = 2000  # images of the phantom world
DEFAULT_NOISE_RATE = 0.05  # the phantom world's expected share of noisy images


class Settings(BaseModel):
    """A block of settings: a recipe section or the options of a library step. Unknown keys are errors (a typo such
    as ``max_step`` names itself instead of being ignored), and assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def check_device_name(value: str) -> str:
    """A device's name as a recipe or the command line writes it: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Only the spelling is checked here: a recipe written for a GPU machine validates anywhere, and the device is
    looked for when a step starts (:func:`diffcxr_aug.runtime.resolve_device`).
    """
    if value not in ("auto", "cpu") and not re.fullmatch(CUDA_DEVICE_PATTERN, value):
        raise ValueError(f"unknown device {value!r}; choose one of: {', '.join(DEVICES)} (a GPU index, e.g. cuda:1)")
    return value


Device = Annotated[str, AfterValidator(check_device_name)]


def yaml_no(value: Any) -> Any:
    """YAML 1.1 reads a bare ``no`` as False; that is what the user meant by "no mixed precision"."""
    return "no" if value is False else value


def upper_views(value: Any) -> Any:
    """View names in any case, one name or a list: ``lateral`` and ``[Lateral]`` mean ``[LATERAL]``."""
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    return [v.strip().upper() if isinstance(v, str) else v for v in value] if isinstance(value, list) else value
