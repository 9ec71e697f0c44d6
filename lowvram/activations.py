"""Activation memory of each stage, as pure functions of sizes (bytes, batch 1).

The formulas follow the code's allocation pattern; tests check them against tensor bytes measured
with `bench/memtrack.py:PeakTracker` on small configs of the same architecture.

DiT (hyvideo/blocks.py), S = image tokens + text tokens, D hidden, h = S*D*act_bytes one hidden
state (0.73 GB at 720x1280x129 in bf16), c the token chunk. Between blocks the hidden state and the
float32 RoPE tables are alive; inside a block the peak is the largest of
- projection: q, k, v (3h) + one chunk of norm/QKV/RMSNorm/RoPE work (c * qkv_per_token),
- attention:  q, k, v and the attention output (4h),
- MLP:        the attention output (h) + one chunk of the single block's MLP (c * mlp_per_token).
qkv_per_token = 3D*act (fused QKV output) + 6 D-wide float32 temporaries (norm, RMSNorm and RoPE
run in float32); mlp_per_token = 2 MLP-wide tensors (linear1's MLP rows and GELU) + the
[attn, mlp] concat + 2 D-wide outputs (linear2, gate product). For the 13B model (MLP = 4D) both are
30*D bytes per token in bf16: 92 KB, so a chunk of 8192 tokens costs 0.75 GB.
With FP8 linears on `_scaled_mm` (quant/fp8.py) a linear call also holds its input quantized to
e4m3 (1 byte per element) and float32 row scales, then a float32 scratch of at most QUANT_ROWS rows
or the matmul's output (`scaled_mm_bytes`). The largest case is the single block's linear2, whose
input [attn, GELU(mlp)] is D + MLP wide, while linear1's MLP rows and that concat are alive: per
token (MLP + D + MLP) * act + the quantization's bytes. For the 13B model at 8192-token chunks that
is 78 KB per token against the MLP path's 92 KB (the 1024 scratch rows are a small share), so it
adds nothing there; chunks of at most 1024 tokens pay 132 KB per token. The other linears' inputs
are narrower (D, or MLP for fc2) with fewer tensors alive. Before the quantization was done in
place it was 16 bytes per input element (1.2-1.5 GB per 8192-token chunk), unplanned.

DiT with sequence parallelism (lowvram/parallel.py, `layout`: world = u x r ranks), per rank: the
same forward over its N/world image tokens and all the text tokens (h, g, t = its joint, image-only
and text states), except the attention (`attention_bytes`), which is handed q, k, v (3h) and frees
each once its all-to-all has sent it:
- the text's keys/values for this rank's heads, copied (2t/u), for the whole call;
- Ulysses (u > 1): the all-to-all of q with q, k, v alive: yunchang's head-major input copy and its
  receive buffer (2h: 5h in all; at batch 1 the token-major result is a view of the buffer); each
  of q, k, v is freed once sent, leaving the group's tokens for this rank's heads (h + 2g in all);
  with u = 1 the "all-to-all" returns views of q, k, v (3h stay);
- r = 1: k is joined to the text's keys (g + t/u) before v is sent and joined (2h + 3g + t/u), then
  one kernel call: its output (h) and LSE with the group's q, k, v (2 (h + g + t/u) + lse): less
  than 5h, which is the Ulysses attention's peak;
- ring (r > 1): yunchang's next k/v receive buffers (2g; 4g with r > 2, when the received pair is in
  use while the next arrives) + its LSE merge: the float32 running output (2h), the block's output
  (h), then its float32 copy and (out - block) in turn (4h): 7h. The text block merged after the
  ring holds the ring's output and the text block's (2h), a float32 copy (2h) and the merge's 4h: 8h;
- the reverse all-to-all: the output, its head-major copy, the receive buffer (u > 1) and the
  token-major result (4h; 3h with u = 1), after the gathered q, k, v are freed;
plus the float32 log-sum-exps (S x H x 4 bytes each, 2/head_dim of a state: one per kernel call, three
alive in a merge). At 720p x 129 on two GPUs the Ulysses attention (5h) stays below the 8192-token
chunk's projection work (3h + the chunk), so it adds nothing to the rank's peak; before q, k, v were
handed over and k, v joined as gathered it was 9h. Counted as the CPU allocates (tests: equal to
PeakTracker's measurement in gloo runs); on CUDA TorchScript may fuse the merge's element-wise
steps, and then the ring's figures are upper bounds.

VAE decoder (hyvideo/vae.py), per decoded tile: walks the decoder levels and takes the largest
set of tensors alive at once in a resnet (input, norm/SiLU outputs, the replicate-padded copy, conv
output, shortcut) or an upsampler (input, nearest-upsampled parts, concat, padded copy, conv
output), plus the mid-block attention's [M, M] boolean mask and its additive float copy
(M = tokens of the tile). On CUDA, cuDNN runs fp16 3D convs channels-last and allocates a copy of
the (padded) input and of the output of the conv it runs: the largest such pair is added (measured
on an H200 for the official 17x32x32 tile: 13.20 GiB allocated, 9.06 GiB of it tensors the CPU
also sees, the difference 4.14 GiB = the full-resolution upsampler conv's padded input + output).
"""

