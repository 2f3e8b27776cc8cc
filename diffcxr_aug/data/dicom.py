"""DICOM radiographs: MONOCHROME1 inverted, modality and VOI LUT applied."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from diffcxr_aug.data.images import ImageReadError


def load_dicom(path: str | os.PathLike) -> np.ndarray:
    """Read a DICOM file as a 2-D float32 array in [0, 1] with 0 = black, as a radiologist's viewer shows it."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except Exception as err:  # pydicom raises many types for broken files; all mean "unreadable"
        raise ImageReadError(f"{path}: cannot decode DICOM ({type(err).__name__}: {err})") from err
    arr = apply_modality_lut(pixels, ds)
    arr = apply_voi_lut(arr, ds).astype(np.float32)
    if arr.ndim == 3:  # multi-frame or colour: take the first frame / luminance
        arr = arr[0] if arr.shape[-1] not in (3, 4) else arr[..., :3].mean(-1)
    lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if getattr(ds, "PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        arr = 1.0 - arr
    return arr.astype(np.float32)
