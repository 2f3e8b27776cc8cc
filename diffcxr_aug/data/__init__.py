"""Datasets, the common manifest, the phantom world, report parsing and labelling."""
