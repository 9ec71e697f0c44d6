"""HunyuanVideo-1.5 diffusion transformer (8.3B), plain PyTorch.

The forward reads like the official `HunyuanVideo_1_5_DiffusionTransformer.forward`:
  vec = time_in(t) [+ time_r_in(t_r)]
  img = img_in([latents ; condition latents ; condition mask])
  txt = [vision_in(SigLIP) ; byt5_in(byT5) ; txt_in(Qwen2.5-VL states, t)], each + its cond_type_embedding
  54 double-stream blocks on (img, txt); final layer on img; unpatchify.

The blocks are the 13B model's `DoubleStreamBlock` (same math: AdaLN-zero with 6 modulations per
stream, qk-RMSNorm, RoPE on image tokens only, joint attention, tanh-GELU MLP), so token chunking,
weight holding and quantized layers work unchanged. Module names equal the official checkpoint's
keys except that the official checkpoint stores each block's q, k, v projections apart
(`img_attn_q`, `img_attn_k`, `img_attn_v`), which `v15_keys.official_to_ours` concatenates into one
`img_attn_qkv` (one GEMM instead of three).

Text tokens: the official model reorders each prompt's tokens as [valid ; padding] and masks the
padding; padded keys never reach a valid token, so here padding is dropped at batch 1 (no mask: the
fast attention kernels apply) and kept last under a key mask otherwise. Text-to-video passes no
SigLIP states (officially: all-zero states, masked out and multiplied by zero, the same model).

Attention is dense. The official SSTA sparse attention (`flex-block-attn`, H-series GPUs) is an
approximation the `*_sparse` checkpoints were tuned for; dense attention computes the exact
function those blocks approximate, so any 1.5 checkpoint runs here with it.

`blocks` lets a caller supply the 54 blocks in order (e.g. streamed onto the GPU by lowvram/).
Sequence parallelism (`sequence_parallel`) works as for the 13B model (hyvideo/dit.py): each
process embeds and transforms its slab of the image tokens with every text token.
"""

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import check_backend
from .blocks import DoubleStreamBlock, FinalLayer, JointAttentionInputs
from .dit import ImageTokenShards, token_grid
from .embeddings import PatchEmbed, TimestepEmbedder
from .rope import rope_frequencies
from .token_refiner import TokenRefiner
from .v15_config import V15DiTConfig

# cond_type_embedding rows: which encoder a text-stream token came from.
QWEN, BYT5, SIGLIP = 0, 1, 2


class ByT5Mapper(nn.Module):
    """`byt5_in`: byT5 glyph states -> hidden. LayerNorm, fc1, GELU, fc2, GELU, fc3 (no residual)."""

    def __init__(self, in_dim: int, inner_dim: int, hidden_size: int):
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, inner_dim)
        self.fc2 = nn.Linear(inner_dim, inner_dim)
        self.fc3 = nn.Linear(inner_dim, hidden_size)
        self.act_fn = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act_fn(self.fc2(self.act_fn(self.fc1(self.layernorm(x))))))


