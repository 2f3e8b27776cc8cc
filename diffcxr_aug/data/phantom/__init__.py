"""The embedded phantom CXR world (issue #3): procedural chest radiographs with findings, reports and noise.

``prepare_phantom`` writes a dataset in the common manifest format; ``draw_montage`` shows images with
their reports. The modules: ``findings`` (what is true: patients, studies, findings, prevalence and
co-occurrence), ``anatomy`` (the normal chest), ``pathology`` (findings and devices as drawn),
``render`` (exposure and resampling), ``reports`` (report text and labels), ``noise`` (corrupted and
stray images), ``montage`` (figures for people) and ``world`` (the ``prepare phantom`` entry point).

Example::

    from diffcxr_aug.data.phantom import prepare_phantom, draw_montage

    manifest = prepare_phantom("data/phantom", n=2000, size=128, seed=0)
    draw_montage(manifest.parent, "montage.png", n=12)
"""

from diffcxr_aug.data.phantom.findings import FINDINGS, NOISE_KINDS, Finding, StudyTruth, sample_world
from diffcxr_aug.data.phantom.montage import draw_montage, showcase_rows
from diffcxr_aug.data.phantom.reports import write_report
from diffcxr_aug.data.phantom.world import prepare_phantom, render_study

__all__ = [
    "FINDINGS",
    "NOISE_KINDS",
    "Finding",
    "StudyTruth",
    "draw_montage",
    "prepare_phantom",
    "render_study",
    "sample_world",
    "showcase_rows",
    "write_report",
]
