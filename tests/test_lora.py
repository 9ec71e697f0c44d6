"""LoRA (hyvideo/lora.py): the formats in circulation against diffusers + PEFT as the oracle, the
arithmetic (strength, adding LoRAs), every weight format and the block streamer, and bad files."""

import dataclasses
import json
import os
import shutil

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from hyvideo.blocks import held_weights
from hyvideo.config import DIT_CONFIGS
from hyvideo.dit import HunyuanVideoDiT
from hyvideo.errors import HyVideoError
from hyvideo.lora import LoraBytes, LoraLinear, LoraSpec, apply_loras, linear_shapes, lora_bytes, lora_updates
from lowvram.planner import plan
from lowvram.profiles import load_profile
from lowvram.generation.runner import RunInterrupted, StopRequest, execute, resume_run
from lowvram.streaming import BlockStreamer
from quant.fp8 import FP8Linear, swap_linears_fp8
from quant.int8 import quantize_int8
from tests.diffusers_oracle import diffusers_transformer, load_lora, musubi_to_official_names
from tests.helpers import (
    REQUEST, TINY_ARGS, StopAfter, as_json, invoke, max_rel_err, new_run, one_line_error, parity_inputs, randomize_,
    run_steps, schedule_for,
)

TINY = DIT_CONFIGS["tiny"]
pytest.importorskip("diffusers")  # the oracle; DIFFUSERS_SHAPES below is built at import
# float32 on the CPU, as test_dit's parity: the two implementations order a few reductions
# differently (~1e-7 observed); a wrong slice, scale or transpose shows up at 1e-2 or more.
TOL = 1e-5


@pytest.fixture(scope="module")
def weights():
    model = HunyuanVideoDiT(TINY).eval()
    randomize_(model, seed=1)
    return model.state_dict()


def ours(weights, loras=()):
    model = HunyuanVideoDiT(TINY).eval()
    model.load_state_dict(weights)
    if loras:
        apply_loras(model, list(loras))
    return model


def reference(weights):
    return diffusers_transformer(TINY, weights)


INPUTS = parity_inputs(TINY, 1, frames=3, height=6, width=10, text_len=12, valid=[9])


def run(model):
    with torch.no_grad():
        if isinstance(model, HunyuanVideoDiT):
            return model(*INPUTS)
        x, t, text, mask, pooled, guidance = INPUTS
        return model(x, t, text, mask, pooled, guidance, return_dict=False)[0]


def lora_pair(gen, out_features, in_features, rank):
    """down [r, in], up [out, r]: big enough that the LoRA moves the output by far more than TOL."""
    down = torch.randn(rank, in_features, generator=gen) / in_features**0.5
    up = torch.randn(out_features, rank, generator=gen) / rank**0.5
    return down, up


def diffusers_shapes() -> dict[str, tuple[int, int]]:
    """(out, in) of every linear of diffusers' tiny model, by diffusers module name."""
    model = diffusers_transformer(TINY, HunyuanVideoDiT(TINY).state_dict())
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


DIFFUSERS_SHAPES = diffusers_shapes()


def diffusers_lora(seed, modules, rank=lambda i: 2 + i % 3) -> dict:
    """A diffusers/PEFT-format LoRA on the named diffusers linears, ranks varying per module."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for i, name in enumerate(modules):
        down, up = lora_pair(gen, *DIFFUSERS_SHAPES[name], rank(i))
        sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = down, up
    return sd


def kohya_lora(seed, modules, rank=4, alpha=8.0) -> dict:
    """musubi-tuner's (kohya) format on our (official) module names, alpha != rank."""
    shapes = linear_shapes(TINY)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name in modules:
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = lora_pair(gen, *shapes[name], rank)
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


def write(tmp_path, name, sd, metadata=None):
    path = tmp_path / name
    save_file(sd, path, metadata=metadata)
    return path


BLOCK_LINEARS = [n for n in linear_shapes(TINY) if n.startswith(("double_blocks.", "single_blocks."))]


# --- the formats, against diffusers ----------------------------------------------------------


def test_diffusers_format_on_every_linear_matches_diffusers(weights, tmp_path):
    """All 67 linears of diffusers' model (q/k/v into our fused qkv and linear1, the refiner, the
    final layer's swapped modulation halves), ranks 2-4, strength 0.7 (diffusers: set_adapters)."""
    sd = diffusers_lora(0, list(DIFFUSERS_SHAPES))
    path = write(tmp_path, "d.safetensors", sd)
    expected_model = reference(weights)
    load_lora(expected_model, sd, TINY.hidden_size, "d")
    expected_model.set_adapters(["d"], weights=[0.7])
    got, expected = run(ours(weights, [LoraSpec(path, 0.7)])), run(expected_model)
    assert max_rel_err(run(ours(weights)), expected) > 1e-2  # the LoRA matters
    assert max_rel_err(got, expected) <= TOL