class VisionProjection(nn.Module):
    """`vision_in`: SigLIP states -> hidden. proj = LayerNorm, Linear, GELU, Linear, LayerNorm."""

    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, hidden_size), nn.LayerNorm(hidden_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class HunyuanVideo15DiT(ImageTokenShards, nn.Module):
    def __init__(self, config: V15DiTConfig):
        super().__init__()
        self.config = config
        hidden, heads = config.hidden_size, config.heads
        self.img_in = PatchEmbed(config.patch_size, config.in_channels, hidden)
        self.txt_in = TokenRefiner(config.text_states_dim, hidden, heads, config.refiner_blocks, config.mlp_ratio)
        self.byt5_in = ByT5Mapper(config.byt5_states_dim, config.byt5_hidden, hidden)
        self.vision_in = VisionProjection(config.vision_states_dim, hidden)
        self.time_in = TimestepEmbedder(hidden)
        self.time_r_in = TimestepEmbedder(hidden) if config.use_meanflow else None
        self.cond_type_embedding = nn.Embedding(3, hidden)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(hidden, heads, config.mlp_hidden) for _ in range(config.double_blocks)])
        pt, ph, pw = config.patch_size
        self.final_layer = FinalLayer(hidden, pt * ph * pw * config.out_channels)
        self.attention_backend = "sdpa"
        self.token_chunk: int | None = None  # per-token work in chunks of this many tokens (None: whole sequence)
        self.sequence_parallel = None  # this process's share of the image tokens (hyvideo/dit.py)

    def all_blocks(self) -> list[nn.Module]:
        return list(self.double_blocks)

    def forward(
        self,
        x: torch.Tensor,  # [B, 2C+1, T, h, w]: noisy latents ; condition latents ; condition mask
        t: torch.Tensor,  # [B] flow timesteps (sigma * 1000)
        text_states: torch.Tensor,  # [B, L, text_states_dim] Qwen2.5-VL hidden states
        text_mask: torch.Tensor,  # [B, L], 1 = valid
        byt5_states: torch.Tensor,  # [B, Lb, byt5_states_dim]
        byt5_mask: torch.Tensor,  # [B, Lb], 1 = valid
        vision_states: torch.Tensor | None = None,  # [B, Lv, vision_states_dim] SigLIP (image-to-video only)
        timestep_r: torch.Tensor | None = None,  # [B] MeanFlow's second timestep (use_meanflow checkpoints)
        blocks: Iterable[nn.Module] | None = None,
    ) -> torch.Tensor:
        """Velocity [B, C, T, h, w] for the noisy latents."""
        vec = self.conditioning(t, timestep_r)
        txt, txt_mask = self.text_tokens(t, text_states, text_mask, byt5_states, byt5_mask, vision_states)
        img = self.transform(x, vec, txt, txt_mask, blocks)
        return self.head(img, vec, x)

    def conditioning(self, t: torch.Tensor, timestep_r: torch.Tensor | None) -> torch.Tensor:
        """vec [B, D]: what modulates every block."""
        vec = self.time_in(t, self.compute_dtype)
        if (timestep_r is None) != (self.time_r_in is None):
            raise ValueError("timestep_r goes with use_meanflow checkpoints (and only with them)")
        if timestep_r is not None:
            vec = vec + self.time_r_in(timestep_r, self.compute_dtype)
        return vec

    def text_tokens(self, t, text_states, text_mask, byt5_states, byt5_mask, vision_states):
        """The text stream [B, L, D] with the valid tokens of [SigLIP ; byT5 ; Qwen] first in each
        row, and its mask [B, L] bool (None when no row has padding: batch 1 drops it)."""
        dtype, batch = self.compute_dtype, text_states.shape[0]
        text_mask, byt5_mask = text_mask.bool(), byt5_mask.bool()
        if batch == 1:
            text_states, byt5_states = text_states[:, text_mask[0]], byt5_states[:, byt5_mask[0]]
            text_mask = byt5_mask = None
        kinds = self.cond_type_embedding.weight  # [3, D]
        parts = [
            (self.byt5_in(byt5_states.to(dtype)) + kinds[BYT5], byt5_mask),
            (self.txt_in(text_states.to(dtype), t, text_mask) + kinds[QWEN], text_mask),
        ]
        if vision_states is not None:
            parts.insert(0, (self.vision_in(vision_states.to(dtype)) + kinds[SIGLIP], None))
        if batch == 1:
            return torch.cat([tokens for tokens, _ in parts], dim=1), None
        rows = [torch.cat([tokens[i] if mask is None else tokens[i, mask[i]] for tokens, mask in parts]) for i in range(batch)]
        length = max(len(row) for row in rows)
        txt = torch.stack([F.pad(row, (0, 0, 0, length - len(row))) for row in rows])  # [B, L, D]
        positions = torch.arange(length, device=txt.device)
        return txt, torch.stack([positions < len(row) for row in rows])

    def transform(self, x, vec, txt, txt_mask, blocks=None, on_last_input=None) -> torch.Tensor:
        """Latents [B, 2C+1, T, h, w] -> image tokens [B, N_img, D] after the double blocks (this
        process's share of them under sequence parallelism, which runs batch 1: no text mask).
        on_last_input(img, txt): called with the last block's input (DeepCache keeps it)."""
        img = self.embed_image(x)  # [B, N_img, D]
        inputs = self.attention_inputs(x, img, txt_mask)
        last = self.config.double_blocks - 1
        for index, block in enumerate(self.double_blocks if blocks is None else blocks):
            if index == last and on_last_input is not None:
                on_last_input(img, txt)
            img, txt = block(img, txt, vec, inputs)
        return img

    def transform_last(self, x, vec, img, txt, block) -> torch.Tensor:
        """DeepCache's cached step (hyvideo/v15_step_cache.py): the last double `block` alone, on
        the image and text tokens [1, N, D], [1, L, D] it had at the last computed step."""
        img, _ = block(img, txt, vec, self.attention_inputs(x, img, None))
        return img

    def attention_inputs(self, x, img, txt_mask) -> JointAttentionInputs:
        """RoPE for this process's image tokens `img` of latents `x`, the key mask, backend, chunk."""
        check_backend(self.attention_backend)
        if txt_mask is not None and self.sequence_parallel is not None:
            raise ValueError("sequence parallelism runs batch 1 (its attention takes no text mask)")
        grid = token_grid(x.shape[2:], self.config.patch_size)
        cos, sin = rope_frequencies(grid, self.config.rope_axes_dim, self.config.rope_theta, device=img.device)
        cos, sin = (self.shard_image_tokens(table[None], x)[0] for table in (cos, sin))  # [N_img, head_dim]
        key_mask = None
        if txt_mask is not None:
            key_mask = torch.cat([torch.ones_like(txt_mask[:, :1]).expand(-1, img.shape[1]), txt_mask], dim=1)
        return JointAttentionInputs(cos, sin, key_mask, self.attention_backend, self.token_chunk, self.sequence_parallel)
