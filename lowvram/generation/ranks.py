"""The processes of a multi-GPU run: rank 0 leads, the others follow its DiT stage.

    ranks = join_ranks(layout_for)        # from torchrun's variables (RANK, WORLD_SIZE, ...); None: one process
    if ranks.rank > 0: follow(ranks)      # the followers' whole life
    else: ... the usual run; _Execution (lowvram/generation/runner.py) drives the followers through `ranks`

Rank 0 is the only one that touches the run folder, reports progress and writes outputs: it runs
the pre-flight checks, the text encoders and the VAE on its own GPU as a one-GPU run does. For the
denoising stage it sends every follower what it needs, over a gloo control group (so nothing here
needs a shared file system, and multi-node runs work the same):
- `DitJob`: the model files, plan, attention backend, cache dir and LoRAs: each rank places the
  DiT per the profile (quantized, streamed) on its own GPU, for its share of the tokens;
- `ClipJob`: one clip's request, text embeddings, latents, start step and step-cache state, and
  for image-to-video the encoded image (`ImageCondition`: rank 0 encodes it with the text, as one
  process does; each rank feeds it to its DiT every step and takes the same Euler step);
- after each step, whether rank 0 was asked to stop (every rank stops after the same step);
- `FINISH`: denoising is over (also sent when rank 0 fails), the followers free their GPU and exit.
All ranks hold the same full latents: each computes the velocity for its tokens, gathers the rest
(hyvideo/dit.py), and takes the same Euler step, so rank 0's checkpoint is every rank's state.

One process is one rank, so the group is process state, like torch.distributed's own:
`join_ranks` sets it and `current_ranks()` reads it.
"""

import datetime
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from hyvideo.checkpoint import ModelFiles
from hyvideo.errors import HyVideoError
from hyvideo.lora import LoraSpec
from hyvideo.pipeline import GenerationRequest, ImageCondition
from hyvideo.step_cache import CacheState
from hyvideo.text_encoder import TextEmbeddings
from lowvram.memory import free_memory
from lowvram.parallel import Layout, SequenceParallel, require_yunchang
from lowvram.planner import Plan
from lowvram.stages import Stages

FINISH = "finish"
# Rank 0 may spend a long time alone (text encoding, building a quantized cache) while the others
# wait for its next message; a dead rank is noticed by the launcher, not by this timeout.
WAIT = datetime.timedelta(hours=2)


@dataclass
class DitJob:
    files: ModelFiles
    plan: Plan
    attention: str
    cache_dir: str | None
    loras: list[LoraSpec] = field(default_factory=list)


@dataclass
class ClipJob:
    request: GenerationRequest
    embeddings: TextEmbeddings
    latents: torch.Tensor  # [1, C, T, H, W] float32, the state after `step` steps
    step: int
    cache_state: CacheState | None
    image: ImageCondition | None = None  # image-to-video: the conditioning image's latent (None: text-to-video)


class Ranks:
    """This process's place in the run's process group, and the messages between the ranks."""

    def __init__(self, env: dict[str, int], layout: Layout, device: torch.device, control, ulysses_group, ring_group,
                 free_vram: int | None):
        self.rank, self.world = env["RANK"], env["WORLD_SIZE"]
        self.local_rank, self.local_world = env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]
        self.layout, self.device = layout, device
        self.control = control  # a gloo group: messages between the ranks are CPU objects
        self.ulysses_group, self.ring_group = ulysses_group, ring_group
        self.free_vram = free_vram  # the least free VRAM of any rank (what each rank's plan must fit); None on CPUs
        self.finished = False

    @property
    def leads(self) -> bool:
        return self.rank == 0

    def sequence_parallel(self, patch: tuple[int, int, int]) -> SequenceParallel:
        return SequenceParallel(self.layout, self.rank, patch, self.ulysses_group, self.ring_group)

    def send(self, message) -> None:
        """Rank 0: `message` to every follower."""
        dist.broadcast_object_list([message], src=0, group=self.control)

    def receive(self):
        """A follower: rank 0's next message."""
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def agree_to_stop(self, stop: bool) -> bool:
        """After each step: rank 0's answer to "stop now?" on every rank."""
        flag = torch.tensor([int(stop)])
        dist.broadcast(flag, src=0, group=self.control)
        return bool(flag.item())

    def finish(self) -> None:
        """Rank 0: denoising is over; the followers free their GPU and exit (sent once)."""
        if self.leads and not self.finished:
            self.finished = True
            try:
                self.send(FINISH)
            except RuntimeError:  # a follower has ended: the launcher stops the others, rank 0 reports why
                pass


_CURRENT: Ranks | None = None


def current_ranks() -> Ranks | None:
    """This process's Ranks when it is one of several (set by `join_ranks`), else None."""
    return _CURRENT


