"""Shared test set-up: no telemetry leaves the machine, tiny threads, markers for real data,
the slow modules first."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

for _key, _value in {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "TQDM_DISABLE": "1",
}.items():
    os.environ.setdefault(_key, _value)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ULMFIT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real corpora); tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real corpora not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def no_mlflow_store_from_the_environment():
    """Each test finds no ``MLFLOW_TRACKING_URI``/``MLFLOW_REGISTRY_URI`` and leaves none.
    MLflow's ``set_tracking_uri`` (which registering a model calls, through
    ``tasks.tracking.use_store``) also sets them in ``os.environ``, which would send a later
    test's runs in the same process (a pytest-xdist worker) to the earlier test's store."""
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    for key in keys:
        os.environ.pop(key, None)
    yield
    for key in keys:
        os.environ.pop(key, None)


@pytest.fixture
def one_thread_and_seed():
    """One torch thread and seed 0 for a model test (``pytestmark = pytest.mark.usefixtures``):
    tiny models run faster on one thread, and the same on every machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def benchmark_with():
    """``benchmark_with(*files, both_directions=())``: the benchmark profile's params with the
    controls of each ``bench/<file>`` pasted under its own, as a bench section's reproduce line
    does, and the pasted entries by file. ``both_directions``: datasets whose ``directions`` is
    removed first (they train both), as a file's header may ask."""
    import yaml

    from tasks.params import parse_params

    def load(*files: str, both_directions: tuple[str, ...] = ()):
        data = yaml.safe_load((REPO_ROOT / "profiles" / "benchmark.yaml").read_text())
        for dataset in both_directions:
            del data["datasets"][dataset]["directions"]
        pasted = {name: yaml.safe_load((REPO_ROOT / "bench" / name).read_text()) for name in files}
        data["controls"].update({k: v for p in pasted.values() for k, v in p.items()})
        return parse_params(data), pasted

    return load


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with ``slow`` tests (the end-to-end pipelines) first, each module's own order
    kept: scripts/test hands whole modules to two workers in this order, and a long module
    that starts last would finish alone."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow)
