"""Where things are in this repository, wherever a test file lies under tests/."""

from __future__ import annotations

from pathlib import Path

#: The repository's root: the directory that holds pyproject.toml.
REPO_ROOT = next(parent for parent in Path(__file__).resolve().parents if (parent / "pyproject.toml").is_file())
#: Scripts the launcher tests start as processes (they lie next to this file).
LAUNCH_PROBE = Path(__file__).with_name("launch_probe.py")
MULTINODE_PROBE = Path(__file__).with_name("multinode_probe.py")
