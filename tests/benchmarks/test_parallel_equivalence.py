"""benchmarks/parallel_equivalence.py on the CPU: the Hugging Face weights its runs start from."""

from __future__ import annotations

from pathlib import Path

from lightning_llama_fp8.config import LlamaConfig


def test_equivalence_benchmark_writes_the_small_arch_as_hf_weights(tmp_path: Path) -> None:
    """benchmarks/parallel_equivalence.py starts pipeline layouts and their one-GPU reference from HF weights of
    bench_throughput's small architecture: the architecture read back must be that one exactly."""
    from benchmarks import parallel_equivalence
    from benchmarks import throughput as bench_throughput

    directory = parallel_equivalence.write_hf_weights(tmp_path / "hf", 2, 4096)
    assert LlamaConfig.from_hf(directory, seq_length=4096) == bench_throughput.small_arch(2, 4096)
