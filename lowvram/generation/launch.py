"""`--gpus N` on one machine: start N ranks of the same command, as torchrun would, and watch them.

    outcome = launch_ranks([sys.executable, "-m", "cli", *sys.argv[1:]], world=2)
    outcome.exit_code, outcome.failure   # rank 0's exit code; why a follower ended, if one did

Each rank is the same command with torchrun's variables set (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so a rank cannot tell this launcher from torchrun:
across machines, start the command under torchrun instead (`torchrun --nnodes 2 --nproc-per-node 4
... -m cli generate ...`). This process starts no CUDA context of its own (the GPUs are the ranks').

The ranks share the terminal: rank 0 draws progress and prints results; followers print only their
errors. Ctrl-C reaches every process of the terminal's group: rank 0 handles it, the followers and
this launcher ignore it. When a rank ends badly (killed, crashed) the others are stopped, since
they would wait for it forever: rank 0's last checkpoint is on disk (each is written atomically),
so the run resumes from there.
"""

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

GRACE_SECONDS = 10.0  # how long ranks get to end by themselves once one has ended


@dataclass
class LaunchOutcome:
    exit_code: int  # rank 0's, or 1 after a failure
    failure: str | None  # "rank 1 was killed by signal 9 (SIGKILL)"; None when rank 0 ended the run itself


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by signal {-code} ({signal.Signals(-code).name})"
    return f"exited with code {code}"


def launch_ranks(command: list[str], world: int, poll_seconds: float = 0.2) -> LaunchOutcome:
    """Run `world` copies of `command` as ranks 0..world-1 on this machine until all have ended."""
    port = str(free_port())
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    ranks = []
    try:
        for rank in range(world):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                   "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
            ranks.append(subprocess.Popen(command, env=env, stdout=None if rank == 0 else subprocess.DEVNULL))
        failure, ended_at = None, None
        while any(process.poll() is None for process in ranks):
            if ended_at is None:
                ended_at, failure = _first_end(ranks)
                if failure:  # the others would wait for it forever (NCCL has no quick timeout)
                    _stop(ranks, signal.SIGTERM)
            elif time.monotonic() - ended_at > GRACE_SECONDS:  # rank 0 is done; a follower still freeing its GPU
                _stop(ranks, signal.SIGTERM if time.monotonic() - ended_at < 2 * GRACE_SECONDS else signal.SIGKILL)
            time.sleep(poll_seconds)
        if ended_at is None:
            failure = _first_end(ranks)[1]
        code = ranks[0].returncode
        return LaunchOutcome(1 if failure else (code if code >= 0 else 128 - code), failure)
    finally:
        _stop(ranks, signal.SIGKILL)
        signal.signal(signal.SIGINT, previous)


def _first_end(ranks: list[subprocess.Popen]) -> tuple[float | None, str | None]:
    """(when, what failed): rank 0 ending or any rank failing ends the run. A failure is a follower
    ending with an error, or any rank killed by a signal; rank 0 reports its own errors."""
    for rank, process in enumerate(ranks):
        code = process.poll()
        if code is not None and (rank == 0 or code != 0):
            failed = code < 0 or (rank > 0 and code != 0)
            return time.monotonic(), (f"rank {rank} {describe_exit(code)}" if failed else None)
    return None, None


def _stop(ranks: list[subprocess.Popen], sig: int) -> None:
    for process in ranks:
        if process.poll() is None:
            process.send_signal(sig)