from hyvideo.config import DiTConfig, VAEConfig
from hyvideo.text_encoder import OFFICIAL_CROP_START, PROMPT_TEMPLATE_VIDEO, TEXT_LEN
from quant.fp8 import QUANT_ROWS

from .parallel import Layout

F32 = 4


def _chunk_paths(config: DiTConfig, act_bytes: int) -> tuple[int, int]:
    """Bytes per token of a chunk of (QKV projection work, single-block MLP work)."""
    d, mlp = config.hidden_size, config.mlp_hidden
    qkv = 3 * d * act_bytes + 6 * d * F32
    mlp_path = 2 * mlp * act_bytes + (d + mlp) * act_bytes + 2 * d * act_bytes
    return qkv, mlp_path


def scaled_mm_bytes(config: DiTConfig, chunk_tokens: int, act_bytes: int = 2) -> int:
    """What the single block's linear2 (input D + MLP wide) allocates on the `_scaled_mm` path
    besides its input: the input in e4m3 and its float32 row scales, with either the float32
    scratch rows (while quantizing) or the matmul's output (after)."""
    width = config.hidden_size + config.mlp_hidden
    scratch = min(chunk_tokens, QUANT_ROWS) * width * F32
    return chunk_tokens * (width + F32) + max(scratch, chunk_tokens * config.hidden_size * act_bytes)


def attention_bytes(config: DiTConfig, tokens: int, text_tokens: int = TEXT_LEN, act_bytes: int = 2,
                    layout: Layout | None = None) -> int:
    """Peak bytes of one joint attention call on a rank, the q, k, v it is handed included (`tokens`:
    this rank's image tokens): q, k, v and the output on one GPU; the cross-rank buffers with a layout."""
    seq = tokens + text_tokens
    d = config.hidden_size
    hidden, image, text = seq * d * act_bytes, tokens * d * act_bytes, text_tokens * d * act_bytes
    lse = seq * config.heads * F32
    if layout is None or layout.world == 1:
        return 4 * hidden
    u, r = layout.ulysses, layout.ring
    text_kv = 2 * text // u  # the text's keys/values for this rank's heads, copied
    scatter = 5 * hidden if u > 1 else 0  # q, k, v + the all-to-all of q (input copy, receive buffer)
    if r == 1:  # the later steps hold less (g < h): 2h + 3g + t/u, then 2 (h + g + t/u) + lse; reverse 4h
        return text_kv + scatter
    gathered = hidden + 2 * image if u > 1 else 3 * hidden  # q, k, v of the group's tokens, this rank's heads
    received = (2 if r == 2 else 4) * image
    ring = max(received + 7 * hidden + 3 * lse, 8 * hidden + 3 * lse)  # ring steps; the text block's merge
    reverse = (4 if u > 1 else 3) * hidden
    return max(text_kv + scatter, text_kv + gathered + ring, reverse)


def dit_activation_bytes(
    config: DiTConfig, tokens: int, chunk: int | None, text_tokens: int = TEXT_LEN, act_bytes: int = 2,
    layout: Layout | None = None, scaled_mm: bool = False,
) -> int:
    """Peak activation bytes of one DiT forward over `tokens` image tokens (weights excluded); with
    a sequence-parallel layout, of one rank, `tokens` being its share (N / world). `text_tokens`:
    the LLM's text length; padding is dropped for batch 1, so TEXT_LEN is the worst case.
    scaled_mm: the FP8 linears run `_scaled_mm` (their input quantization's temporaries)."""
    seq = tokens + text_tokens
    hidden = seq * config.hidden_size * act_bytes
    rope = 2 * tokens * config.head_dim * F32  # cos and sin tables, float32
    c = seq if not chunk else min(chunk, seq)
    qkv_path, mlp_path = _chunk_paths(config, act_bytes)
    attend = attention_bytes(config, tokens, text_tokens, act_bytes, layout)
    mlp_peak = c * mlp_path
    if scaled_mm:  # linear2's input quantized while linear1's MLP rows and the concat are alive
        width = config.hidden_size + config.mlp_hidden
        mlp_peak = max(mlp_peak, c * (config.mlp_hidden + width) * act_bytes + scaled_mm_bytes(config, c, act_bytes))
    inside = max(3 * hidden + c * qkv_path, attend, hidden + mlp_peak)
    return hidden + rope + inside


