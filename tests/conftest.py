"""Shared fixtures: tiny random checkpoints in both layouts (written once per session); tests
marked `cuda` (pyproject.toml registers the markers) are skipped without CUDA. Shared helpers:
helpers.py."""

import gc
import os

# One intra-op thread, set before torch is imported: the suite runs on two workers (README) over
# two cores, and tiny-model ops gain nothing from a second thread while its spinning takes the
# other worker's core (a third of the time of the CLI and run tests went there). The processes the
# tests start inherit it, so runs compared bit for bit across processes use the same thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lowvram.setup.synthetic_checkpoint import write_synthetic_checkpoint  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_collection_finish(session):
    """The runs release models with gc.collect() between stages (lowvram/streaming.py
    `empty_cache`), which walks every object the process holds: here half a million from the
    test modules' imports (torch, transformers, diffusers), 0.3-2 s per call and several calls
    per run. Frozen, they are skipped; what the tests create is still collected (a quarter of
    the CPU time of tests/test_generation_runs.py)."""
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def tiny_official(tmp_path_factory):
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("tiny_official"), "official", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_diffusers(tmp_path_factory):
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("tiny_diffusers"), "diffusers", "tiny", seed=0)
