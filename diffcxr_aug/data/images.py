"""Reading radiographs from disk as grayscale float arrays in [0, 1]."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")


class ImageReadError(ValueError):
    """An image that cannot be decoded; the message names the file and why."""


def _pil_to_gray(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        hi = 65535.0 if arr.max() > 255 else 255.0
        return np.clip(arr / hi, 0.0, 1.0)
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        # Transparent pixels become black, as a viewer would show them on a dark background.
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Load one image as a 2-D float32 array in [0, 1] (0 = black), whatever its format or bit depth."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if path.suffix.lower() in (".dcm", ".dicom"):
        from diffcxr_aug.data.dicom import load_dicom

        return load_dicom(path)
    try:
        with Image.open(path) as img:
            img.load()
            return _pil_to_gray(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageReadError(f"{path}: cannot decode image ({err})") from err


def center_square(arr: np.ndarray) -> np.ndarray:
    """Crop the central square, as torchxrayvision's XRayCenterCrop does, so resizing keeps proportions."""
    h, w = arr.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return arr[top : top + side, left : left + side]


def to_uint8_square(arr: np.ndarray, size: int) -> np.ndarray:
    """Center-crop to a square and resize to ``size`` x ``size`` uint8 (antialiased)."""
    square = (np.clip(center_square(arr), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if square.shape[0] != size:
        square = np.asarray(Image.fromarray(square, mode="L").resize((size, size), Image.Resampling.LANCZOS))
    return square


def save_png(arr: np.ndarray, path: str | os.PathLike) -> None:
    """Save a [0, 1] float or uint8 array as an 8-bit grayscale PNG, atomically."""
    from diffcxr_aug.io import atomic_path

    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(arr, mode="L").save(tmp, format="PNG")
