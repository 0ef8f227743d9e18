"""Repository-wide pytest setup.

Plain ``pytest`` runs the benchmarks once, untimed, so they cannot rot; ``pytest --benchmark-only`` times them.
"""

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("benchmark_only", default=False):
        config.option.benchmark_disable = True
