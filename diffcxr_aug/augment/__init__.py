"""Real/synthetic mixing, sweeps and reports."""
