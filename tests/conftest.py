"""Shared test fixtures. Tests run offline: no hub, W&B disabled unless a test turns it to offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """../shared next to the checkout (CI copies it there), or $ULTRAMEM_SHARED."""
    env = os.environ.get("ULTRAMEM_SHARED")
    return Path(env) if env else REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if not path.exists():
        pytest.fail(f"shared data not found at {path}; set ULTRAMEM_SHARED to the folder holding data/ and reference/")
    return path


@pytest.fixture(scope="session")
def shakespeare_path(shared: Path) -> Path:
    return shared / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def scaling_data(shared: Path) -> Path:
    return shared / "data" / "scaling"


@pytest.fixture(scope="session")
def ray_local():
    """One private local Ray for the session (2 CPUs, loopback, no dashboard); the sweep scheduler reuses it."""
    import logging
    import shutil
    import tempfile

    import ray

    temp = tempfile.mkdtemp(prefix="umray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, _temp_dir=temp,
             object_store_memory=128 * 2**20, log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
