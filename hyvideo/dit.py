"""HunyuanVideo diffusion transformer `HYVideoDiffusionTransformer` (facts §1).

Module names equal the official checkpoint's keys (856 tensors for the 13B config), so official
state dicts load with `strict=True`. The forward reads like facts §1.2:
  vec = time_in(t) + vector_in(clip) + guidance_in(g)
  img = img_in(x); txt = txt_in(llm states, t, mask)
  20 double blocks on (img, txt); 40 single blocks on [img ; txt]; final layer on img; unpatchify.

Image-to-video (config.image_condition_type): `latent_concat` only widens img_in (the caller
concatenates noisy latents | image latent | mask); `token_replace` modulates the first latent
frame's tokens from `first_frame_conditioning` (t = 0) inside every block (see blocks.py); the final
layer uses vec for all tokens, as the official model and diffusers do.

`blocks` lets a caller supply the 60 blocks in order (e.g. streamed onto the GPU just in time by
lowvram/); by default the model's own blocks run.

Sequence parallelism (`sequence_parallel`, set by lowvram/parallel.py): every process runs this
forward on the full latents but embeds, transforms and projects only its share of the image tokens
(a slab of the latent height or width, as the official xDiT integration splits them); every
process holds all text tokens; attention runs across the processes; the final layer's output is
gathered, so each process returns the full velocity. The object offers shard_latents(x),
shard_tokens(tokens, grid), gather_tokens(tokens, grid), attention(q, k, v, image_tokens,
backend) and all_sum(tensor).
"""

from collections.abc import Iterable

import torch
import torch.nn as nn

from .attention import check_backend
from .blocks import DoubleStreamBlock, FinalLayer, JointAttentionInputs, SingleStreamBlock
from .config import DiTConfig
from .embeddings import MLPEmbedder, PatchEmbed, TimestepEmbedder
from .rope import rope_frequencies
from .token_refiner import TokenRefiner


