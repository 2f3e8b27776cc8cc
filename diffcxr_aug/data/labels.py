"""The one canonical label list, and the maps from other label sets onto it.

Label values everywhere follow CheXpert: ``1`` positive, ``0`` negative, ``-1`` uncertain and NaN for
"not mentioned / unknown". Code that trains or scores on labels masks NaN per label rather than
guessing a value for it.
"""

from __future__ import annotations

# Spelled exactly as CheXpert spells them (column order of the CheXpert label CSVs).
CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

# NIH ChestX-ray14 keeps its own names in its manifest ("Pleural_Thickening" is spelled with an
# underscore in Data_Entry_2017.csv).
NIH_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)

# NIH name -> CheXpert name, only where the meaning matches. Mass and Nodule are both lung lesions;
# Infiltration is closest to lung opacity. Emphysema, Fibrosis and Hernia have no CheXpert twin.
NIH_TO_CHEXPERT: dict[str, str] = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Effusion": "Pleural Effusion",
    "Infiltration": "Lung Opacity",
    "Mass": "Lung Lesion",
    "Nodule": "Lung Lesion",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Pleural_Thickening": "Pleural Other",
}

LABEL_VALUES: frozenset[float] = frozenset({1.0, 0.0, -1.0})

VIEWS: tuple[str, ...] = ("PA", "AP", "LATERAL", "UNKNOWN")
SPLITS: tuple[str, ...] = ("train", "val", "test")
