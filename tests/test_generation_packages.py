"""The optional packages a run needs are checked before any model loads (issue 21, item 4)."""

import sys

import pytest
import torch

from hyvideo.errors import HyVideoError
from hyvideo.pipeline import GenerationRequest
from lowvram.generation.packages import check_packages, needed_packages
from lowvram.generation.preflight import RunOptions, prepare_run

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def modules(*args) -> list[str]:
    return [module for module, _, _ in needed_packages(*args)]


def test_what_each_setting_needs():
    assert modules("fp8", "nf4", 129, CUDA) == ["av", "bitsandbytes"]
    assert modules("fp8", "nf4", 129, CPU) == ["av"]  # NF4 falls back to bf16 on the CPU anyway
    assert modules("int8", "bf16", 1, CUDA) == ["optimum.quanto"]  # one frame: a PNG, no PyAV
    assert modules("bf16", "bf16", 1, CPU) == []


def test_every_missing_package_in_one_line():
    with pytest.raises(HyVideoError) as info:
        check_packages("int8", "nf4", 129, CUDA, is_installed=lambda module: module == "bitsandbytes")
    message = str(info.value)
    assert "\n" not in message and message.endswith("pip install av optimum-quanto")
    assert "the mp4 writer" in message and "INT8 DiT" in message
    check_packages("int8", "nf4", 129, CUDA, is_installed=lambda module: True)  # nothing missing: no error


def test_a_run_without_pyav_stops_before_anything_loads(tiny_official, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # what an environment without PyAV looks like to find_spec
    video = GenerationRequest("a fox", width=64, height=48, frames=9, steps=2, seed=0)
    with pytest.raises(HyVideoError, match="pip install av"):
        prepare_run(RunOptions(video, tiny_official, tmp_path / "runs", device="cpu"))
    assert not (tmp_path / "runs").exists()
    image = GenerationRequest("a fox", width=64, height=48, frames=1, steps=2, seed=0)
    prepare_run(RunOptions(image, tiny_official, tmp_path / "runs", device="cpu"))  # a PNG needs no PyAV
