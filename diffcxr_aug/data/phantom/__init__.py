"""The embedded phantom CXR world (issue #3): procedural chest radiographs with findings, reports and noise.

``prepare_phantom`` writes a dataset in the common manifest format; ``draw_montage`` shows images with
their reports. The modules: ``findings`` (what is true: patients, studies, findings, prevalence and
co-occurrence), ``anatomy`` (the normal chest), ``pathology`` (findings and devices as drawn),
``render`` (exposure and resampling), ``reports`` (report text and labels), ``noise`` (corrupted and
stray images) and ``world`` (the ``prepare phantom`` entry point).
"""

from diffcxr_aug.data.phantom.findings import FINDINGS, NOISE_KINDS, StudyTruth, sample_world
from diffcxr_aug.data.phantom.world import prepare_phantom, render_study

__all__ = ["FINDINGS", "NOISE_KINDS", "StudyTruth", "prepare_phantom", "render_study", "sample_world"]