def _resnet_peak(c_in: int, c_out: int, n: int, n_pad: int) -> int:
    """Elements alive at the peak of a resnet (x kept by the caller throughout)."""
    first = max(2 * c_in * n, c_in * n + c_in * n_pad, c_in * n_pad + c_out * n)
    second = c_out * n + max(2 * c_out * n, c_out * n + c_out * n_pad, c_out * n_pad + c_out * n)
    merge = 3 * c_out * n  # h, shortcut output, sum
    return c_in * n + max(first, second, merge)


def _padded(t: int, h: int, w: int) -> int:
    return (t + 2) * (h + 2) * (w + 2)  # replicate padding of a k=3 causal conv: 2 frames, 1 pixel each side


def vae_decode_tile_bytes(config: VAEConfig, latent_frames: int, latent_h: int, latent_w: int, act_bytes: int = 2,
                          cudnn_copies: bool = True) -> int:
    """Peak activation bytes of decoding one latent tile [1, C, t, h, w] (weights excluded).
    cudnn_copies=False: only the tensors PyTorch itself holds (what the CPU allocates)."""
    from hyvideo.vae import level_factors

    widths = config.block_out_channels[::-1]
    t, h, w = latent_frames, latent_h, latent_w
    n = t * h * w
    peaks = [config.latent_channels * n + _resnet_peak(widths[0], widths[0], n, _padded(t, h, w))]  # conv_in + mid
    if config.mid_block_add_attention:  # x, norm, q, k, v, output, projection (per-frame SDPA, no N x N mask)
        peaks.append(7 * widths[0] * n)
    conv_io = widths[0] * (_padded(t, h, w) + n)  # the largest conv's padded input + output
    c_prev = widths[0]
    for i, (ft, fs, _) in enumerate(level_factors(config)):
        c = widths[i]
        n, n_pad = t * h * w, _padded(t, h, w)
        block_input = c_prev * n  # the decoder keeps each up block's input until the block returns
        peaks.append(_resnet_peak(c_prev, c, n, n_pad))
        peaks.append(block_input + _resnet_peak(c, c, n, n_pad))
        conv_io = max(conv_io, c_prev * n_pad + c * n)
        if (ft, fs) != (1, 1):
            t2, h2, w2 = 1 + ft * (t - 1), h * fs, w * fs
            n2 = t2 * h2 * w2
            # the last resnet's output, the upsampled first frame and rest (kept alive by the
            # forward's locals), their concat, its replicate-padded copy and the conv output
            peaks.append(block_input + c * n + 3 * c * n2 + c * _padded(t2, h2, w2))
            conv_io = max(conv_io, c * (_padded(t2, h2, w2) + n2))
            t, h, w = t2, h2, w2
        c_prev = c
    n = t * h * w
    peaks.append(c_prev * n + c_prev * n + c_prev * _padded(t, h, w) + config.out_channels * n)  # norm_out, conv_out
    return int((max(peaks) + (conv_io if cudnn_copies else 0)) * act_bytes)


def vae_encode_frame_bytes(config: VAEConfig, height: int, width: int, act_bytes: int = 2) -> int:
    """Peak activation bytes of encoding one frame [1, 3, 1, H, W] (image-to-video's image), an
    estimate on the decoder's terms: per level, a resnet's peak with the block's input kept, and the
    largest conv's padded input and output (cuDNN's copies); the first level, at full size, decides."""
    from hyvideo.vae import level_factors

    widths = config.block_out_channels
    t, h, w = 1, height, width
    c_prev = widths[0]
    peaks = [(config.in_channels + widths[0]) * _padded(t, h, w)]  # conv_in
    conv_io = 0
    for i, (ft, fs, _) in enumerate(level_factors(config)):
        c = widths[i]
        n, n_pad = t * h * w, _padded(t, h, w)
        peaks.append(c_prev * n + _resnet_peak(c_prev, c, n, n_pad))
        conv_io = max(conv_io, c_prev * n_pad + c * n)
        if (ft, fs) != (1, 1):
            t, h, w = 1 + (t - 1) // ft, max(1, h // fs), max(1, w // fs)
        c_prev = c
    return int((max(peaks) + conv_io) * act_bytes)


def vae_tile_pixels(config: VAEConfig, latent_frames: int, latent_h: int, latent_w: int) -> tuple[int, int, int]:
    """(frames, height, width) decoded from a latent tile."""
    return (1 + config.time_compression_ratio * (latent_frames - 1), latent_h * config.spatial_compression_ratio,
            latent_w * config.spatial_compression_ratio)


