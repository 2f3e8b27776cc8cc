"""Reading radiographs from disk as grayscale float arrays in [0, 1].

One function, :func:`load_image`, reads every format the adapters meet: PNG (8 or 16 bit; L, LA, P,
RGB, RGBA), JPEG (EXIF orientation applied), TIFF, BMP and DICOM (recognised by its ``DICM`` preamble
whatever the file is called). Anything it cannot decode raises :class:`ImageReadError` naming the file,
so that adapters can reject the row with that reason instead of crashing or skipping it silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from diffcxr_aug.errors import ImageReadError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")
DICOM_SUFFIXES = (".dcm", ".dicom")

# PIL modes that hold more than 8 bits per pixel; they carry no display window, so they are stretched to
# their own min-max (as the DICOM path does when a file has no VOI LUT).
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def is_dicom(path: str | os.PathLike) -> bool:
    """True for a ``.dcm``/``.dicom`` file or any file with the DICOM preamble (``DICM`` at byte 128)."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _stretch(arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def _pil_to_gray(img: Image.Image) -> np.ndarray:
    if img.mode in _HIGH_DEPTH_MODES:
        return _stretch(np.asarray(img))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        # Transparent pixels become black, as a viewer would show them on a dark background.
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    # L, 1, P, RGB, CMYK, YCbCr: ITU-R 601 luma, so burnt-in colour annotations fade into gray.
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def _check_truncation_guard(path: Path) -> None:
    # Some libraries flip this PIL-wide switch on import; with it set, a truncated file decodes into a
    # half-gray image instead of raising, and would slip into a training set unnoticed.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ImageReadError(
            f"{path}: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set by some imported library, so truncated images "
            "cannot be detected; set it back to False before indexing"
        )


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Load one image as a 2-D float32 array in [0, 1] (0 = black), whatever its format or bit depth.

    8-bit images keep their values (``v / 255``); 16-bit and float images are stretched to their own
    min-max; colour images become luma; transparent pixels become black; JPEG EXIF orientation is applied;
    DICOM goes through :func:`diffcxr_aug.data.dicom.load_dicom` (modality and VOI LUT, MONOCHROME1
    inverted).

    Raises:
        ImageReadError: the file is missing, truncated or in a format nothing here can decode.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if is_dicom(path):
        from diffcxr_aug.data.dicom import load_dicom

        return load_dicom(path)
    _check_truncation_guard(path)
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return _pil_to_gray(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from err


def verify_image(path: str | os.PathLike) -> tuple[int, int]:
    """Check that an image decodes completely and return its ``(height, width)``.

    Cheaper than :func:`load_image` for JPEG: it decodes at 1/8 scale (libjpeg's DCT scaling still reads
    every byte of the entropy-coded data, so a truncated or corrupt file still fails). Adapters call it
    once per image while indexing.

    Raises:
        ImageReadError: as :func:`load_image`.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if is_dicom(path):
        from diffcxr_aug.data.dicom import load_dicom

        return tuple(load_dicom(path).shape)  # type: ignore[return-value]
    _check_truncation_guard(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.format == "JPEG":
                img.draft("L", (max(1, width // 8), max(1, height // 8)))
            img.load()
            if img.size[0] == 0 or img.size[1] == 0:
                raise ValueError("empty image")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from err
    return height, width


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
        square = np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.LANCZOS))
    return square


def save_png(arr: np.ndarray, path: str | os.PathLike) -> None:
    """Save a [0, 1] float or uint8 array as an 8-bit grayscale PNG, atomically."""
    from diffcxr_aug.io import atomic_path

    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
