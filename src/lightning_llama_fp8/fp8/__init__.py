"""FP8 with Transformer Engine: the recipes and what each needs, whether this machine runs one, the per-module scaling
state, and the refresh of FP8 weights from the main weights."""
