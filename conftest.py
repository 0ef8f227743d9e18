"""Repository-wide pytest setup.

Plain ``pytest`` runs the benchmarks once, untimed, so they cannot rot; ``pytest --benchmark-only`` times them.
Tests marked ``bt10`` need bittensor 10.x (a real Dendrite or Axon): under 11.x they are deselected (reported as
such, never skipped), so the same command runs the suite on either SDK.
"""

import importlib.metadata

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("benchmark_only", default=False):
        config.option.benchmark_disable = True


def _bittensor_major() -> int | None:
    try:
        return int(importlib.metadata.version("bittensor").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _bittensor_major() == 10:
        return
    needs_10 = [item for item in items if item.get_closest_marker("bt10") is not None]
    if needs_10:
        config.hook.pytest_deselected(items=needs_10)
        items[:] = [item for item in items if item.get_closest_marker("bt10") is None]
