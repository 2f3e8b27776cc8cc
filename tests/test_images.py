"""Image loading on the real files of tests/fixtures: every format, bit depth and photometric interpretation."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from diffcxr_aug.data.images import load_image, verify_image
from diffcxr_aug.errors import ImageReadError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REAL_FILES = sorted(p for p in FIXTURES.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm"))
SIIM = "xrv/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


def test_fixture_folder_has_the_expected_files():
    # 12 Hannover PNG, 2 NIH PNG, 3 TBX11K PNG (RGB), 1 COVID JPG (RGB, EXIF), 2 DICOM (MONOCHROME1 and 2), and the
    # ieee8023 collection's 10 films (one PNG in a .jpg, one palette PNG)
    assert len(REAL_FILES) == 30, "tests/fixtures is incomplete"


@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: str(p.relative_to(FIXTURES)))
def test_every_real_file_loads(path):
    image = load_image(path)
    assert image.ndim == 2 and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert image.std() > 0.05  # a real radiograph, not a blank decode
    assert verify_image(path) == image.shape


def test_monochrome1_twin_comes_out_as_its_monochrome2_original(fixtures_dir):
    mono2_path = fixtures_dir / SIIM
    mono1_path = fixtures_dir / "xrv" / "Fake_MONOHR1.dcm"
    mono1, mono2 = pydicom.dcmread(mono1_path), pydicom.dcmread(mono2_path)
    assert (mono1.PhotometricInterpretation, mono2.PhotometricInterpretation) == ("MONOCHROME1", "MONOCHROME2")
    # The twin stores the very same values; only the tag says "bright means black" ...
    np.testing.assert_array_equal(mono1.pixel_array, mono2.pixel_array)
    # ... so after inversion it is the exact negative of the original, pixel for pixel.
    np.testing.assert_allclose(load_image(mono1_path), 1.0 - load_image(mono2_path), atol=1e-6)
    assert load_image(mono2_path).mean() > 0.5  # MONOCHROME2 untouched: this film is mostly bright


def test_dicom_window_is_applied(tmp_path, fixtures_dir):
    ds = pydicom.dcmread(fixtures_dir / SIIM)
    raw = ds.pixel_array.astype(np.float64)
    ds.WindowCenter, ds.WindowWidth = 120, 80
    path = tmp_path / "windowed.dcm"
    ds.save_as(path)
    # DICOM's linear window: below c - w/2 -> black, above c + w/2 -> white, linear between.
    expected = np.clip((raw - (120 - 0.5)) / (80 - 1) + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(load_image(path), expected, atol=1e-3)


def test_dicom_is_recognised_without_suffix(tmp_path, fixtures_dir):
    target = tmp_path / "IM0001"
    shutil.copy(fixtures_dir / SIIM, target)
    np.testing.assert_array_equal(load_image(target), load_image(fixtures_dir / SIIM))


def test_sixteen_bit_png_matches_its_eight_bit_source(tmp_path, fixtures_dir):
    source = fixtures_dir / "xrv" / "00000001_000.png"
    eight = np.asarray(Image.open(source).convert("L"))
    assert eight.min() == 0 and eight.max() == 255  # full range, so the 16-bit stretch must equal v / 255
    twelve_bit = eight.astype(np.uint16) * 16  # a 12-bit exposure stored in a 16-bit PNG
    path = tmp_path / "sixteen.png"
    Image.fromarray(twelve_bit).save(path)
    assert Image.open(path).mode.startswith("I")
    np.testing.assert_allclose(load_image(path), load_image(source), atol=1e-6)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P"])
def test_colour_and_alpha_modes_match_gray(tmp_path, fixtures_dir, mode):
    source = fixtures_dir / "xrv" / "00027426_000.png"
    gray = Image.open(source).convert("L")
    path = tmp_path / f"{mode}.png"
    gray.convert(mode).save(path)
    np.testing.assert_allclose(load_image(path), load_image(source), atol=1.5 / 255)


def test_transparent_pixels_become_black(tmp_path, fixtures_dir):
    gray = Image.open(fixtures_dir / "xrv" / "00027426_000.png").convert("L")
    rgba = gray.convert("RGBA")
    alpha = np.full(gray.size[::-1], 255, np.uint8)
    alpha[:, :100] = 0
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(tmp_path / "alpha.png")
    image = load_image(tmp_path / "alpha.png")
    assert image[:, :100].max() == 0.0 and image[:, 100:].mean() > 0.3


def test_jpeg_exif_orientation_is_applied(tmp_path, fixtures_dir):
    source = Image.open(fixtures_dir / "xrv" / "16747_3_1.jpg").convert("L")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    source.save(path, exif=exif, quality=95)
    image = load_image(path)
    assert image.shape == (source.width, source.height)
    upright = np.asarray(source.transpose(Image.Transpose.ROTATE_270), dtype=np.float32) / 255
    assert np.abs(image - upright).mean() < 0.02


@pytest.mark.parametrize("name", ["xrv/00000001_000.png", "xrv/16747_3_1.jpg", SIIM])
def test_truncated_file_is_an_image_read_error(tmp_path, fixtures_dir, name):
    data = (fixtures_dir / name).read_bytes()
    path = tmp_path / Path(name).name
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=Path(name).name):
        load_image(path)
    with pytest.raises(ImageReadError, match=Path(name).name):
        verify_image(path)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("404: Not Found")
    with pytest.raises(ImageReadError, match="cannot decode"):
        load_image(path)
    with pytest.raises(ImageReadError, match="no such file"):
        load_image(tmp_path / "missing.png")