def text_activation_bytes(text_len: int = TEXT_LEN + OFFICIAL_CROP_START[PROMPT_TEMPLATE_VIDEO], hidden: int = 4096, layers: int = 32, mlp: int = 14336) -> int:
    """LLM forward with output_hidden_states: every layer's hidden state is kept (33 x L x 4096 in
    bf16), plus one layer's MLP intermediates and a float32 attention score matrix per head."""
    states = (layers + 1) * text_len * hidden * 2
    layer = 3 * text_len * mlp * 2 + 32 * text_len * text_len * F32
    return states + layer


# HunyuanVideo-1.5's VAE (hyvideo/v15_vae.py): channel RMS norms computed in float32 (a float32 copy
# and its normalized result, F32 / act_bytes element-widths each), resamplers that move pixels into
# channels (the conv output, its depth-to-space copy, the shortcut's repeated channels and their
# copy, the sum: five output-sized tensors with the input kept), a frame-causal mid attention.


def _v15_resnet_peak(c_in: int, c_out: int, n: int, n_pad: int, act_bytes: int) -> int:
    """Elements (in act_bytes units) alive at a 1.5 resnet's peak, its input kept by the caller."""
    norm = 2 * (F32 // act_bytes) * max(c_in, c_out) * n  # x.float() and F.normalize's output
    return max(_resnet_peak(c_in, c_out, n, n_pad), c_in * n + norm)


def v15_vae_decode_tile_bytes(config, latent_frames: int, latent_h: int, latent_w: int, act_bytes: int = 2,
                              cudnn_copies: bool = True) -> int:
    """Peak activation bytes of the 1.5 decoder on one latent tile [1, C, t, h, w] (weights
    excluded), walked as `vae_decode_tile_bytes` walks the 13B decoder; each level's input is kept
    by the decoder's loop while the level runs. cudnn_copies: as for the 13B decoder."""
    from hyvideo.v15_vae import resampling_levels

    widths = config.block_out_channels[::-1]
    t, h, w = latent_frames, latent_h, latent_w
    n, n_pad = t * h * w, _padded(t, h, w)
    c = widths[0]
    peaks = [config.latent_channels * n_pad + 3 * c * n,  # conv_in + the repeated-channel shortcut
             c * n + _v15_resnet_peak(c, c, n, n_pad, act_bytes), 7 * c * n]  # mid resnets, attention
    conv_io = c * n_pad + c * n
    c_prev = c
    for i, (space, time) in enumerate(resampling_levels(config, decoder=True)):
        c = widths[i]
        n, n_pad = t * h * w, _padded(t, h, w)
        block_input = c_prev * n
        peaks.append(block_input + _v15_resnet_peak(c_prev, c, n, n_pad, act_bytes))
        peaks.append(block_input + c * n + _v15_resnet_peak(c, c, n, n_pad, act_bytes))
        conv_io = max(conv_io, c_prev * n_pad + c * n)
        if space or time:
            c_out = widths[i + 1] if config.upsample_match_channel and i + 1 < len(widths) else c
            t2, h2, w2 = (1 + 2 * (t - 1) if time else t), 2 * h, 2 * w
            n2 = t2 * h2 * w2
            peaks.append(block_input + c * n_pad + 5 * c_out * n2)
            conv_io = max(conv_io, c * n_pad + c_out * n2)
            t, h, w, c = t2, h2, w2, c_out
        c_prev = c
    n = t * h * w
    peaks.append(3 * c_prev * n + c_prev * _padded(t, h, w) + config.out_channels * n)  # norm_out, conv_out
    return int((max(peaks) + (conv_io if cudnn_copies else 0)) * act_bytes)


def v15_vae_encode_frame_bytes(config, height: int, width: int, act_bytes: int = 2) -> int:
    """Peak activation bytes of the 1.5 encoder on one frame [1, 3, 1, H, W] (image-to-video's
    image): the first, full-size level decides; downsampling packs pixels into channels (the conv
    output, the packed copies of it and of the input, the averaged shortcut, the sum)."""
    from hyvideo.v15_vae import resampling_levels

    widths = config.block_out_channels
    h, w = height, width
    peaks = [(config.in_channels + widths[0]) * _padded(1, h, w)]  # conv_in
    conv_io, c_prev = 0, widths[0]
    for i, (space, _) in enumerate(resampling_levels(config, decoder=False)):
        c = widths[i]
        n, n_pad = h * w, _padded(1, h, w)
        peaks.append(c_prev * n + _v15_resnet_peak(c_prev, c, n, n_pad, act_bytes))
        conv_io = max(conv_io, c_prev * n_pad + c * n)
        if space:
            peaks.append(c * n_pad + 4 * c * n)
            h, w = max(1, h // 2), max(1, w // 2)
        c_prev = c
    return int((max(peaks) + conv_io) * act_bytes)
