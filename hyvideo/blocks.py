"""DiT blocks: double-stream (facts §1.8), single-stream (§1.9) and the final layer (§1.10).

Per-token work (norm + modulate, QKV, projections, MLP) runs over the sequence in chunks of
`chunk` tokens, so the widest activation (a single block's 12288-wide MLP input) exists for one
chunk only; residuals are updated in place. Attention always sees the whole sequence. `chunk=None`
means one chunk. Chunking changes no math: each token's result is computed by the same ops.
Each chunk loop runs one layer (or one MLP pair) over all chunks inside `held_weights`, so a layer
that rebuilds its weight per call (a dequantizing FP8 linear) rebuilds it once per block, not once
per chunk.

Image-to-video `token_replace` (official `modulate`/`apply_gate` with `condition_type`): the first
latent frame's image tokens (the first `first_frame_tokens` of the image stream, and so of the
joint sequence) take shift/scale/gate from the block's own modulation layer applied to a second
vector (`first_frame_vec`: the timestep embedding at t = 0 plus the CLIP vector). Text tokens and the
final layer keep the ordinary modulation. No chunk straddles the first frame's last token, so each
chunk has one set of modulation values.
"""

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .rope import apply_rope


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Affine-free LayerNorm (eps 1e-6) then modulate, in float32 (as bf16 autocast does
    officially), returned in x's dtype."""
    normed = F.layer_norm(x.float(), x.shape[-1:], eps=1e-6)
    return modulate(normed, shift.float(), scale.float()).to(x.dtype)


def linear_rows(layer: nn.Module, x: torch.Tensor, rows: slice) -> torch.Tensor:
    """Output features `rows` of a linear layer, without computing the others where possible.

    Plain nn.Linear slices its weight; a quantized layer may offer `forward_rows(x, rows)`;
    anything else computes all outputs and slices.
    """
    if type(layer) is nn.Linear:
        bias = None if layer.bias is None else layer.bias[rows]
        return F.linear(x, layer.weight[rows], bias)
    if hasattr(layer, "forward_rows"):
        return layer.forward_rows(x, rows)
    return layer(x)[..., rows]


@contextmanager
def held_weights(*layers: nn.Module):
    """Layers offering `hold_weight()` / `release_weight()` keep the weight they build on the first
    call until the scope ends; plain nn.Linear has nothing to hold."""
    held = [layer for layer in layers if hasattr(layer, "hold_weight")]
    for layer in held:
        layer.hold_weight()
    try:
        yield
    finally:
        for layer in held:
            layer.release_weight()


def token_chunks(length: int, chunk: int | None):
    """Slices covering [0, length) in steps of `chunk` (one slice if chunk is None)."""
    step = length if not chunk else chunk
    return [slice(start, min(start + step, length)) for start in range(0, length, step)]


def modulated_chunks(length: int, chunk: int | None, mods, first_mods=None, first_tokens: int = 0):
    """(rows, modulation values) covering [0, length) in chunks of at most `chunk` tokens.

    Without `first_mods` these are `token_chunks` with `mods` each. With them (token_replace), rows
    below `first_tokens` take `first_mods` and the rest `mods`, and no chunk crosses that boundary.
    """
    if first_mods is None:
        return [(rows, mods) for rows in token_chunks(length, chunk)]
    first = min(first_tokens, length)
    pairs = [(rows, first_mods) for rows in token_chunks(first, chunk)]
    if length > first:
        pairs += [(slice(first + r.start, first + r.stop), mods) for r in token_chunks(length - first, chunk)]
    return pairs


