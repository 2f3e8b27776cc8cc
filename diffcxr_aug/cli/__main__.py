"""``python -m diffcxr_aug.cli``: the command line (as torchrun and accelerate launch start it)."""

import sys

from diffcxr_aug.cli import app

sys.exit(app())
