"""Where things are in this repository, wherever a test file lies under tests/; what the example configs hold."""

from __future__ import annotations

from pathlib import Path

#: The repository's root: the directory that holds pyproject.toml.
REPO_ROOT = next(parent for parent in Path(__file__).resolve().parents if (parent / "pyproject.toml").is_file())
#: Scripts the launcher tests start as processes (they lie next to this file).
LAUNCH_PROBE = Path(__file__).with_name("launch_probe.py")
MULTINODE_PROBE = Path(__file__).with_name("multinode_probe.py")

#: The example configs (examples/configs/*.yaml), the 8B one with its parameter count as the plan prints it, and the
#: one-GPU 8B config with recompute and optimizer offload.
CONFIGS = sorted((REPO_ROOT / "examples" / "configs").glob("*.yaml"))
CONFIG_8B = REPO_ROOT / "examples" / "configs" / "llama3_8b_h100_fp8.yaml"
PARAMS_8B = "8,030,261,248"
CONFIG_1B = REPO_ROOT / "examples" / "configs" / "llama3_1b_1gpu_fp8.yaml"
CONFIG_1GPU = REPO_ROOT / "examples" / "configs" / "llama3_8b_1gpu_fp8_recompute.yaml"
