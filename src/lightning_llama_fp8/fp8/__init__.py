"""FP8 with Transformer Engine: the per-module scaling state and the refresh of FP8 weights from the main weights."""
