"""A run on several ranks below the CLI (lowvram/generation/ranks.py), the ranks forked from this
process and talking gloo: image-to-video on 2 ranks, both conditioning types. Rank 0 checks the
run, encodes the prompt and the image and sends each follower the DiT and the clip (with the
image's latent); the final latents equal one process's; a run stopped after a step resumes on 2
ranks bit-identically; the manifest holds the image's fingerprint as a one-process run's does."""

import gc
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hyvideo.checkpoint import find_model_files
from hyvideo.pipeline import GenerationRequest
from lowvram.generation.launch import free_port
from lowvram.progress import Reporter
from lowvram.setup.synthetic_checkpoint import write_synthetic_checkpoint
from tests.helpers import StopAfter, fork_ranks, run_options

pytest.importorskip("yunchang")

# 64x48 px, 9 frames: latents 3 x 6 x 8, a 3 x 3 x 4 token grid whose 3 rows do not halve, so each
# rank takes 2 of the 4 columns (6 tokens of every latent frame, the first frame's among them).
STEPS = 3
# The T2V --gpus runs' bound (tests/test_cli_multigpu.py): float32, the ranks sum attention in
# another order each step; measured 4.8e-7 on final latents of about 4 (1 ulp), while a token in the
# wrong place or a frame modulated wrongly moves them by ~1e-1.
ATOL = 1e-4


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    y, x = np.mgrid[0:48, 0:64]
    path = tmp_path_factory.mktemp("image") / "cat.png"
    Image.fromarray(np.stack([x * 4, y * 5, (x * y) % 256], -1).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module", params=["tiny-i2v", "tiny-i2v-33ch"], ids=["token_replace", "latent_concat"])
def model_dir(request, tmp_path_factory):
    return write_synthetic_checkpoint(tmp_path_factory.mktemp(request.param), "official", request.param, seed=0)


def _request(image: Path) -> GenerationRequest:
    return GenerationRequest("A cat walks on the grass.", width=64, height=48, frames=9, steps=STEPS, seed=5, image=str(image))


def _rank(rank: int, world: int, port: int, model_dir: Path, image: Path, runs_dir: Path, stop_after: int | None,
          resume: bool) -> None:
    """One rank of `generate --image` (or of `resume`) as cli/ranks.py runs it: rank 0 the run, the
    others `follow` (world 1: one process, no ranks). Rank 0 writes its result (or how it stopped)
    to runs_dir/rank0.json."""
    from lowvram.generation.preflight import run_layout, start_run
    from lowvram.generation.ranks import follow, join_ranks, leave_ranks
    from lowvram.generation.runner import RunInterrupted, StopRequest, execute, resume_run

    gc.freeze()  # the test process's heap, inherited: the runner's gc.collect() between stages skips it
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    files = find_model_files(model_dir, image_to_video=True)
    ranks = join_ranks(lambda n: (run_layout(n, "usp", files, (64, 48, 9)), "cpu"))  # None for world 1
    try:
        if ranks and not ranks.leads:
            follow(ranks)
            return
        stop = StopRequest()
        reporter = StopAfter(stop, stop_after) if stop_after else Reporter()
        try:
            if resume:
                result = resume_run(runs_dir, reporter=reporter, stop=stop)
            else:
                run, found, plan = start_run(run_options(model_dir, runs_dir, _request(image)), reporter)
                result = execute(run, found, plan, reporter, stop)
            outcome = {"final_latents": result.final_latents, "resumed_from": result.resumed_from}
        except RunInterrupted as stopped:
            outcome = {"stopped_at": stopped.run.step}
        (runs_dir / "rank0.json").write_text(json.dumps(outcome))
    finally:
        leave_ranks()


def _on_ranks(world: int, model_dir: Path, image: Path, runs_dir: Path, stop_after: int | None = None,
              resume: bool = False) -> dict:
    """The run on `world` forked processes of one thread each (world 1 too, so that one process's
    run has the ranks' thread count and needs no second interpreter)."""
    runs_dir.mkdir(exist_ok=True)
    fork_ranks(_rank, world, free_port(), model_dir, image, runs_dir, stop_after, resume)
    return json.loads((runs_dir / "rank0.json").read_text())


def _latents(outcome: dict) -> torch.Tensor:
    return load_file(outcome["final_latents"])["latents"]


def _manifest(runs_dir: Path) -> dict:
    (found,) = runs_dir.glob("*/manifest.json")
    return json.loads(found.read_text())


@pytest.mark.slow
def test_image_to_video_on_two_ranks_equals_one_process_and_resumes(model_dir, image, tmp_path):
    """Both conditioning types through the whole run on 2 ranks (the image encoded once, by rank 0,
    its latent sent to the follower with the clip); then the same run stopped after step 1 (every
    rank stops after the same step) continues on 2 ranks to the same latents bit for bit."""
    two = _latents(_on_ranks(2, model_dir, image, tmp_path / "two"))
    torch.testing.assert_close(two, _latents(_on_ranks(1, model_dir, image, tmp_path / "one")), rtol=0, atol=ATOL)
    settings = _manifest(tmp_path / "two")["settings"]
    assert settings["parallel"] == {"ranks": 2, "ulysses": 2, "ring": 1}
    assert settings["image"] == str(image) and settings["image_fingerprint"] == _manifest(tmp_path / "one")["settings"]["image_fingerprint"]

    assert _on_ranks(2, model_dir, image, tmp_path / "stopped", stop_after=1) == {"stopped_at": 1}
    resumed = _on_ranks(2, model_dir, image, tmp_path / "stopped", resume=True)
    assert resumed["resumed_from"] == f"step 1/{STEPS}"
    assert torch.equal(_latents(resumed), two)
