"""DICOM radiographs: modality LUT, VOI LUT (or window), MONOCHROME1 inverted, as a viewer shows them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from diffcxr_aug.errors import ImageReadError


def load_dicom(path: str | os.PathLike) -> np.ndarray:
    """Read a DICOM file as a 2-D float32 array in [0, 1] with 0 = black.

    Steps, in the order DICOM's grayscale pipeline defines them: modality LUT (rescale slope and
    intercept), then the first VOI LUT or window in the file, then the min-max of the result is mapped
    to [0, 1], and finally MONOCHROME1 is inverted so that bone is always bright. A multi-frame file
    gives its first frame; a colour file gives its luma.

    Raises:
        ImageReadError: the file is not DICOM, has no pixel data, or its pixel data cannot be decoded.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
        samples = int(getattr(ds, "SamplesPerPixel", 1))
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if frames > 1:
            pixels = pixels[0]
        if samples > 1:
            # Colour (pydicom has already converted YBR to RGB): LUTs do not apply to it; take ITU-R 601 luma.
            arr = pixels[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        else:
            arr = apply_modality_lut(pixels, ds)
            arr = apply_voi_lut(arr, ds)
        arr = np.asarray(arr, dtype=np.float32)
    except Exception as err:  # pydicom raises many types for broken files; all mean "unreadable"
        raise ImageReadError(f"{path}: cannot decode DICOM ({type(err).__name__}: {err})") from err
    if arr.ndim != 2 or min(arr.shape) == 0:
        raise ImageReadError(f"{path}: DICOM pixel data has shape {arr.shape}, expected one 2-D image")
    lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    # Only the photometric interpretation decides: DX files pair MONOCHROME1 with Presentation LUT Shape
    # INVERSE, which states the same inversion again rather than undoing it.
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1":
        arr = 1.0 - arr
    return arr.astype(np.float32)
