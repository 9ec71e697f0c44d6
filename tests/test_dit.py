"""DiT: 13B structure on the meta device and numerical parity with diffusers on a tiny config."""

import pytest
import torch

from hyvideo.config import DIT_CONFIGS, DiTConfig
from hyvideo.dit import HunyuanVideoDiT
from tests.diffusers_oracle import diffusers_transformer
from tests.helpers import PARITY_TOL, max_rel_err, parity_inputs, randomize_

TINY = DIT_CONFIGS["tiny"]


@pytest.fixture(scope="module")
def models():
    ours = HunyuanVideoDiT(TINY).eval()
    randomize_(ours, seed=1)
    reference = diffusers_transformer(TINY, ours.state_dict())
    return ours, reference



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
    assert max_rel_err(out, expected) <= PARITY_TOL


def test_batch_of_two_equals_two_batches_of_one(models):
    """The padding mask (batch 2) and dropping padded tokens (batch 1) are the same function."""
    ours, _ = models
    x, t, text, mask, pooled, guidance = parity_inputs(TINY, 2, frames=2, height=4, width=6, text_len=10, valid=[10, 4])
    with torch.no_grad():
        both = ours(x, t, text, mask, pooled, guidance)
        for i in range(2):
            one = ours(x[i : i + 1], t[i : i + 1], text[i : i + 1], mask[i : i + 1], pooled[i : i + 1], guidance[i : i + 1])
            assert max_rel_err(one, both[i : i + 1]) <= PARITY_TOL


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


# ------------------------------------------------------------------------------------------------
# Image-to-video DiTs (image_condition_type)

I2V = {kind: DIT_CONFIGS[f"tiny-i2v-{kind}"] for kind in ("16ch", "33ch")}


@pytest.fixture(scope="module", params=["16ch", "33ch"])
def i2v_models(request):
    config = I2V[request.param]
    ours = HunyuanVideoDiT(config).eval()
    randomize_(ours, seed=2)
    return ours, diffusers_transformer(config, ours.state_dict())


@pytest.mark.parametrize("batch,valid", [(1, [5]), (2, [7, 3])])
def test_i2v_parity_with_diffusers(i2v_models, batch, valid):
    """token_replace: first-frame tokens modulated from t = 0 in every block; latent_concat: 33
    input channels, no guidance_in. Same tolerance and reasons as the text-to-video parity."""
    ours, reference = i2v_models
    x, t, text, mask, pooled, guidance = parity_inputs(ours.config, batch, frames=3, height=6, width=10, text_len=12, valid=valid)
    if not ours.config.guidance_embed:
        guidance = None
    with torch.no_grad():
        out = ours(x, t, text, mask, pooled, guidance)
        expected = reference(x, t, text, mask, pooled, guidance, return_dict=False)[0]
    assert out.shape == (batch, 16, 3, 6, 10)
    assert max_rel_err(out, expected) <= PARITY_TOL


def test_token_replace_first_frame_modulation_matters():
    """The first frame's own modulation is used: the same weights as a text-to-video DiT give
    another output on the first frame's tokens (guards against the second vector being ignored)."""
    replace_dit = HunyuanVideoDiT(I2V["16ch"]).eval()
    randomize_(replace_dit, seed=3)
    plain = HunyuanVideoDiT(TINY).eval()
    plain.load_state_dict(replace_dit.state_dict())
    inputs = parity_inputs(TINY, 1, frames=3, height=6, width=10, text_len=12, valid=[9])
    with torch.no_grad():
        a, b = replace_dit(*inputs), plain(*inputs)
    assert max_rel_err(a[:, :, 0], b[:, :, 0]) > 1e-2  # first frame: its own modulation
    assert not torch.equal(a[:, :, 1:], b[:, :, 1:])  # later frames see it through attention


@pytest.mark.parametrize("chunk", [7, 15, 16])  # straddles, ends exactly at, or passes the 15 first-frame tokens
def test_token_replace_chunking_matches_whole_sequence(chunk):
    ours = HunyuanVideoDiT(I2V["16ch"]).eval()
    randomize_(ours, seed=4)
    inputs = parity_inputs(ours.config, 1, frames=3, height=6, width=10, text_len=12, valid=[9])
    with torch.no_grad():
        whole = ours(*inputs)
        ours.token_chunk = chunk
        chunked = ours(*inputs)
    assert max_rel_err(chunked, whole) <= 1e-6  # same ops per token (see test_token_chunking_matches_whole_sequence)


def test_token_replace_streamed_blocks_seam():
    """The blocks= seam (what lowvram streams through) carries the first-frame modulation too."""
    ours = HunyuanVideoDiT(I2V["16ch"]).eval()
    randomize_(ours, seed=5)
    inputs = parity_inputs(ours.config, 1, frames=2, height=4, width=6, text_len=8, valid=[6])
    with torch.no_grad():
        own = ours(*inputs)
        given = ours(*inputs, blocks=iter(ours.all_blocks()))
    assert torch.equal(own, given)


def test_i2v_13b_configs_on_meta_device():
    """Both I2V releases keep the T2V tensor names (token_replace reuses img_mod / modulation for
    the first frame): 16ch = the T2V count; 33ch = img_in 17 channels wider, no guidance_in."""
    counts = {}
    for name in ("HYVideo-T/2-I2V-16ch", "HYVideo-T/2-I2V-33ch"):
        with torch.device("meta"):
            model = HunyuanVideoDiT(DIT_CONFIGS[name])
        counts[name] = (len(model.state_dict()), sum(v.numel() for v in model.state_dict().values()))
        assert tuple(model.img_in.proj.weight.shape) == (3072, model.config.in_channels, 1, 2, 2)
    guidance_in = 3072 * 256 + 3072 + 3072 * 3072 + 3072  # two Linear layers (facts §1.3)
    assert counts["HYVideo-T/2-I2V-16ch"] == (856, 12_821_012_544)
    assert counts["HYVideo-T/2-I2V-33ch"] == (852, 12_821_012_544 + 3072 * 17 * 4 - guidance_in)
    assert counts["HYVideo-T/2-I2V-33ch"][1] == 12_810_991_680


def test_config_roundtrip_and_checks():
    for name in ("tiny-i2v-16ch", "tiny-i2v-33ch", "HYVideo-T/2-I2V-33ch"):
        config = DIT_CONFIGS[name]
        assert DiTConfig.from_diffusers(config.to_diffusers()) == config
        assert DiTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="in_channels 33"):
        DiTConfig(image_condition_type="latent_concat")
    with pytest.raises(ValueError, match="not one of"):
        DiTConfig(image_condition_type="channel_concat")
