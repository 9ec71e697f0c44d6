"""DiT: 13B structure on the meta device and numerical parity with diffusers on a tiny config."""

import pytest
import torch

from hyvideo.config import DIT_CONFIGS
from hyvideo.dit import HunyuanVideoDiT
from tests.diffusers_oracle import diffusers_transformer
from tests.helpers import max_rel_err, parity_inputs, randomize_

TINY = DIT_CONFIGS["tiny"]


@pytest.fixture(scope="module")
def models():
    ours = HunyuanVideoDiT(TINY).eval()
    randomize_(ours, seed=1)
    reference = diffusers_transformer(TINY, ours.state_dict())
    return ours, reference


# float32 on CPU: the two implementations order a few reductions differently (qkv split vs fused,
# SDPA mask vs dropped padding); observed errors are ~1e-7, so 1e-5 leaves margin but would catch
# any real formula difference (those show up at 1e-2 or more).
TOL = 1e-5


@pytest.mark.parametrize("batch,valid", [(1, [5]), (2, [7, 3])])
def test_parity_with_diffusers(models, batch, valid):
    ours, reference = models
    # Non-square latents (h=6, w=10), T' = 3 latent frames, padded text.
    inputs = parity_inputs(TINY, batch, frames=3, height=6, width=10, text_len=12, valid=valid)
    with torch.no_grad():
        out = ours(*inputs)
        x, t, text, mask, pooled, guidance = inputs
        expected = reference(x, t, text, mask, pooled, guidance, return_dict=False)[0]
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    assert max_rel_err(out, expected) <= TOL


def test_batch_of_two_equals_two_batches_of_one(models):
    """The padding mask (batch 2) and dropping padded tokens (batch 1) are the same function."""
    ours, _ = models
    x, t, text, mask, pooled, guidance = parity_inputs(TINY, 2, frames=2, height=4, width=6, text_len=10, valid=[10, 4])
    with torch.no_grad():
        both = ours(x, t, text, mask, pooled, guidance)
        for i in range(2):
            one = ours(x[i : i + 1], t[i : i + 1], text[i : i + 1], mask[i : i + 1], pooled[i : i + 1], guidance[i : i + 1])
            assert max_rel_err(one, both[i : i + 1]) <= TOL


def test_token_chunking_matches_whole_sequence(models):
    ours, _ = models
    inputs = parity_inputs(TINY, 1, frames=3, height=6, width=10, text_len=12, valid=[9])
    with torch.no_grad():
        whole = ours(*inputs)
        ours.token_chunk = 7  # straddles the image/text boundary (45 image tokens)
        try:
            chunked = ours(*inputs)
        finally:
            ours.token_chunk = None
    # Same ops per token; only GEMM blocking over fewer rows may differ: float32 rounding level.
    assert max_rel_err(chunked, whole) <= 1e-6


def test_13b_config_on_meta_device():
    with torch.device("meta"):
        model = HunyuanVideoDiT(DIT_CONFIGS["HYVideo-T/2-cfgdistill"])
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 856  # facts §1.12
    assert sum(v.numel() for v in model.state_dict().values()) == 12_821_012_544  # facts §1.1
    expected = {
        "img_in.proj.weight": (3072, 16, 1, 2, 2),
        "txt_in.input_embedder.weight": (3072, 4096),
        "txt_in.t_embedder.mlp.0.weight": (3072, 256),
        "txt_in.c_embedder.linear_1.weight": (3072, 4096),
        "txt_in.individual_token_refiner.blocks.1.norm1.weight": (3072,),
        "txt_in.individual_token_refiner.blocks.1.self_attn_qkv.weight": (9216, 3072),
        "txt_in.individual_token_refiner.blocks.1.mlp.fc1.weight": (12288, 3072),
        "txt_in.individual_token_refiner.blocks.1.adaLN_modulation.1.weight": (6144, 3072),
        "time_in.mlp.2.weight": (3072, 3072),
        "vector_in.in_layer.weight": (3072, 768),
        "guidance_in.mlp.0.weight": (3072, 256),
        "double_blocks.19.img_mod.linear.weight": (18432, 3072),
        "double_blocks.19.txt_attn_qkv.bias": (9216,),
        "double_blocks.19.img_attn_q_norm.weight": (128,),
        "double_blocks.19.txt_mlp.fc2.weight": (3072, 12288),
        "single_blocks.39.linear1.weight": (21504, 3072),
        "single_blocks.39.linear2.weight": (3072, 15360),
        "single_blocks.39.k_norm.weight": (128,),
        "single_blocks.39.modulation.linear.weight": (9216, 3072),
        "final_layer.linear.weight": (64, 3072),
        "final_layer.adaLN_modulation.1.weight": (6144, 3072),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    per_double = sum(p.numel() for p in model.double_blocks[0].parameters())
    per_single = sum(p.numel() for p in model.single_blocks[0].parameters())
    assert (per_double, per_single) == (339_831_296, 141_591_808)  # facts §1.1