def rank_environment() -> dict[str, int] | None:
    """torchrun's variables if this process was started as one of several ranks (by `lowvram ...
    --gpus N` or by torchrun itself, also across machines), else None. Without LOCAL_* variables
    the ranks are taken to be on one machine."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    raw = {"RANK": os.environ["RANK"], "WORLD_SIZE": os.environ["WORLD_SIZE"],
           "LOCAL_RANK": os.environ.get("LOCAL_RANK", os.environ["RANK"]),
           "LOCAL_WORLD_SIZE": os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])}
    try:
        env = {name: int(value) for name, value in raw.items()}
    except ValueError:
        raise HyVideoError(f"torchrun's variables are not numbers: {raw}") from None
    return env if env["WORLD_SIZE"] > 1 else None


class RankZeroFailed(Exception):
    """A follower's view of rank 0 failing its checks before the ranks started (rank 0 says why)."""


def join_ranks(layout_for: Callable[[int], tuple[Layout, str]]) -> Ranks | None:
    """Join the run's process group when started as a rank (else None). Rank 0 calls
    `layout_for(world)` -> (layout, device), its checks of the run, and sends the answer (or its
    error) to the others, which need nothing of the run themselves (on other machines they may not
    see its folder). Each rank's device is its GPU (cuda:LOCAL_RANK) or the CPU (gloo); the
    Ulysses/ring groups are made here, by every rank in the same order."""
    global _CURRENT
    env = rank_environment()
    if env is None:
        return None
    require_yunchang()
    from yunchang.globals import PROCESS_GROUP, set_seq_parallel_pg

    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, rank=env["RANK"], world_size=env["WORLD_SIZE"], timeout=WAIT)
    control = dist.new_group(backend="gloo", timeout=WAIT)  # CPU messages, also when the GPUs talk NCCL
    answer: list = [None]
    if env["RANK"] == 0:
        try:
            answer = [layout_for(env["WORLD_SIZE"])]
        except HyVideoError as error:
            dist.broadcast_object_list([str(error)], src=0, group=control)
            dist.destroy_process_group()
            raise
    dist.broadcast_object_list(answer, src=0, group=control)
    if isinstance(answer[0], str):
        dist.destroy_process_group()
        raise RankZeroFailed(answer[0])
    layout, device = answer[0]
    if device.startswith("cuda"):
        torch.cuda.set_device(env["LOCAL_RANK"])
        place = torch.device("cuda", env["LOCAL_RANK"])
    else:
        place = torch.device("cpu")
    set_seq_parallel_pg(layout.ulysses, layout.ring, env["RANK"], env["WORLD_SIZE"])
    free = [None] * env["WORLD_SIZE"]
    mine = free_memory(place)[0]  # None on the CPU
    dist.all_gather_object(free, mine, group=control)
    ranks = Ranks(env, layout, place, control, PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG,
                  min(free) if mine is not None else None)
    _CURRENT = ranks
    return ranks


def leave_ranks() -> None:
    """Rank 0 tells the followers it is done (if it has not), then every rank leaves the group."""
    global _CURRENT
    if _CURRENT is None:
        return
    try:
        _CURRENT.finish()
    finally:
        _CURRENT = None
        dist.destroy_process_group()


class _Stopped(Exception):
    """Rank 0 stopped after this step (Ctrl-C); it sends FINISH next."""


def follow(ranks: Ranks) -> None:
    """A follower's life: place the DiT when told, denoise each clip rank 0 sends, until FINISH.
    Ctrl-C is rank 0's to handle (the terminal sends it to every rank): followers ignore it and
    stop with rank 0."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stages = model = streamer = None
    try:
        while (message := ranks.receive()) != FINISH:
            if isinstance(message, DitJob):
                stages = Stages(message.files, message.plan, ranks.device, message.attention, cache_dir=message.cache_dir,
                                loras=message.loras)
                model, streamer = stages.dit(ranks.sequence_parallel(message.plan.dit_config.patch_size))
            elif isinstance(message, ClipJob):
                _denoise_clip(ranks, stages, model, streamer, message)
    finally:
        if model is not None:
            stages.release_dit(model, streamer)


def _denoise_clip(ranks: Ranks, stages: Stages, model, streamer, job: ClipJob) -> None:
    cache = stages.step_cache(model, job.request, job.cache_state)

    def on_step(i: int, latents: torch.Tensor) -> None:
        if ranks.agree_to_stop(False):
            raise _Stopped

    try:
        stages.denoise(model, streamer, job.embeddings, job.latents, job.request, start_step=job.step, on_step=on_step, cache=cache,
                       image=job.image)
    except _Stopped:
        pass
