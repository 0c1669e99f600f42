"""Ray Serve 2.60's own config models trigger a pydantic deprecation warning on import; it is
not ours to fix, so hide exactly that message. The modules marked serve_cluster (their app
runs through app_fixtures.running_app) run one after another, so that they share its cluster."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent


def pytest_configure(config):
    config.addinivalue_line(
        "filterwarnings", "ignore:Using extra keyword arguments on `Field`:DeprecationWarning"
    )


def pytest_collection_modifyitems(session, config, items):
    """Within tests/deploy, the modules marked serve_cluster go last, in their own order
    (serve_app/ first: its metrics tests want a cluster no app ran on before)."""
    here = [i for i, item in enumerate(items) if _in_deploy(item)]
    if not here:
        return
    block = [items[i] for i in here]
    shared = [it for it in block if _shares(it)]
    rest = [it for it in block if not _shares(it)]
    for i, item in zip(here, rest + shared, strict=True):
        items[i] = item


def _in_deploy(item) -> bool:
    return Path(item.path).is_relative_to(HERE)


def _shares(item) -> bool:
    return item.get_closest_marker("serve_cluster") is not None
