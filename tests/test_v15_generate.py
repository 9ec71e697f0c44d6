"""`lowvram generate` on HunyuanVideo-1.5 text-to-video weights through the one runner (tiny weights
in Tencent's layout, tiny encoders of tests/tiny_v15_text.py): the transformer's own sampling
defaults, the FP8 DiT streamed under real CFG, the 16x VAE in tiles, a video out; stopped after a
step and resumed, the final latents equal an uninterrupted run's."""

import dataclasses

import pytest
import torch

from hyvideo.errors import HyVideoError
from hyvideo.pipeline import GenerationRequest
from lowvram.generation.preflight import RunOptions, start_run
from lowvram.generation.run_folder import find_run
from lowvram.generation.runner import DEMO_PROFILE, RunInterrupted, StopRequest, execute, resume_run
from lowvram.progress import Reporter
from lowvram.setup.synthetic_v15 import write_v15_checkpoint
from tests.tiny_v15_text import write_official_encoders

PROFILE = dataclasses.replace(DEMO_PROFILE, vae_spatial_tile=8, pin_memory=False)  # 1 of 2 blocks resident, FP8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("v15gen") / "ckpts"
    write_v15_checkpoint(root, "official", "tiny")
    return write_official_encoders(root)


def options(model_dir, runs_dir, **fields) -> RunOptions:
    request = GenerationRequest('a fox with a sign that says "hi"', width=96, height=64, frames=9, seed=5, steps=3)
    return RunOptions(request, model_dir, runs_dir, PROFILE, device="cpu", sampling_given=frozenset({"steps"}), **fields)


class StopAfterFirstStep(Reporter):
    def __init__(self, stop: StopRequest):
        self.stop = stop

    def advance(self, completed: int, **info) -> None:
        if completed >= 1:
            self.stop.set()


@pytest.mark.slow
def test_generate_and_resume_bit_identical(model_dir, tmp_path):
    run, files, plan = start_run(options(model_dir, tmp_path / "a"))
    assert (run.settings["guidance"], run.settings["flow_shift"], run.settings["model"]) == (6.0, 5.0, "1.5-480p_t2v")  # 480p_t2v's
    assert plan.schedule.forwards_per_step == 2 and plan.profile.step_cache == "off"
    whole = execute(run, files, plan)
    assert whole.state == "done" and whole.video and whole.stats["dit"]["blocks_copied_per_step"] == [1] * 6  # 3 steps x 2 forwards

    run, files, plan = start_run(options(model_dir, tmp_path / "b"))
    stop = StopRequest()
    with pytest.raises(RunInterrupted):
        execute(run, files, plan, StopAfterFirstStep(stop), stop)
    assert find_run(tmp_path / "b", run.id).step == 1
    resumed = resume_run(tmp_path / "b", run.id)
    assert resumed.resumed_from == "step 1/3"
    final = find_run(tmp_path / "b", run.id).load_final()
    assert torch.equal(final, find_run(tmp_path / "a", whole.run_id).load_final())


def test_what_is_not_wired_for_v15_is_refused(model_dir, tmp_path):
    with pytest.raises(HyVideoError, match="--preview is not wired for HunyuanVideo-1.5"):
        start_run(options(model_dir, tmp_path, preview=True))


def test_a_sparse_transformer_runs_dense_and_says_so(model_dir, tmp_path):
    """No SSTA kernel here (flex-block-attn, H-series GPUs): a `*_sparse` transformer is planned
    with dense attention, and one warning says so."""
    import shutil

    root = tmp_path / "ckpts"
    shutil.copytree(model_dir, root)
    (root / "transformer" / "480p_t2v").rename(root / "transformer" / "720p_t2v_distilled_sparse")
    warnings = []

    class Warnings(Reporter):
        def warn(self, message: str) -> None:
            warnings.append(message)

    run, files, plan = start_run(options(root, tmp_path / "runs"), Warnings())
    assert files.variant == "720p_t2v_distilled_sparse" and run.settings["guidance"] == 1.0
    assert [w for w in warnings if "sparse" in w] == [warnings[0]] and "dense attention" in warnings[0]
