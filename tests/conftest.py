"""Shared fixtures: tiny random checkpoints in both layouts (written once per session); tests
marked `cuda` (pyproject.toml registers the markers) are skipped without CUDA. Shared helpers:
helpers.py."""

import pytest
import torch

from lowvram.setup.synthetic_checkpoint import write_synthetic_checkpoint


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
