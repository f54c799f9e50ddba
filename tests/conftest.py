"""Shared pytest setup: GPU marker skipping and a shared-data locator."""
import os
import pathlib
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/dist_harness.py for the gloo workers (forked or spawned)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def shared_data_dir():
    return SHARED / "data"
