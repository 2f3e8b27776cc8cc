"""Fidelity, faithfulness, privacy and compute evaluation of synthetic sets."""
