"""Shared fixtures: tiny random checkpoints in both layouts (written once per session), and the
`cuda` marker for GPU-only tests (skipped without CUDA)."""

import pytest
import torch

from lowvram.setup.synthetic_checkpoint import write_synthetic_checkpoint


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_official(tmp_path_factory):
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("tiny_official"), "official", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_diffusers(tmp_path_factory):
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("tiny_diffusers"), "diffusers", "tiny", seed=0)
