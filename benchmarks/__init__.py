"""Benchmarks and GPU evidence for lightning-llama-fp8.

Entry points run from the repository root as ``python -m benchmarks.<name>``; shared code is in
``benchmarks.lib``, the GPU stages in ``benchmarks.stages``. See ``benchmarks/README.md``.
"""
