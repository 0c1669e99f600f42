"""Ray Serve 2.60's own config models trigger a pydantic deprecation warning on import; it is
not ours to fix, so hide exactly that message (as tests/deploy does)."""

from __future__ import annotations


def pytest_configure(config):
    config.addinivalue_line(
        "filterwarnings", "ignore:Using extra keyword arguments on `Field`:DeprecationWarning"
    )
