"""The installed versions of the dependencies whose features this package gates on (Transformer Engine)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from packaging.version import InvalidVersion, Version


def installed_version(distribution: str) -> str | None:
    """The version string pip records for ``distribution``; None where it is not installed. Imports nothing."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def te_version() -> Version | None:
    """The installed Transformer Engine's version, or None if it cannot be read."""
    try:
        import transformer_engine

        return Version(str(transformer_engine.__version__))
    except (ImportError, AttributeError, InvalidVersion):
        return None
