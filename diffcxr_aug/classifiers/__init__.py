"""timm classifiers, their training loop and metrics."""
