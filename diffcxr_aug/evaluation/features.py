"""Feature spaces the field reports fidelity in, beside the reference classifier's: each from weights the user names
by path (offline), or downloaded by its own library when none is named and the machine is online.

* ``inception``: the pt_inception-2015-12-05 InceptionV3 of Heusel et al.'s FID, as torchmetrics wraps it (needs
  ``torch-fidelity``), from ``--inception-weights FILE``, or downloaded by torch-fidelity when no file is named:
  the numbers Diff-CXR, RoentGen and Cheff print.
* ``xrv``: a torchxrayvision DenseNet-121 (1,024 pooled features, ``features2``), from ``--xrv-weights``: a local
  state dict (``.safetensors``, or a ``.pt`` state dict read with ``weights_only=True``), or a torchxrayvision
  weights name (default ``densenet121-res224-all``), which torchxrayvision itself fetches (internet needed).
* ``open_clip:NAME_OR_DIR``: an open_clip image tower, e.g. BiomedCLIP from ``local-dir:/path`` (a folder with
  ``open_clip_config.json`` and weights) or ``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``.

:func:`build_extractor` returns the extractor, or a one-line reason it cannot be built here (the report prints
that reason instead of a number). Extractors take ``(B, 1, H, W)`` images in [0, 1] and return ``(B, D)`` features.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from diffcxr_aug.data.dataset import CXRDataset
from diffcxr_aug.data.manifest import Manifest
from diffcxr_aug.evaluation.fidelity import feature_distances
from diffcxr_aug.runtime import autocast
from diffcxr_aug.types import FEATURE_KINDS

logger = logging.getLogger(__name__)

XRV_INPUT = 224  # torchxrayvision's DenseNets read 224 x 224 images in [-1024, 1024]
# torchxrayvision's DenseNet-121 trained on every dataset it knows (NIH, CheXpert, MIMIC, PadChest, ...).
DEFAULT_XRV_WEIGHTS = "densenet121-res224-all"


class Extractor:
    """A named feature space: ``name`` (the report's key), ``description``, the ``device`` its network runs on, and
    ``__call__(images) -> features``."""

    name: str
    description: str
    device: torch.device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} defines no __call__")


class InceptionExtractor(Extractor):
    """torchmetrics' InceptionV3 (the FID network), 2,048 pool features, from a local weights file."""

    def __init__(self, weights: Path | None, device: torch.device) -> None:
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.name, self.device = "inception", device
        source = weights or "downloaded by torch-fidelity"
        self.description = f"InceptionV3 pool3 (2048 features; torchmetrics, weights {source})"
        # torch-fidelity unpickles the file in full (weights_only=False); a file that loads with weights_only=True
        # holds tensors and plain containers only, so that second load runs no code from it.
        if weights is not None:
            try:
                torch.load(weights, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - any failure means the same: not a plain weights file
                raise ValueError(
                    f"--inception-weights {weights}: not a plain state dict (torch.load with weights_only=True "
                    f"refused it: {type(err).__name__}); use the pt_inception-2015-12-05 .pth file torch-fidelity "
                    "downloads"
                ) from err
        self.model = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=None if weights is None else str(weights),
        ).to(device)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        rgb = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
        return self.model(rgb.to(self.device)).reshape(len(images), -1).float()


class XRVExtractor(Extractor):
    """A torchxrayvision DenseNet-121's pooled features (``features2``)."""

    def __init__(self, weights: str, device: torch.device) -> None:
        import torchxrayvision as xrv

        self.name, self.device = "xrv", device
        path = Path(weights)
        if path.is_file():
            model = xrv.models.DenseNet(weights=None)
            state = _load_state_dict(path)
            try:
                model.load_state_dict(state, strict=False)
            except RuntimeError as err:  # shapes that are not DenseNet-121's
                detail = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), str(err))
                raise ValueError(f"{path}: not a torchxrayvision DenseNet-121 state dict ({detail})") from err
            missing = [k for k in model.state_dict() if k.startswith("features") and k not in state]
            if missing:
                raise ValueError(f"{path}: not a torchxrayvision DenseNet-121 state dict (missing {missing[:3]})")
        else:  # a torchxrayvision weights name: its own loading code, which downloads once (internet needed)
            model = xrv.models.DenseNet(weights=weights)
        self.model = model.to(device).eval()
        self.description = f"torchxrayvision DenseNet-121 features2 (1024 features; weights {weights})"

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.to(self.device), size=(XRV_INPUT, XRV_INPUT), mode="bilinear", antialias=True)
        return self.model.features2(x * 2048.0 - 1024.0).float()


class OpenCLIPExtractor(Extractor):
    """An open_clip model's image embedding (before normalisation), with the model's own resize and normalisation."""

    def __init__(self, name: str, device: torch.device) -> None:
        import open_clip

        self.name, self.device = f"open_clip:{name}", device
        self.model = open_clip.create_model(name).to(device).eval()
        visual = self.model.visual
        size = visual.image_size
        self.size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.description = f"open_clip {name} image tower"

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.to(self.device), size=self.size, mode="bicubic", antialias=True).clamp(0, 1)
        return self.model.encode_image((x.expand(-1, 3, -1, -1) - self.mean) / self.std).float()


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _downloaded(build: Callable[[], Extractor], reason: str) -> Extractor | str:
    """``build()``, whose library downloads weights; where the download fails (no internet), the reason instead."""
    try:
        return build()
    except (OSError, RuntimeError) as error:  # URLError is an OSError; torch.hub wraps some failures in RuntimeError
        logger.warning("%s", reason.format(error=error))
        return "not computed: " + reason.format(error=type(error).__name__)


