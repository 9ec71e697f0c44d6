"""Text token refiner `txt_in` (`SingleTokenRefiner`, facts §1.4).

Turns the LLM's [B, L, 4096] states into the DiT's text stream [B, L, hidden], conditioned on the
timestep and on the masked mean of the raw LLM states. Two small self-attention blocks with gates
only (no shift/scale), affine LayerNorms and SiLU MLPs.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .embeddings import TimestepEmbedder


def refiner_attention_mask(text_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] mask -> [B, 1, L, L] bool: allowed(i, j) = valid_i and valid_j, with column 0 always
    allowed so padded query rows attend to something (no NaN)."""
    valid = text_mask.bool()
    allowed = valid[:, None, :, None] & valid[:, None, None, :]
    allowed[..., 0] = True
    return allowed


class TextContextEmbedder(nn.Module):
    """Masked-mean LLM state -> hidden (`c_embedder`): Linear -> SiLU -> Linear."""

    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden_size)
        self.act_1 = nn.SiLU()
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(x)))


class RefinerMLP(nn.Module):
    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class RefinerBlock(nn.Module):
    """`IndividualTokenRefinerBlock`: gated self-attention and gated MLP, no qk-norm, no RoPE."""

    def __init__(self, hidden_size: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.self_attn_qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.self_attn_proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = RefinerMLP(hidden_size, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        gate_msa, gate_mlp = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)  # each [B, 1, D]
        q, k, v = self.self_attn_qkv(self.norm1(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # [B, H, L, Dh]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).flatten(2)
        x = x + gate_msa * self.self_attn_proj(attn)
        return x + gate_mlp * self.mlp(self.norm2(x))


class IndividualTokenRefiner(nn.Module):
    def __init__(self, hidden_size: int, heads: int, mlp_hidden: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList([RefinerBlock(hidden_size, heads, mlp_hidden) for _ in range(depth)])

    def forward(self, x, c, attn_mask):
        for block in self.blocks:
            x = block(x, c, attn_mask)
        return x


class TokenRefiner(nn.Module):
    """`txt_in`: input_embedder + t_embedder + c_embedder + refiner blocks."""

    def __init__(self, in_dim: int, hidden_size: int, heads: int, depth: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.input_embedder = nn.Linear(in_dim, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.c_embedder = TextContextEmbedder(in_dim, hidden_size)
        self.individual_token_refiner = IndividualTokenRefiner(hidden_size, heads, int(hidden_size * mlp_ratio), depth)

    def forward(self, text_states: torch.Tensor, t: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        """text_states [B, L, in_dim], t [B], text_mask [B, L] or None (all valid) -> [B, L, hidden]."""
        dtype = text_states.dtype
        if text_mask is None:
            pooled = text_states.float().mean(dim=1)
            attn_mask = None
        else:
            mask = text_mask.float().unsqueeze(-1)  # [B, L, 1]
            pooled = (text_states.float() * mask).sum(dim=1) / mask.sum(dim=1)
            attn_mask = refiner_attention_mask(text_mask)
        c = self.t_embedder(t, dtype) + self.c_embedder(pooled.to(dtype))  # [B, hidden]
        x = self.input_embedder(text_states)
        return self.individual_token_refiner(x, c, attn_mask)
