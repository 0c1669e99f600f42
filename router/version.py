"""Flotilla's version: the installed package's (pyproject.toml), for /version and --version."""

from __future__ import annotations

from importlib import metadata


def version() -> str:
    try:
        return metadata.version("flotilla")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"
