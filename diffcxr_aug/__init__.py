"""diffcxr-aug: report-to-chest-X-ray generation (Diff-CXR) and synthetic-data augmentation."""

from diffcxr_aug.data.labels import CHEXPERT_LABELS, NIH_LABELS

__version__ = "0.1.0"

__all__ = ["CHEXPERT_LABELS", "NIH_LABELS", "__version__"]