class RMSNorm(nn.Module):
    """RMSNorm over head_dim, eps 1e-6, computed in float32, then times the learned weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return normed * self.weight


class Modulation(nn.Module):
    """`ModulateDiT`: Linear(SiLU(vec)) -> `factor` chunks of [B, 1, D]."""

    def __init__(self, hidden_size: int, factor: int):
        super().__init__()
        self.factor = factor
        self.act = nn.SiLU()
        self.linear = nn.Linear(hidden_size, factor * hidden_size)

    def forward(self, vec: torch.Tensor) -> list[torch.Tensor]:
        return self.linear(self.act(vec)).unsqueeze(1).chunk(self.factor, dim=-1)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class JointAttentionInputs:
    """What every block needs besides its tokens and vec: RoPE tables for the image tokens, the
    text key mask (None when padding was dropped), the backend, the token chunk, with sequence
    parallelism the object that runs attention across processes (see dit.py), and under
    token_replace the first frame's modulation vector and its token count (this process's share)."""

    def __init__(self, cos, sin, key_mask, backend: str = "sdpa", chunk: int | None = None, sequence_parallel=None,
                 first_frame_vec: torch.Tensor | None = None, first_frame_tokens: int = 0):
        self.cos, self.sin = cos, sin  # [N_img, head_dim] float32 (this process's image tokens)
        self.key_mask = key_mask  # [B, N_img + L_txt] bool or None
        self.backend = backend
        self.chunk = chunk
        self.sequence_parallel = sequence_parallel
        self.first_frame_vec = first_frame_vec  # [B, D] or None (no token_replace)
        self.first_frame_tokens = first_frame_tokens

    def image_chunks(self, length: int, modulation: nn.Module, vec: torch.Tensor):
        """`modulated_chunks` of an image (or joint) sequence for one modulation layer: its values
        from `vec`, and under token_replace from `first_frame_vec` for the first frame's tokens."""
        first = None if self.first_frame_vec is None else modulation(self.first_frame_vec)
        return modulated_chunks(length, self.chunk, modulation(vec), first, self.first_frame_tokens)

    @property
    def image_tokens(self) -> int:
        return self.cos.shape[0]

    def attend(self, qkv: list) -> torch.Tensor:
        """Joint attention of [image ; text] q, k, v [B, S, H, D] -> [B, S, H*D]. Takes the list's
        tensors (it empties it), so that the cross-rank attention can free each as soon as its
        all-to-all has sent it; on one GPU they live until the kernel returns, as before."""
        if self.sequence_parallel is not None:
            return self.sequence_parallel.attention(qkv, self.image_tokens, self.backend)
        q, k, v = qkv
        qkv.clear()
        return attention(q, k, v, self.key_mask, self.backend)


def project_qkv(x, chunks, qkv_layer, q_norm, k_norm, heads, qkv, offset, inputs, rotate_until):
    """Chunked norm-modulate -> QKV -> qk-RMSNorm -> RoPE, written into qkv = [q, k, v] [B, S, H, D]
    at positions offset + chunk. `chunks`: (rows, modulation values) pairs, shift and scale first.
    Tokens at joint positions < rotate_until get RoPE."""
    q, k, v = qkv
    width = q.shape[-1] * heads
    for rows, (shift, scale, *_) in chunks:
        fused = linear_rows(qkv_layer, norm_modulate(x[:, rows], shift, scale), slice(0, 3 * width))
        cq, ck, cv = fused.unflatten(-1, (3, heads, -1)).unbind(2)  # each [B, c, H, D]
        cq, ck = q_norm(cq).to(cv.dtype), k_norm(ck).to(cv.dtype)
        start, stop = offset + rows.start, offset + rows.stop
        if start < rotate_until:
            end = min(stop, rotate_until)
            n = end - start
            cq[:, :n] = apply_rope(cq[:, :n], inputs.cos[start:end], inputs.sin[start:end])
            ck[:, :n] = apply_rope(ck[:, :n], inputs.cos[start:end], inputs.sin[start:end])
        q[:, start:stop], k[:, start:stop], v[:, start:stop] = cq, ck, cv


def empty_qkv(batch: int, seq: int, heads: int, head_dim: int, like: torch.Tensor):
    return [torch.empty(batch, seq, heads, head_dim, dtype=like.dtype, device=like.device) for _ in range(3)]


