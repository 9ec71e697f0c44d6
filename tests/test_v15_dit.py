"""HunyuanVideo-1.5 DiT: parity with diffusers' HunyuanVideo15Transformer3DModel on a tiny config,
key layouts, and the real 8.3B config on the meta device."""

import pytest
import torch
pytest.importorskip("diffusers")  # the oracle: `pytest -m cuda` collects without it (tests/test_cuda_collection.py)
from diffusers import HunyuanVideo15Transformer3DModel

from hyvideo.v15_config import V15_DIT_CONFIGS, V15DiTConfig
from hyvideo.v15_dit import HunyuanVideo15DiT
from hyvideo.v15_keys import diffusers_to_ours, official_to_ours, ours_to_diffusers, ours_to_official
from tests.helpers import randomize_

TINY = V15_DIT_CONFIGS["tiny"]
# float32 on CPU: the implementations differ only in reduction order (fused vs split qkv, dropped
# padding vs masks), ~1e-7 observed; a real formula difference shows at 1e-2 or more.
TOL = 1e-5


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def make_inputs(config: V15DiTConfig, batch: int, valid: list[int], byt5_valid: list[int], image: bool, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, 3, 6, 10, generator=gen)  # T'=3, non-square h x w
    t = torch.tensor([997.0, 500.0][:batch])
    text = torch.randn(batch, 12, config.text_states_dim, generator=gen)
    byt5 = torch.randn(batch, 7, config.byt5_states_dim, generator=gen)
    mask, byt5_mask = torch.zeros(batch, 12, dtype=torch.long), torch.zeros(batch, 7, dtype=torch.long)
    for i in range(batch):
        mask[i, : valid[i]] = 1
        byt5_mask[i, : byt5_valid[i]] = 1
    vision = torch.randn(batch, 5, config.vision_states_dim, generator=gen) if image else None
    return x, t, text, mask, byt5, byt5_mask, vision


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ours = HunyuanVideo15DiT(TINY).eval()
    randomize_(ours, seed=1)
    reference = HunyuanVideo15Transformer3DModel(**TINY.to_diffusers()).eval()
    reference.load_state_dict(ours_to_diffusers(ours.state_dict()), strict=True)
    return ours, reference


def reference_forward(reference, x, t, text, mask, byt5, byt5_mask, vision):
    """diffusers' text-to-video convention: all-zero SigLIP states (729 tokens officially)."""
    if vision is None:
        vision = torch.zeros(x.shape[0], 4, TINY.vision_states_dim)
    return reference(x, t, text, mask, encoder_hidden_states_2=byt5, encoder_attention_mask_2=byt5_mask,
                     image_embeds=vision, return_dict=False)[0]


@pytest.mark.parametrize("batch,valid,byt5_valid,image", [
    (1, [9], [4], False),  # text-to-video, padding dropped
    (1, [12], [0], True),  # image-to-video, no glyph text
    (2, [12, 5], [3, 7], True),  # masks, different lengths per row
    (2, [8, 3], [0, 2], False),
])
def test_parity_with_diffusers(models, batch, valid, byt5_valid, image):
    ours, reference = models
    inputs = make_inputs(TINY, batch, valid, byt5_valid, image)
    with torch.no_grad():
        out = ours(*inputs)
        expected = reference_forward(reference, *inputs)
    assert out.shape == (batch, TINY.out_channels, 3, 6, 10)
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) <= TOL


def test_meanflow_parity_with_diffusers():
    """use_meanflow checkpoints add time_r_in(timestep_r) to the modulation vector."""
    config = V15DiTConfig(**{**TINY.to_dict(), "use_meanflow": True})
    ours = HunyuanVideo15DiT(config).eval()
    randomize_(ours, seed=5)
    reference = HunyuanVideo15Transformer3DModel(**config.to_diffusers()).eval()
    reference.load_state_dict(ours_to_diffusers(ours.state_dict()), strict=True)
    x, t, text, mask, byt5, byt5_mask, vision = make_inputs(config, 1, [9], [4], True)
    timestep_r = torch.tensor([750.0])
    with torch.no_grad():
        out = ours(x, t, text, mask, byt5, byt5_mask, vision, timestep_r)
        expected = reference(x, t, text, mask, timestep_r=timestep_r, encoder_hidden_states_2=byt5,
                             encoder_attention_mask_2=byt5_mask, image_embeds=vision, return_dict=False)[0]
        vec_without_r = ours.time_in(t, torch.float32)
    assert rel_err(out, expected) <= TOL
    assert rel_err(ours.conditioning(t, timestep_r), vec_without_r) > 0.1  # time_r_in takes part


