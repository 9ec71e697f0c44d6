"""Sequence parallelism: one clip's image tokens split across GPUs, attention across them, as xDiT's
Unified Sequence Parallelism (USP) does for HunyuanVideo.

    layout = choose_layout("usp", world=4, heads=24)   # Ulysses 4 x ring 1
    model.sequence_parallel = SequenceParallel(layout, rank, (1, 2, 2), ulysses_group, ring_group)
    # (the groups: lowvram/generation/ranks.py makes them with yunchang's set_seq_parallel_pg)

Each rank holds a slab of the latent grid (its token rows, or columns when the rows do not divide:
the official integration's rule) and every text token. Attention for a [image ; text] sequence:
1. Ulysses (degree u): an all-to-all turns each rank's [its image tokens ; text] x all heads into
   [the Ulysses group's image tokens ; u copies of the text] x H/u heads;
2. ring (degree r): the image keys and values travel around the ring group, each rank merging the
   partial results by their log-sum-exp; the text keys join as one more block, merged the same way;
   with r = 1 the keys are the Ulysses group's image keys plus the text's, one kernel call, any
   backend (sage, flash, SDPA);
3. the reverse all-to-all gives each rank its own tokens back, all heads.
u x r = the number of ranks; `choose_layout` takes as much Ulysses as the heads allow (u must divide
them), since its all-to-all moves less than a ring once there are more than two ranks.

Engine: yunchang (PyPI `yunchang`, the long-context attention library under xDiT; extra
`[multigpu]`): its process groups (`set_seq_parallel_pg`), all-to-all (`SeqAllToAll4D`), ring
(`ring_flash_attn_func`) and LSE merge (`update_out_and_lse`). What xfuser/yunchang do not serve:
- The text tokens. xfuser's `xFuserLongContextAttention` (what the official integration calls, text
  as "joint" tensors at the rear) exists only where CUDA is available (its base class is `object`
  otherwise), needs xfuser's own distributed state, and importing xfuser imports its diffusers
  pipelines. The joint step is therefore done here, as xfuser does it (text queries appended to
  each rank's queries, text keys/values sliced to the rank's Ulysses heads); with a ring the text
  block is merged after yunchang's ring instead of inside its loop, which has no joint tensors.
- The ring's per-block kernel on the CPU: yunchang's LSE-returning kernels are CUDA ones, so ours
  (hyvideo.attention.attention_with_lse) goes in through yunchang's `attn_processor` hook, on every
  device, so that the path tested on the CPU is the one that runs on GPUs.
- The VAE: xDiT's distvae splits 2D image VAEs, not the causal 3D video VAE; rank 0 decodes, tiled.
"""

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from hyvideo.attention import attention, attention_with_lse
from hyvideo.errors import HyVideoError

MODES = ("usp", "ulysses", "ring")
EXTRA = "pip install 'hyvideo-lowvram[multigpu]'"


@dataclass(frozen=True)
class Layout:
    """How `world` ranks split a sequence: ulysses x ring = world."""

    world: int
    ulysses: int
    ring: int

    def __str__(self) -> str:
        return f"{self.world} ranks: Ulysses {self.ulysses} x ring {self.ring}"


