"""Diff-CXR: VAE, text encoder + token squeeze (AVA-TLS), UNet, DKIM adapter, noise filter (LNFS), training."""