def test_token_chunking_and_supplied_blocks_match(models):
    ours, _ = models
    inputs = make_inputs(TINY, 1, [9], [4], True)
    with torch.no_grad():
        whole = ours(*inputs)
        ours.token_chunk = 7  # 180 image tokens: chunks straddle nothing special, the last one is short
        try:
            chunked = ours(*inputs, blocks=iter(list(ours.double_blocks)))
        finally:
            ours.token_chunk = None
    assert rel_err(chunked, whole) <= TOL  # same ops per token; GEMM blocking only


def test_padding_changes_nothing(models):
    """A padded prompt (batch 1: padding dropped) equals the same prompt without padding."""
    ours, _ = models
    x, t, text, mask, byt5, byt5_mask, vision = make_inputs(TINY, 1, [9], [4], False)
    with torch.no_grad():
        padded = ours(x, t, text, mask, byt5, byt5_mask)
        exact = ours(x, t, text[:, :9], mask[:, :9], byt5[:, :4], byt5_mask[:, :4])
    assert torch.equal(padded, exact)


def test_key_layouts_round_trip(models):
    ours, reference = models
    state = ours.state_dict()
    official = ours_to_official(state)
    assert "double_blocks.0.img_attn_q.weight" in official and "double_blocks.0.img_attn_qkv.weight" not in official
    for name, layout in (("official", official_to_ours(official)), ("diffusers", diffusers_to_ours(reference.state_dict()))):
        assert layout.keys() == state.keys(), name
        assert all(torch.equal(layout[k], state[k]) for k in state), name
    block = {k: v for k, v in reference.state_dict().items() if k.startswith("transformer_blocks.1.")}
    assert diffusers_to_ours(block).keys() == {k for k in state if k.startswith("double_blocks.1.")}  # one block alone


def test_real_config_on_meta_device():
    config = V15_DIT_CONFIGS["hunyuanvideo-1.5"]
    with torch.device("meta"):
        ours = HunyuanVideo15DiT(config)
        reference = HunyuanVideo15Transformer3DModel(**config.to_diffusers())
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    assert count == 8_326_608_160  # "8.3B"; measured, equal to diffusers' count above
    assert [type(b).__name__ for b in ours.all_blocks()] == ["DoubleStreamBlock"] * 54 and config.single_blocks == 0
    official = ours_to_official(ours.state_dict())
    assert len(official) == 1_793  # tensors in the official layout (54 blocks x 32 + 65 others; no time_r_in)


# Tencent's transformer/480p_t2v/config.json as public integrations quote it (not read from a
# downloaded checkpoint here): the constructor arguments of HunyuanVideo_1_5_DiffusionTransformer.
OFFICIAL_CONFIG = {
    "_class_name": "HunyuanVideo_1_5_DiffusionTransformer", "concat_condition": True, "glyph_byT5_v2": True,
    "guidance_embed": False, "heads_num": 16, "hidden_size": 2048, "ideal_resolution": "480p", "ideal_task": "t2v",
    "in_channels": 32, "is_reshape_temporal_channels": False, "mlp_act_type": "gelu_tanh", "mlp_width_ratio": 4,
    "mm_double_blocks_depth": 54, "mm_single_blocks_depth": 0, "out_channels": 32, "patch_size": [1, 1, 1],
    "qk_norm": True, "qk_norm_type": "rms", "qkv_bias": True, "rope_dim_list": [16, 56, 56], "rope_theta": 256,
    "text_pool_type": None, "text_projection": "single_refiner", "text_states_dim": 3584, "text_states_dim_2": None,
    "use_attention_mask": True, "use_cond_type_embedding": True, "use_meanflow": False, "vision_projection": "linear",
    "vision_states_dim": 1152,
}


def test_configs_from_both_layouts():
    real = V15_DIT_CONFIGS["hunyuanvideo-1.5"]
    assert V15DiTConfig.from_official(OFFICIAL_CONFIG) == real
    assert V15DiTConfig.from_diffusers(real.to_diffusers()) == real
    assert V15DiTConfig.from_diffusers(TINY.to_diffusers()) == TINY
    with pytest.raises(ValueError, match="guidance_embed"):
        V15DiTConfig.from_official({**OFFICIAL_CONFIG, "guidance_embed": True})


def test_bfloat16_runs_in_module_dtype(models):
    """Inputs in float32, weights in bf16: every input is cast where it enters (no dtype errors)
    and the result stays near float32 (bf16 has 8 mantissa bits; observed 6.5e-3)."""
    ours, _ = models
    inputs = make_inputs(TINY, 2, [12, 5], [3, 7], True)
    half = HunyuanVideo15DiT(TINY).eval()
    half.load_state_dict(ours.state_dict())
    half.to(torch.bfloat16)
    with torch.no_grad():
        out = half(*inputs)
        expected = ours(*inputs)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), expected) <= 5e-2