def choose_layout(mode: str, world: int, heads: int) -> Layout:
    """--parallel MODE on `world` ranks for a DiT with `heads` heads: ulysses (all Ulysses: the heads
    must divide), ring (all ring), usp (Ulysses as far as the heads divide, the rest ring)."""
    if mode not in MODES:
        raise HyVideoError(f"--parallel must be one of {', '.join(MODES)}, not {mode!r}")
    if world < 1:
        raise HyVideoError(f"--gpus must be at least 1, not {world}")
    if mode == "ring":
        return Layout(world, 1, world)
    if mode == "ulysses" and heads % world:
        raise HyVideoError(f"--parallel ulysses splits the DiT's {heads} attention heads across the ranks, and {heads} "
                           f"heads do not divide into {world}; use --parallel usp or ring, or --gpus "
                           + " or ".join(str(n) for n in range(2, min(heads, 8) + 1) if heads % n == 0))
    ulysses = math.gcd(world, heads)
    return Layout(world, ulysses, world // ulysses)


def split_axis(grid: tuple[int, int, int], world: int) -> int:
    """Which axis of the (t, h, w) token grid the ranks split: the rows (1) if they divide evenly,
    else the columns (2), as the official xDiT integration does."""
    _, rows, columns = grid
    if rows % world == 0:
        return 1
    if columns % world == 0:
        return 2
    fits = [n for n in range(2, 9) if rows % n == 0 or columns % n == 0]
    raise HyVideoError(f"the video's {rows}x{columns} token grid (latent height and width / 2) splits evenly into neither "
                       f"{world} rows nor columns; use --gpus {' or '.join(map(str, fits))}, or another size")


def check_parallel(mode: str, world: int, heads: int, grid: tuple[int, int, int]) -> Layout:
    """Every check a parallel run needs before anything starts: one HyVideoError naming the fix."""
    layout = choose_layout(mode, world, heads)
    if world > 1:
        split_axis(grid, world)
    return layout


def require_yunchang():
    try:
        import yunchang
    except ImportError:
        raise HyVideoError(f"--gpus N needs yunchang (xDiT's sequence-parallel attention): {EXTRA}") from None
    return yunchang


class SequenceParallel:
    """This rank's share of every sequence, and attention across the ranks (the module docstring)."""

    def __init__(self, layout: Layout, rank: int, patch: tuple[int, int, int], ulysses_group, ring_group):
        self.layout, self.rank, self.patch = layout, rank, patch
        self.ulysses_group, self.ring_group = ulysses_group, ring_group

    # -- which tokens are this rank's

    def shard_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, T, H, W] -> this rank's slab of rows (or columns) [B, C, T, H/n, W]."""
        _, ph, pw = self.patch
        axis = split_axis((x.shape[2], x.shape[3] // ph, x.shape[4] // pw), self.layout.world)
        return x.chunk(self.layout.world, dim=2 + axis)[self.rank]

    def shard_tokens(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """All image tokens [B, N, ...] (t slowest, w fastest) -> this rank's [B, N/n, ...]."""
        axis = split_axis(grid, self.layout.world)
        spatial = tokens.reshape(tokens.shape[0], *grid, *tokens.shape[2:])  # [B, t, h, w, ...]
        return spatial.chunk(self.layout.world, dim=1 + axis)[self.rank].reshape(tokens.shape[0], -1, *tokens.shape[2:])

    def gather_tokens(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """This rank's image tokens [B, N/n, ...] -> all of them [B, N, ...], on every rank."""
        axis, world = split_axis(grid, self.layout.world), self.layout.world
        t, h, w = grid
        local = (t, h // world, w) if axis == 1 else (t, h, w // world)
        spatial = tokens.reshape(tokens.shape[0], *local, *tokens.shape[2:]).contiguous()
        parts = [torch.empty_like(spatial) for _ in range(world)]
        dist.all_gather(parts, spatial)
        return torch.cat(parts, dim=1 + axis).reshape(tokens.shape[0], t * h * w, *tokens.shape[2:])

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        summed = tensor.clone()
        dist.all_reduce(summed)
        return summed

    # -- attention across the ranks

    def attention(self, qkv: list, image_tokens: int, backend: str) -> torch.Tensor:
        """Joint attention of this rank's [image ; text] qkv = [q, k, v] [B, n + L, H, D] over every
        rank's image tokens and the text -> [B, n + L, H*D] for this rank's tokens. Empties `qkv`:
        each tensor is freed once its all-to-all has sent it (with u = 1 the all-to-all returns
        views: they live on as the ring's inputs); the text's keys/values are copied first."""
        from yunchang.comm.all_to_all import SeqAllToAll4D

        heads, u = qkv[0].shape[2], self.layout.ulysses
        head_rank = dist.get_rank(self.ulysses_group)
        mine = slice(head_rank * heads // u, (head_rank + 1) * heads // u)  # this rank's heads after the all-to-all
        text_k, text_v = (t[:, image_tokens:, mine].clone() for t in qkv[1:])  # [B, L, H/u, D]

        def gather(t):  # [B, n (+ L), H, D] -> [B, u n (+ u L), H/u, D]: the Ulysses group's tokens, this rank's heads
            return SeqAllToAll4D.apply(self.ulysses_group, t, 2, 1)

        q_all = gather(qkv.pop(0))
        k_all = gather(qkv.pop(0)[:, :image_tokens])
        if self.layout.ring == 1:  # k joined to the text's before v is gathered: one pair of copies at a time
            k_all = torch.cat([k_all, text_k], dim=1)
            v_all = torch.cat([gather(qkv.pop(0)[:, :image_tokens]), text_v], dim=1)
            out = attention(q_all, k_all, v_all, None, backend).unflatten(-1, (heads // u, -1))
        else:
            v_all = gather(qkv.pop(0)[:, :image_tokens])
            out = self._ring(q_all, k_all, v_all, text_k, text_v, backend)
        del q_all, k_all, v_all, text_k, text_v
        return SeqAllToAll4D.apply(self.ulysses_group, out, 1, 2).flatten(2)  # [B, n + L, H*D]

    def _ring(self, q, k, v, text_k, text_v, backend: str) -> torch.Tensor:
        """Ring attention over the image keys (yunchang), then the text keys' block merged in by LSE."""
        from yunchang.ring.ring_flash_attn import ring_flash_attn_func
        from yunchang.ring.utils import update_out_and_lse

        kernel = partial(_block_kernel, backend=backend)
        out, lse, _ = ring_flash_attn_func(q, k, v, softmax_scale=q.shape[-1] ** -0.5, return_attn_probs=True,
                                           group=self.ring_group, attn_type=None, attn_processor=kernel)
        text_out, text_lse = attention_with_lse(q, text_k, text_v, backend)
        merged, _ = update_out_and_lse(out.float(), lse.transpose(1, 2).unsqueeze(-1), text_out, text_lse)
        return merged.to(q.dtype)  # [B, S, H/u, D]


def _block_kernel(q, k, v, *, backend: str, **flash_kwargs):
    """One ring step's attention in yunchang's kernel signature (flash-attn's arguments, none of
    which apply here: no dropout, not causal, default scale)."""
    return attention_with_lse(q, k, v, backend)