def test_diffusers_metadata_alpha_matches_diffusers(weights, tmp_path):
    """The PEFT config diffusers saves (lora_alpha, alpha_pattern) sets the scale, not the rank."""
    modules = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.1.ff.net.2",
               "single_transformer_blocks.1.proj_mlp", "single_transformer_blocks.0.attn.to_v"]
    sd = diffusers_lora(1, modules, rank=lambda i: 4)
    config = {"r": 4, "lora_alpha": 12, "alpha_pattern": {"ff.net.2": 2}, "target_modules": modules}
    metadata = {f"transformer.{k}": v for k, v in config.items()}  # as save_lora_weights writes it
    path = write(tmp_path, "m.safetensors", sd, {"lora_adapter_metadata": json.dumps(metadata)})
    expected_model = reference(weights)
    load_lora(expected_model, sd, TINY.hidden_size, "m", metadata=metadata)
    assert max_rel_err(run(ours(weights, [LoraSpec(path)])), run(expected_model)) <= TOL


def test_kohya_format_matches_diffusers(weights, tmp_path):
    """musubi-tuner's format on every block linear (what it trains); diffusers reads it after
    musubi's own conversion to official names."""
    sd = kohya_lora(2, BLOCK_LINEARS)
    path = write(tmp_path, "k.safetensors", sd)
    expected_model = reference(weights)
    load_lora(expected_model, musubi_to_official_names(sd), TINY.hidden_size, "k")
    got = run(ours(weights, [LoraSpec(path)]))
    assert max_rel_err(got, run(ours(weights))) > 1e-2
    assert max_rel_err(got, run(expected_model)) <= TOL


def test_official_names_read_as_kohya(weights, tmp_path):
    """`diffusion_model.<official name>.lora_down/lora_up/alpha` is the same LoRA as kohya's names:
    the same tensors, so the same output bit for bit."""
    kohya = kohya_lora(3, BLOCK_LINEARS[:7] + ["txt_in.individual_token_refiner.blocks.0.self_attn_qkv"])
    official = {}
    for key, tensor in kohya.items():
        lora_name, _, kind = key.partition(".")
        name = next(n for n in linear_shapes(TINY) if "lora_unet_" + n.replace(".", "_") == lora_name)
        official[f"diffusion_model.{name}.{kind}"] = tensor
    a, b = write(tmp_path, "k.safetensors", kohya), write(tmp_path, "o.safetensors", official)
    assert torch.equal(run(ours(weights, [LoraSpec(a)])), run(ours(weights, [LoraSpec(b)])))


# --- arithmetic ------------------------------------------------------------------------------


def test_strength_zero_is_no_lora_and_strength_scales(weights, tmp_path):
    path = write(tmp_path, "k.safetensors", kohya_lora(4, BLOCK_LINEARS))
    assert torch.equal(run(ours(weights, [LoraSpec(path, 0.0)])), run(ours(weights)))
    one, half = dict((n, (d, u)) for n, d, u in lora_updates([LoraSpec(path, 1.0)], TINY)), lora_updates([LoraSpec(path, 0.5)], TINY)
    for name, down, up in half:
        assert torch.equal(down, one[name][0]) and torch.allclose(up, one[name][1] * 0.5, rtol=1e-6, atol=0)


