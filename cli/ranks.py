"""`--gpus N`: this command as one of N ranks (lowvram/generation/ranks.py), or the launcher of N ranks.

    ranks = as_rank(gpus, parallel, device, model_dir, video, as_json, resume_hint)   # before the work starts
    # returns: None (one process) or rank 0's Ranks; launchers and followers never return

Started by a person, `--gpus N` re-runs the same command line as N ranks (lowvram/generation/launch.py) and
waits for them; started as a rank (by that launcher or by torchrun, whose variables say so), the
command joins the group: rank 0 carries on as the run, the others follow it and exit.
"""

import sys
from collections.abc import Callable
from pathlib import Path

import typer

from .app import err, fail


def as_rank(gpus: int | None, parallel: str, device: str | None, model_dir: Callable[[], Path],
            video: Callable[[], tuple[int, int, int] | None], as_json: bool, resume_hint: str):
    """Launch, follow or lead; see the module docstring. model_dir/video: the run's model folder
    and (width, height, frames), asked by the launcher and rank 0 only (video None: a batch, whose
    clips rank 0 checks one by one); resume_hint: the command that continues the run."""
    from hyvideo.checkpoint import find_model_files
    from lowvram.generation.launch import launch_ranks
    from lowvram.generation.preflight import check_launch, default_device, run_layout
    from lowvram.generation.ranks import RankZeroFailed, follow, join_ranks, leave_ranks, rank_environment

    env = rank_environment()
    device = device or default_device()
    if env is None:
        if gpus is None or gpus == 1:
            return None
        check_launch(gpus, parallel, device, find_model_files(model_dir()), video())
        outcome = launch_ranks([sys.executable, "-m", "cli", *sys.argv[1:]], gpus)
        if outcome.failure:
            fail(f"{outcome.failure}; the run stopped at its last saved step: `{resume_hint}` continues it", as_json,
                 outcome.exit_code)
        raise typer.Exit(outcome.exit_code)
    if gpus is not None and gpus != env["WORLD_SIZE"]:
        fail(f"--gpus {gpus}, but this process was started as one of {env['WORLD_SIZE']} ranks (WORLD_SIZE); "
             "give the same number or leave --gpus out", as_json)
    try:
        ranks = join_ranks(lambda world: (run_layout(world, parallel, find_model_files(model_dir()), video()), device))
    except RankZeroFailed:  # rank 0 prints why
        raise typer.Exit(2) from None
    if ranks.leads:
        return ranks
    try:
        follow(ranks)
    except Exception as error:  # rank 0 reports the run; a follower says only what stopped it
        err.print(f"rank {ranks.rank}: {type(error).__name__}: {error}", markup=False)
        raise typer.Exit(1)
    finally:
        leave_ranks()
    raise typer.Exit(0)