def build_extractor(
    spec: str,
    device: torch.device,
    inception_weights: str | os.PathLike | None = None,
    xrv_weights: str | None = None,
) -> Extractor | str:
    """The extractor ``spec`` names (``inception``, ``xrv`` or ``open_clip:NAME_OR_DIR``), or why it is not built.

    A missing weights file or package is a reason (the report says the space was not computed and why); a file
    that is there but wrong is an error."""
    kind, _, name = spec.partition(":")
    if kind == "inception":
        if inception_weights is not None and not Path(inception_weights).is_file():
            return f"not computed: --inception-weights {inception_weights}: no such file"
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            return "not computed: the Inception network needs torch-fidelity (pip install torch-fidelity)"
        if inception_weights is not None:
            return InceptionExtractor(Path(inception_weights), device)
        return _downloaded(
            lambda: InceptionExtractor(None, device),
            "the pt_inception-2015-12-05 weights could not be downloaded ({error}); offline, pass the file "
            "torch-fidelity downloads as --inception-weights FILE",
        )
    if kind == "xrv":
        try:
            import torchxrayvision  # noqa: F401
        except ImportError:
            return "not computed: needs torchxrayvision (pip install torchxrayvision)"
        if xrv_weights is not None and Path(xrv_weights).is_file():
            return XRVExtractor(xrv_weights, device)
        name = xrv_weights or DEFAULT_XRV_WEIGHTS
        return _downloaded(
            lambda: XRVExtractor(name, device),
            f"the torchxrayvision weights {name} could not be fetched ({{error}}); offline, pass a DenseNet-121 "
            "state dict as --xrv-weights FILE",
        )
    if kind == "open_clip":
        if not name:
            return "not computed: write open_clip:NAME_OR_DIR (e.g. open_clip:local-dir:/models/biomedclip)"
        folder = name.removeprefix("local-dir:")
        if name.startswith("local-dir:") and not (Path(folder) / "open_clip_config.json").is_file():
            return f"not computed: {folder} holds no open_clip_config.json"
        return OpenCLIPExtractor(name, device)
    raise ValueError(
        f"Unknown feature space {spec!r}; choose one of {', '.join(FEATURE_KINDS)} (open_clip:NAME_OR_DIR)"
    )


def embed_images(
    extractor: Extractor, manifest: Manifest, size: int, batch_size: int = 32, mixed_precision: str = "no"
) -> np.ndarray:
    """Features of every row of ``manifest`` (its images at ``size`` from the image cache), the extractor run under
    the ``mixed_precision`` autocast (``no``, ``bf16``, ``fp16``)."""
    loader = DataLoader(CXRDataset(manifest, size, progress=False), batch_size=batch_size, shuffle=False)
    out: list[Any] = []
    for batch in loader:
        with autocast(extractor.device, mixed_precision):
            out.append(extractor(batch["image"]).float().cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def space_fidelity(
    spec: str,
    reference: dict[str, Manifest],
    sets: Mapping[str, Manifest],
    size: int,
    fid_images: int,
    device: Any,
    seed: int,
    inception_weights: str | os.PathLike | None,
    xrv_weights: str | None,
    mixed_precision: str = "no",
) -> dict[str, Any]:
    """FID, KID, precision/recall and density/coverage of every set (and the real-to-real floor) in one more
    feature space (its network under the ``mixed_precision`` autocast), or the reason it was not computed."""
    extractor = build_extractor(spec, device, inception_weights=inception_weights, xrv_weights=xrv_weights)
    if isinstance(extractor, str):
        logger.info("Feature space %s: %s", spec, extractor)
        return {"note": extractor}
    test = embed_images(extractor, reference["test"], size, mixed_precision=mixed_precision)
    val = embed_images(extractor, reference["val"], size, mixed_precision=mixed_precision)
    synthetic = {name: embed_images(extractor, m, size, mixed_precision=mixed_precision) for name, m in sets.items()}
    return {
        "extractor": extractor.description,
        "floor": feature_distances(test, val, seed, fid_images),
        "synthetic": {name: feature_distances(test, f, seed, fid_images) for name, f in synthetic.items()},
    }


FLAT_METRICS = ("fid", "kid", "precision", "recall", "density", "coverage")


def flat_metrics(spaces: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """``{set: {"fid.reference": ..., "fid.xrv": ..., ...}}``, the real-to-real floor as the set ``real_floor``: the
    keys name the extractor, so no number can be read as another space's."""
    out: dict[str, dict[str, float | None]] = {}
    for space, entry in spaces.items():
        if "floor" not in entry:
            continue
        for name, values in {"real_floor": entry["floor"], **entry["synthetic"]}.items():
            out.setdefault(name, {}).update({f"{m}.{space}": values.get(m) for m in FLAT_METRICS})
    return out