def test_two_loras_add(tmp_path):
    a = write(tmp_path, "a.safetensors", kohya_lora(5, BLOCK_LINEARS[:4], rank=3))
    b = write(tmp_path, "b.safetensors", diffusers_lora(6, ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v"]))
    specs = [LoraSpec(a, 0.8), LoraSpec(b, -1.5)]

    def delta(specs):
        return {name: up @ down for name, down, up in lora_updates(specs, TINY)}

    both, alone = delta(specs), [delta([s]) for s in specs]
    assert both.keys() == alone[0].keys() | alone[1].keys()
    for name, d in both.items():
        expected = sum(parts[name] for parts in alone if name in parts)
        assert torch.allclose(d, expected, rtol=0, atol=1e-6)  # float32 sums of a few products
    qkv = both["double_blocks.0.img_attn_qkv"]
    hidden = TINY.hidden_size  # to_q, to_v update rows [0, 64) and [128, 192) of the fused qkv; to_k only from a
    assert torch.equal(qkv[hidden : 2 * hidden], alone[0]["double_blocks.0.img_attn_qkv"][hidden : 2 * hidden])


def test_lora_bytes_are_what_the_model_holds(tmp_path):
    """The planner's figure equals the buffers apply_loras makes; a LoRA on block 0 only is padded
    to every block of its kind (one ring per kind)."""
    path = write(tmp_path, "k.safetensors", kohya_lora(7, ["double_blocks.0.img_attn_qkv", "single_blocks.1.linear1",
                                                              "final_layer.linear"], rank=5))
    model = HunyuanVideoDiT(TINY)
    done = apply_loras(model, [LoraSpec(path)])
    sizes = lora_bytes([LoraSpec(path)], TINY, dtype_bytes=4)  # float32 model
    buffers = {name: sum(b.numel() * 4 for b in m.buffers()) for name, m in model.named_children()}
    assert sizes.total(TINY) == done["bytes"] == sum(buffers.values())
    assert sizes.double_block * TINY.double_blocks == buffers["double_blocks"]
    assert sizes.single_block * TINY.single_blocks == buffers["single_blocks"]
    assert sizes.trunk == buffers["final_layer"] == 5 * (64 + 64) * 4
    assert all(isinstance(b.img_attn_qkv, LoraLinear) for b in model.double_blocks)


# --- image-to-video DiTs: both conditioning types ----------------------------------------------

I2V = {"token_replace": DIT_CONFIGS["tiny-i2v-16ch"], "latent_concat": DIT_CONFIGS["tiny-i2v-33ch"]}
TENCENT_PREFIX = "Hunyuan_video_I2V_lora_"  # Tencent's I2V LoRA training output (kohya layout, alpha = rank)


@pytest.fixture(scope="module", params=list(I2V))
def i2v(request):
    """(config, random weights) of one conditioning type's tiny DiT."""
    config = I2V[request.param]
    model = HunyuanVideoDiT(config).eval()
    randomize_(model, seed=2)
    return config, model.state_dict()


def run_i2v(model, config):
    """A forward of either implementation on 33 or 16 input channels (no guidance for latent_concat)."""
    x, t, text, mask, pooled, guidance = parity_inputs(config, 1, frames=3, height=6, width=10, text_len=12, valid=[9])
    guidance = guidance if config.guidance_embed else None
    with torch.no_grad():
        if isinstance(model, HunyuanVideoDiT):
            return model(x, t, text, mask, pooled, guidance)
        return model(x, t, text, mask, pooled, guidance, return_dict=False)[0]


def i2v_model(config, weights, loras=()):
    model = HunyuanVideoDiT(config).eval()
    model.load_state_dict(weights)
    apply_loras(model, list(loras))
    return model


def img_in_lora(seed, channels, rank=3, key="transformer.x_embedder.proj", down="lora_A", up="lora_B") -> dict:
    """A LoRA on img_in's patch convolution as PEFT (default) or kohya stores it: convolution factors
    down [r, C, 1, 2, 2], up [64, r, 1, 1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    down_w, up_w = lora_pair(gen, 64, channels * 4, rank)
    return {f"{key}.{down}.weight": down_w.reshape(rank, channels, 1, 2, 2), f"{key}.{up}.weight": up_w.reshape(64, rank, 1, 1, 1)}


def test_t2v_lora_on_i2v_dits_matches_diffusers(i2v, tmp_path):
    """A musubi-tuner (text-to-video) LoRA on every block linear: the I2V DiTs have those linears at
    the same shapes, so it applies as on text-to-video (diffusers' I2V transformer + PEFT the oracle)."""
    config, weights = i2v
    sd = kohya_lora(14, BLOCK_LINEARS)
    expected_model = diffusers_transformer(config, weights)
    load_lora(expected_model, musubi_to_official_names(sd), config.hidden_size, "k")
    got = run_i2v(i2v_model(config, weights, [LoraSpec(write(tmp_path, "k.safetensors", sd))]), config)
    assert max_rel_err(got, run_i2v(i2v_model(config, weights), config)) > 1e-2  # the LoRA matters
    assert max_rel_err(got, run_i2v(expected_model, config)) <= TOL


def test_tencent_i2v_format_reads_as_kohya(i2v, tmp_path):
    """Tencent's `Hunyuan_video_I2V_lora_<module>` keys are kohya's with another prefix: the same
    tensors give the same output bit for bit (alpha = rank, as its trainer writes)."""
    config, weights = i2v
    kohya = kohya_lora(15, BLOCK_LINEARS + ["txt_in.individual_token_refiner.blocks.0.mlp.fc1"], alpha=4.0)
    tencent = {TENCENT_PREFIX + k.removeprefix("lora_unet_"): v for k, v in kohya.items()}
    a, b = write(tmp_path, "k.safetensors", kohya), write(tmp_path, "embrace_kohaya_weights.safetensors", tencent)
    assert torch.equal(run_i2v(i2v_model(config, weights, [LoraSpec(a)]), config),
                       run_i2v(i2v_model(config, weights, [LoraSpec(b)]), config))


def test_img_in_lora_on_the_33_channel_dit_matches_diffusers(tmp_path):
    """latent_concat: a LoRA with an img_in (x_embedder) entry at 33 channels, PEFT's Conv3d factors,
    beside a block linear; kohya's names for the same tensors read the same."""
    config = I2V["latent_concat"]
    model = HunyuanVideoDiT(config).eval()
    randomize_(model, seed=3)
    weights = model.state_dict()
    sd = {**img_in_lora(16, 33), **diffusers_lora(17, ["transformer_blocks.0.attn.to_q"])}
    expected_model = diffusers_transformer(config, weights)
    load_lora(expected_model, sd, config.hidden_size, "x")
    got_model = i2v_model(config, weights, [LoraSpec(write(tmp_path, "x.safetensors", sd))])
    assert type(got_model.img_in.proj).__name__ == "LoraPatchConv" and got_model.compute_dtype == torch.float32
    got = run_i2v(got_model, config)
    img_in_only = run_i2v(i2v_model(config, weights, [LoraSpec(write(tmp_path, "i.safetensors", img_in_lora(16, 33)))]), config)
    assert max_rel_err(img_in_only, run_i2v(i2v_model(config, weights), config)) > 1e-2  # img_in's LoRA matters
    assert max_rel_err(got, run_i2v(expected_model, config)) <= TOL
    kohya = img_in_lora(16, 33, key="lora_unet_img_in_proj", down="lora_down", up="lora_up")
    assert torch.equal(run_i2v(i2v_model(config, weights, [LoraSpec(write(tmp_path, "k.safetensors", kohya))]), config), img_in_only)
    sizes, done = lora_bytes([LoraSpec(tmp_path / "i.safetensors")], config, dtype_bytes=4), apply_loras(HunyuanVideoDiT(config), [LoraSpec(tmp_path / "i.safetensors")])
    assert sizes.trunk == done["bytes"] == 3 * (33 * 4 + 64) * 4  # rank 3, float32: down and up


@pytest.mark.parametrize("lora_channels,dit", [(16, "latent_concat"), (33, "token_replace")])
def test_img_in_lora_of_another_width_is_one_line_error(tmp_path, lora_channels, dit):
    """A 16-channel img_in LoRA (text-to-video or token_replace) cannot apply to the 33-channel
    latent_concat DiT, nor the reverse: refused before any weight is read, one line naming why."""
    path = write(tmp_path, "w.safetensors", img_in_lora(18, lora_channels))
    channels = I2V[dit].in_channels
    with pytest.raises(HyVideoError) as error:
        lora_bytes([LoraSpec(path)], I2V[dit])
    message = str(error.value)
    assert f"x_embedder.proj (made for a DiT with {lora_channels} input channels; this one has {channels})" in message
    assert str(path) in message and "\n" not in message


def test_t2v_lora_touching_guidance_in_is_refused_on_latent_concat(tmp_path):
    """The latent_concat DiT has no guidance_in: a T2V LoRA on it is refused naming the key, not
    silently applied without it."""
    sd = diffusers_lora(19, ["time_text_embed.guidance_embedder.linear_1", "transformer_blocks.0.attn.to_q"])
    with pytest.raises(HyVideoError, match="guidance_embedder.linear_1.lora_A.weight \\(names no linear of this model\\)"):
        lora_bytes([LoraSpec(write(tmp_path, "g.safetensors", sd))], I2V["latent_concat"])
    assert lora_bytes([LoraSpec(tmp_path / "g.safetensors")], I2V["token_replace"]).trunk > 0  # token_replace has it


# --- every weight format, resident and streamed ----------------------------------------------


def fp8(model):
    swap_linears_fp8(model)
    return model


def int8(model):
    quantize_int8(model)
    return model


@pytest.mark.parametrize("quantize", [None, fp8, int8], ids=["fp32", "fp8", "int8"])
@pytest.mark.slow
def test_streamed_blocks_with_lora_equal_resident(weights, tmp_path, quantize):
    """LoRA on quantized weights (wrapped after quantizing: nothing re-quantized), streamed through
    the ring = resident, bit for bit; a LoRA on some blocks only still gives one ring per kind."""
    path = write(tmp_path, "k.safetensors", kohya_lora(8, ["double_blocks.1.img_attn_qkv", "double_blocks.1.txt_mlp.fc2",
                                                              "single_blocks.0.linear1", "single_blocks.0.modulation.linear"]))
    models = []
    for _ in range(2):
        model = ours(weights)
        if quantize:
            quantize(model)
        base = run(model)
        apply_loras(model, [LoraSpec(path)])
        models.append(model)
    resident = run(models[0])
    assert max_rel_err(resident, base) > 1e-3
    model = models[1]
    streamer = BlockStreamer(model.all_blocks(), schedule_for(model, resident=1, prefetch_depth=1), "cpu")
    assert len(streamer._rings) == 2  # double and single: the padded blocks share their kind's ring
    streamed = run_steps(model, streamer, INPUTS, 2)
    assert all(torch.equal(out, resident) for out in streamed)


def test_lora_linear_over_fp8_rows_and_held_weights():
    gen = torch.Generator().manual_seed(9)
    base = FP8Linear.from_linear(nn.Linear(64, 448))
    down, up = lora_pair(gen, 448, 64, 6)
    layer, x, rows = LoraLinear(base, down, up), torch.randn(2, 5, 64, generator=gen), slice(192, 448)
    expected = base(x) + (x @ down.T) @ up.T
    with held_weights(layer):
        assert base._hold  # holding reaches the wrapped FP8 layer
        assert torch.equal(layer(x), expected)
        assert torch.equal(layer.forward_rows(x, rows), base.forward_rows(x, rows) + (x @ down.T) @ up[rows].T)
    assert not base._hold


# --- bad input: one line naming the problem ---------------------------------------------------


@pytest.mark.parametrize("sd,message", [
    ({"transformer.transformer_blocks.9.attn.to_q.lora_A.weight": torch.zeros(2, 64),
      "transformer.transformer_blocks.9.attn.to_q.lora_B.weight": torch.zeros(64, 2)}, "names no linear of this model"),
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 64),
      "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(64, 2)}, "do not fit its [192, 64] weight"),
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 64)}, "lora_B/up is missing"),
    ({"double_blocks.0.img_attn_qkv.dora_scale": torch.zeros(1, 64)}, "not a LoRA tensor"),
    ({"img_in.proj.weight": torch.zeros(1)}, "not a LoRA tensor"),
    ({}, "holds no LoRA tensors"),
], ids=["unknown module", "wrong shape", "half a pair", "dora", "a checkpoint", "empty"])
def test_bad_lora_files_are_one_line_errors(tmp_path, sd, message):
    path = write(tmp_path, "bad.safetensors", sd)
    with pytest.raises(HyVideoError) as error:
        lora_bytes([LoraSpec(path)], TINY)
    assert message in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(HyVideoError, match="does not exist"):
        lora_bytes([LoraSpec(tmp_path / "none.safetensors")], TINY)
    (tmp_path / "x.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(HyVideoError, match="safetensors"):
        lora_bytes([LoraSpec(tmp_path / "x.safetensors")], TINY)


def test_many_unknown_keys_are_counted(tmp_path):
    path = write(tmp_path, "many.safetensors", {f"lora_unet_nothing_{i}.lora_down.weight": torch.zeros(1, 1) for i in range(5)})
    with pytest.raises(HyVideoError, match=r"5 key\(s\) not understood: .*nothing_0.*; and 2 more"):
        lora_bytes([LoraSpec(path)], TINY)


@pytest.mark.parametrize("text,path,strength", [
    ("style.safetensors", "style.safetensors", 1.0),
    ("style.safetensors:0.8", "style.safetensors", 0.8),
    ("a:b/style.safetensors:-1.5", "a:b/style.safetensors", -1.5),
    ("C:/loras/x.safetensors", "C:/loras/x.safetensors", 1.0),
    ("x.safetensors:1e-1", "x.safetensors", 0.1),
    ("x.safetensors:", "x.safetensors:", 1.0),
])
def test_lora_option_parsing(text, path, strength):
    spec = LoraSpec.parse(text)
    assert str(spec.path) == path and spec.strength == strength


# --- runs: recorded, resumed only with the same files, never re-quantized ---------------------


def test_plan_counts_lora_bytes_in_blocks_and_trunk():
    profile = load_profile("16gb")
    lora = LoraBytes(double_block=3_000_000, single_block=1_000_000, trunk=500_000)
    base, with_lora = plan(profile, 1280, 720, 129), plan(profile, 1280, 720, 129, lora_bytes=lora)
    kinds = with_lora.schedule.kinds
    assert [b - a for a, b in zip(base.schedule.block_bytes, with_lora.schedule.block_bytes)] == [lora.block(k) for k in kinds]
    assert with_lora.stages["dit"].parts["lora (trunk)"] == lora.trunk
    assert with_lora.stages["dit"].ram_parts["lora"] == lora.total(with_lora.dit_config)


@pytest.mark.slow
def test_run_records_the_lora_and_resume_refuses_a_changed_file(tiny_official, tmp_path):
    path = write(tmp_path, "style.safetensors", kohya_lora(10, BLOCK_LINEARS))
    request = dataclasses.replace(REQUEST, steps=2)
    whole = execute(*new_run(tiny_official, tmp_path / "runs", request, loras=[LoraSpec(path, 0.8)]))
    assert whole.settings["loras"] == [{"path": str(path.resolve()), "strength": 0.8,
                                        "fingerprint": whole.settings["loras"][0]["fingerprint"]}]
    assert whole.settings["loras"][0]["fingerprint"]["size"] == path.stat().st_size
    assert whole.stats["lora"]["linears"] == len(BLOCK_LINEARS)

    run, files, found = new_run(tiny_official, tmp_path / "runs", request, loras=[LoraSpec(path, 0.8)])
    stop = StopRequest()
    with pytest.raises(RunInterrupted):
        execute(run, files, found, StopAfter(stop, 1), stop)
    original, stamp = path.read_bytes(), path.stat().st_mtime_ns
    save_file(kohya_lora(11, BLOCK_LINEARS), path)
    with pytest.raises(HyVideoError, match="with another LoRA: style.safetensors"):
        resume_run(tmp_path / "runs", run.id)
    path.unlink()
    with pytest.raises(HyVideoError, match="is no longer there"):
        resume_run(tmp_path / "runs", run.id)
    path.write_bytes(original)
    os.utime(path, ns=(stamp, stamp))
    resumed = resume_run(tmp_path / "runs", run.id)
    assert torch.equal(load_file(resumed.final_latents)["latents"], load_file(whole.final_latents)["latents"])


@pytest.mark.slow
def test_cli_lora_option_and_switching_lora_keeps_the_quantized_cache(tiny_official, tmp_path):
    """`generate --lora PATH:0.5` on an FP8 profile: recorded, and another LoRA (or strength) loads
    the same quantize-once cache without rewriting it."""
    model, cache = shutil.copytree(tiny_official, tmp_path / "model"), tmp_path / "cache"
    a = write(tmp_path, "a.safetensors", kohya_lora(12, BLOCK_LINEARS))
    b = write(tmp_path, "b:c.safetensors", diffusers_lora(13, list(DIFFUSERS_SHAPES)[:20]))
    common = ["--model-dir", model, "--runs-dir", tmp_path / "runs", "--profile", "16gb", "--cache-dir", cache, "--json", *TINY_ARGS]
    first = invoke("generate", "a fox", "--lora", f"{a}:0.5", *common)
    assert first.exit_code == 0, first.output
    assert [(e["path"], e["strength"]) for e in as_json(first)["settings"]["loras"]] == [(str(a), 0.5)]
    weights = next(cache.glob("dit-*.safetensors"))
    stamp = weights.stat().st_mtime_ns
    second = invoke("generate", "a fox", "--lora", b, "--lora", f"{a}:-1", *common)
    assert second.exit_code == 0, second.output
    assert [(e["path"], e["strength"]) for e in as_json(second)["settings"]["loras"]] == [(str(b), 1.0), (str(a), -1.0)]
    assert weights.stat().st_mtime_ns == stamp
    missing = invoke("generate", "a fox", "--lora", tmp_path / "none.safetensors:0.7", *common)
    assert missing.exit_code == 2 and "none.safetensors does not exist" in one_line_error(missing)
