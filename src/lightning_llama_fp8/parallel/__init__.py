"""Parallel layouts: the layout and its checks, pipeline stages, memory settings (recompute, optimizer offload,
optimizer-state precision), CUDA graphs of the layers and Megatron's data-parallel wrapping."""
