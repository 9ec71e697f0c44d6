"""LoRA on HunyuanVideo-1.5 (hyvideo/lora.py): diffusers/PEFT's format against diffusers + PEFT
as the oracle; musubi-tuner's kohya format on the official names (q, k, v apart) against the
LoRA merged into the official weights by hand; and `generate --lora` on 1.5 weights."""

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from hyvideo.lora import LoraSpec, apply_loras, lora_bytes
from hyvideo.v15_dit import HunyuanVideo15DiT
from hyvideo.v15_keys import official_to_ours, ours_to_diffusers, ours_to_official
from tests.helpers import randomize_
from tests.test_v15_dit import TINY, make_inputs, reference_forward, rel_err

pytest.importorskip("diffusers")
from diffusers import HunyuanVideo15Transformer3DModel  # noqa: E402

# float32 on the CPU, as the 1.5 DiT's parity (tests/test_v15_dit.py): ~1e-7 from reduction order; a
# wrong row slice, scale or swapped half moves the output by 1e-2 or more.
TOL = 1e-5
INPUTS = make_inputs(TINY, 1, [9], [4], image=True)


@pytest.fixture(scope="module")
def weights() -> dict:
    model = HunyuanVideo15DiT(TINY).eval()
    randomize_(model, seed=1)
    return model.state_dict()


def ours(weights: dict, specs=()) -> torch.Tensor:
    model = HunyuanVideo15DiT(TINY).eval()
    model.load_state_dict(weights)
    if specs:
        apply_loras(model, list(specs))
    with torch.no_grad():
        return model(*INPUTS)


def factors(gen, out_features: int, in_shape: tuple[int, ...], rank: int):
    """down [r, *in], up [out, r, (1, 1, 1)]: big enough to move the output far beyond TOL."""
    fan_in = torch.Size(in_shape).numel()
    down = torch.randn(rank, *in_shape, generator=gen) / fan_in**0.5
    up = torch.randn(out_features, rank, *([1] * (len(in_shape) - 1)), generator=gen) / rank**0.5
    return down, up


def test_diffusers_format_on_every_linear_matches_diffusers(weights, tmp_path):
    """A PEFT LoRA on every linear of diffusers' 1.5 transformer (its split to_q/to_k/to_v, the
    refiner's, the swapped final modulation) and on x_embedder's patch convolution, ranks 2 to 4,
    read by us onto the fused official modules and by diffusers through PEFT."""
    reference = HunyuanVideo15Transformer3DModel(**TINY.to_diffusers()).eval()
    reference.load_state_dict(ours_to_diffusers(weights), strict=True)
    gen = torch.Generator().manual_seed(3)
    sd = {}
    modules = [(name, m) for name, m in reference.named_modules() if isinstance(m, (nn.Linear, nn.Conv3d))]
    assert any(isinstance(m, nn.Conv3d) for _, m in modules) and len(modules) > 40
    for i, (name, module) in enumerate(modules):
        in_shape = module.weight.shape[1:] if isinstance(module, nn.Conv3d) else (module.in_features,)
        down, up = factors(gen, module.weight.shape[0], tuple(in_shape), 2 + i % 3)
        sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = down, up
    path = tmp_path / "diffusers.safetensors"
    save_file(sd, path)
    reference.load_lora_adapter(dict(sd), prefix="transformer", adapter_name="d")
    with torch.no_grad():
        expected = reference_forward(reference, *INPUTS)
    got = ours(weights, [LoraSpec(path)])
    assert rel_err(got, expected) <= TOL
    assert rel_err(ours(weights), expected) > 100 * TOL  # the LoRA does move the output


def test_musubi_format_on_official_names_matches_merged_weights(weights, tmp_path):
    """musubi-tuner's 1.5 LoRAs: kohya keys on the official module names, where each block's q, k
    and v are apart (`lora_unet_double_blocks_0_img_attn_q`), alpha != rank. Oracle: W += alpha/r
    * up @ down on the official tensors, then the plain forward."""
    official = ours_to_official(weights)
    names = ["double_blocks.0.img_attn_q", "double_blocks.0.img_attn_v", "double_blocks.1.txt_attn_k",
             "double_blocks.1.img_mlp.fc1", "double_blocks.0.txt_mod.linear", "final_layer.linear", "byt5_in.fc2"]
    gen, rank, alpha, strength = torch.Generator().manual_seed(4), 4, 8.0, 0.7
    sd, merged = {}, dict(official)
    for name in names:
        weight = official[f"{name}.weight"]
        down, up = factors(gen, weight.shape[0], (weight.shape[1],), rank)
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"], sd[f"{key}.alpha"] = down, up, torch.tensor(alpha)
        merged[f"{name}.weight"] = weight + strength * alpha / rank * up @ down
    path = tmp_path / "musubi.safetensors"
    save_file(sd, path)
    expected = ours(official_to_ours(merged))
    assert rel_err(ours(weights, [LoraSpec(path, strength)]), expected) <= TOL


def test_bytes_are_counted_per_double_block_and_a_13b_lora_is_refused(weights, tmp_path):
    path = tmp_path / "one.safetensors"
    gen = torch.Generator().manual_seed(5)
    down, up = factors(gen, 64, (64,), 2)
    save_file({"transformer_blocks.0.attn.to_out.0.lora_A.weight": down, "transformer_blocks.0.attn.to_out.0.lora_B.weight": up}, path)
    counted = lora_bytes([LoraSpec(path)], TINY)
    assert (counted.double_block, counted.single_block, counted.trunk) == (2 * (64 + 64) * 2, 0, 0)  # rank 2, bf16
    assert counted.total(TINY) == TINY.double_blocks * counted.double_block  # every block gets the same structure
    thirteen_b = tmp_path / "13b.safetensors"
    save_file({"lora_unet_single_blocks_0_linear1.lora_down.weight": down,
               "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.zeros(64, 2)}, thirteen_b)
    from hyvideo.errors import HyVideoError

    with pytest.raises(HyVideoError, match="names no linear of this model"):
        lora_bytes([LoraSpec(thirteen_b)], TINY)