class DoubleStreamBlock(nn.Module):
    """`MMDoubleStreamBlock`: image and text keep separate weights, attend jointly."""

    def __init__(self, hidden_size: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.heads = heads
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", Modulation(hidden_size, 6))
            setattr(self, f"{stream}_attn_qkv", nn.Linear(hidden_size, 3 * hidden_size))
            setattr(self, f"{stream}_attn_q_norm", RMSNorm(hidden_size // heads))
            setattr(self, f"{stream}_attn_k_norm", RMSNorm(hidden_size // heads))
            setattr(self, f"{stream}_attn_proj", nn.Linear(hidden_size, hidden_size))
            setattr(self, f"{stream}_mlp", MLP(hidden_size, mlp_hidden))

    def forward(self, img, txt, vec, inputs: JointAttentionInputs):
        """img [B, N, D], txt [B, L, D], vec [B, D] -> updated (img, txt); img/txt are updated in place."""
        n_img = img.shape[1]
        qkv = empty_qkv(img.shape[0], n_img + txt.shape[1], self.heads, img.shape[-1] // self.heads, img)
        chunks = {  # (rows, (shift1, scale1, gate1, shift2, scale2, gate2)) per stream
            "img": inputs.image_chunks(n_img, self.img_mod, vec),
            "txt": modulated_chunks(txt.shape[1], inputs.chunk, self.txt_mod(vec)),
        }
        for stream, x, offset in (("img", img, 0), ("txt", txt, n_img)):
            qkv_layer = getattr(self, f"{stream}_attn_qkv")
            with held_weights(qkv_layer):
                project_qkv(x, chunks[stream], qkv_layer, getattr(self, f"{stream}_attn_q_norm"),
                            getattr(self, f"{stream}_attn_k_norm"), self.heads, qkv, offset, inputs, rotate_until=n_img)
        attn = inputs.attend(qkv)  # [B, S, D]; frees q, k, v
        for stream, x, offset in (("img", img, 0), ("txt", txt, n_img)):
            proj, mlp = getattr(self, f"{stream}_attn_proj"), getattr(self, f"{stream}_mlp")
            with held_weights(proj):
                for rows, (_, _, gate1, *_) in chunks[stream]:
                    x[:, rows] += gate1 * proj(attn[:, offset + rows.start : offset + rows.stop])
            with held_weights(mlp.fc1, mlp.fc2):
                for rows, (*_, shift2, scale2, gate2) in chunks[stream]:
                    x[:, rows] += gate2 * mlp(norm_modulate(x[:, rows], shift2, scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """`MMSingleStreamBlock`: one sequence [img ; txt]; linear1 gives qkv and the MLP input,
    linear2 maps [attn, GELU(mlp)] back. The MLP half of linear1 is computed after attention,
    chunk by chunk, so its 4x-wide output never exists for the whole sequence."""

    def __init__(self, hidden_size: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.heads = heads
        self.hidden_size = hidden_size
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + mlp_hidden)
        self.linear2 = nn.Linear(hidden_size + mlp_hidden, hidden_size)
        self.q_norm = RMSNorm(hidden_size // heads)
        self.k_norm = RMSNorm(hidden_size // heads)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, 3)

    def forward(self, x, vec, inputs: JointAttentionInputs):
        """x [B, N_img + L, D], vec [B, D] -> x updated in place."""
        chunks = inputs.image_chunks(x.shape[1], self.modulation, vec)  # (rows, (shift, scale, gate))
        qkv = empty_qkv(x.shape[0], x.shape[1], self.heads, self.hidden_size // self.heads, x)
        with held_weights(self.linear1):
            project_qkv(x, chunks, self.linear1, self.q_norm, self.k_norm, self.heads, qkv, 0, inputs,
                        rotate_until=inputs.image_tokens)
        attn = inputs.attend(qkv)  # [B, S, D]; frees q, k, v
        mlp_rows = slice(3 * self.hidden_size, self.linear1.out_features)
        with held_weights(self.linear1, self.linear2):
            for rows, (shift, scale, gate) in chunks:
                mlp = linear_rows(self.linear1, norm_modulate(x[:, rows], shift, scale), mlp_rows)
                x[:, rows] += gate * self.linear2(torch.cat([attn[:, rows], self.mlp_act(mlp)], dim=-1))
        return x


class FinalLayer(nn.Module):
    """Modulated LayerNorm then Linear to patch outputs (64 = 1*2*2*16 for the 13B model)."""

    def __init__(self, hidden_size: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, vec, chunk: int | None = None):
        shift, scale = self.adaLN_modulation(vec).unsqueeze(1).chunk(2, dim=-1)
        out = x.new_empty(*x.shape[:-1], self.linear.out_features)
        for rows in token_chunks(x.shape[1], chunk):
            out[:, rows] = self.linear(norm_modulate(x[:, rows], shift, scale))
        return out