class ImageTokenShards:
    """The image tokens' way in and out of a DiT, under sequence parallelism this process's share
    of them (module docstring): both HunyuanVideo DiTs (this one and hyvideo/v15_dit.py) mix it in.
    Needs `sequence_parallel` (None: one process holds all tokens), `config`, `img_in`,
    `final_layer` and `token_chunk`."""

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activations run in the dtype of the (never quantized) patch embedding."""
        return self.img_in.proj.weight.dtype

    def embed_image(self, x: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, T, h, w] -> image tokens [B, N_img, D] (this process's share of them)."""
        if self.sequence_parallel is not None:
            x = self.sequence_parallel.shard_latents(x)
        return self.img_in(x.to(self.compute_dtype))

    def shard_image_tokens(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """All image tokens [B, N_img, ...] of latents `x` -> this process's share (all without
        sequence parallelism)."""
        if self.sequence_parallel is None:
            return tokens
        return self.sequence_parallel.shard_tokens(tokens, token_grid(x.shape[2:], self.config.patch_size))

    def gather_image_tokens(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """This process's share of the image tokens of latents `x` -> all of them, on every process."""
        if self.sequence_parallel is None:
            return tokens
        return self.sequence_parallel.gather_tokens(tokens, token_grid(x.shape[2:], self.config.patch_size))

    def head(self, img: torch.Tensor, vec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Image tokens after the blocks -> velocity shaped like the latents `x`."""
        out = self.final_layer(img, vec, self.token_chunk)  # [B, N_img, pt*ph*pw*C]
        out = self.gather_image_tokens(out, x)
        return unpatchify(out, token_grid(x.shape[2:], self.config.patch_size), self.config.patch_size, self.config.out_channels)


class HunyuanVideoDiT(ImageTokenShards, nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        hidden, heads, mlp_hidden = config.hidden_size, config.heads, config.mlp_hidden
        self.img_in = PatchEmbed(config.patch_size, config.in_channels, hidden)
        self.txt_in = TokenRefiner(config.text_states_dim, hidden, heads, config.refiner_blocks, config.mlp_ratio)
        self.time_in = TimestepEmbedder(hidden)
        self.vector_in = MLPEmbedder(config.text_states_dim_2, hidden)
        self.guidance_in = TimestepEmbedder(hidden) if config.guidance_embed else None
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(hidden, heads, mlp_hidden) for _ in range(config.double_blocks)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(hidden, heads, mlp_hidden) for _ in range(config.single_blocks)])
        pt, ph, pw = config.patch_size
        self.final_layer = FinalLayer(hidden, pt * ph * pw * config.out_channels)
        self.attention_backend = "sdpa"
        self.token_chunk: int | None = None  # per-token work in chunks of this many tokens (None: whole sequence)
        self.sequence_parallel = None  # this process's share of the image tokens (module docstring)

    def all_blocks(self) -> list[nn.Module]:
        return [*self.double_blocks, *self.single_blocks]

    def forward(
        self,
        x: torch.Tensor,  # [B, C, T, h, w] latents
        t: torch.Tensor,  # [B] flow timesteps (sigma * 1000)
        text_states: torch.Tensor,  # [B, L, text_states_dim]
        text_mask: torch.Tensor,  # [B, L], 1 = valid, right padded
        text_states_2: torch.Tensor,  # [B, text_states_dim_2] CLIP pooled
        guidance: torch.Tensor | None = None,  # [B] embedded guidance * 1000
        blocks: Iterable[nn.Module] | None = None,
        riflex: bool = False,  # lower the temporal RoPE's intrinsic frequency for a long clip (hyvideo/rope.py)
    ) -> torch.Tensor:
        vec = self.conditioning(t, text_states_2, guidance)
        first_frame_vec = self.first_frame_conditioning(t, text_states_2)
        img = self.transform(x, vec, t, text_states, text_mask, blocks, first_frame_vec, riflex)
        return self.head(img, vec, x)

    def conditioning(self, t: torch.Tensor, text_states_2: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        """vec [B, D] = time_in(t) + vector_in(CLIP pooled) + guidance_in(g): what modulates every block."""
        dtype = self.compute_dtype
        vec = self.time_in(t, dtype) + self.vector_in(text_states_2.to(dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this DiT embeds guidance: pass guidance = embedded_guidance_scale * 1000")
            vec = vec + self.guidance_in(guidance, dtype)
        return vec

    def first_frame_conditioning(self, t: torch.Tensor, text_states_2: torch.Tensor) -> torch.Tensor | None:
        """token_replace: [B, D] = time_in(0) + vector_in(CLIP pooled), the vector that modulates the
        first latent frame's tokens (it holds the clean image latent); no guidance term, as official
        and diffusers. None for the other DiTs."""
        if self.config.image_condition_type != "token_replace":
            return None
        dtype = self.compute_dtype
        return self.time_in(torch.zeros_like(t), dtype) + self.vector_in(text_states_2.to(dtype))

    def transform(self, x, vec, t, text_states, text_mask, blocks=None, first_frame_vec=None,
                  riflex: bool = False) -> torch.Tensor:
        """Latents [B, C, T, h, w] -> image tokens [B, N_img, D] after the 60 blocks. The text tokens
        (refined from the LLM states) take part and are dropped at the end. The image tokens are
        embedded here, not passed in, so that no caller holds them while the blocks run (they are
        updated in place, then replaced by the joint sequence). `first_frame_vec`: what
        `first_frame_conditioning` gave (needed by a token_replace DiT, None otherwise)."""
        check_backend(self.attention_backend)
        if (first_frame_vec is None) != (self.config.image_condition_type != "token_replace"):
            raise ValueError("first_frame_vec is needed by a token_replace DiT and only by it")
        img = self.embed_image(x)  # [B, N_img, D]
        grid = token_grid(x.shape[2:], self.config.patch_size)
        if img.shape[0] == 1:
            # Drop padded text tokens: valid tokens never attend to them, so results are unchanged
            # and attention needs no mask (SDPA can use its flash kernel).
            valid = int(text_mask[0].sum())
            text_states, text_mask = text_states[:, :valid], None
        txt = self.txt_in(text_states.to(self.compute_dtype), t, text_mask)  # [B, L, D]

        cos, sin = rope_frequencies(grid, self.config.rope_axes_dim, self.config.rope_theta, img.device, riflex)
        cos, sin = (self.shard_image_tokens(table[None], x)[0] for table in (cos, sin))  # [N_img, head_dim]
        key_mask = None
        if text_mask is not None and self.sequence_parallel is not None:
            raise ValueError("sequence parallelism runs batch 1 (its attention takes no text mask)")
        if text_mask is not None:
            key_mask = torch.cat([torch.ones_like(text_mask[:, :1]).expand(-1, img.shape[1]), text_mask], dim=1).bool()
        n_img = img.shape[1]
        # The first latent frame's tokens lead the (t, y, x) order; with sequence parallelism each
        # process holds a slab of every frame, so its first-frame share is its tokens / T.
        inputs = JointAttentionInputs(cos, sin, key_mask, self.attention_backend, self.token_chunk, self.sequence_parallel,
                                      first_frame_vec, first_frame_tokens=n_img // grid[0])

        joint = None
        for block in self.all_blocks() if blocks is None else blocks:
            if isinstance(block, DoubleStreamBlock):
                img, txt = block(img, txt, vec, inputs)
            else:
                if joint is None:
                    joint = torch.cat([img, txt], dim=1)  # image first, then text
                    del img, txt
                joint = block(joint, vec, inputs)
        return img if joint is None else joint[:, :n_img]

def token_grid(latent_size: "tuple[int, int, int] | torch.Size", patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """Latent (frames, height, width), e.g. `x.shape[2:]` of [B, C, T, H, W] latents -> the (t, h, w)
    grid of image tokens."""
    (pt, ph, pw), (frames, height, width) = patch, latent_size
    return frames // pt, height // ph, width // pw


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int], channels: int) -> torch.Tensor:
    """[B, N, C*pt*ph*pw] -> [B, C, T*pt, H*ph, W*pw]; within a token the channel index is slowest."""
    (t, h, w), (pt, ph, pw) = grid, patch
    x = tokens.reshape(tokens.shape[0], t, h, w, channels, pt, ph, pw)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # [B, C, t, pt, h, ph, w, pw]
    return x.reshape(tokens.shape[0], channels, t * pt, h * ph, w * pw)
