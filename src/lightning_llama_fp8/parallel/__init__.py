"""Parallel layouts: the layout and its checks, pipeline stages, memory settings (recompute, optimizer offload) and
Megatron's data-parallel wrapping."""
