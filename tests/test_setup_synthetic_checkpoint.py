"""Synthetic model folders: the tiny ones load through the real loaders in both layouts with the
same weights; the full-size layouts (computed on the meta device, nothing written) have the real
release's tensors and parameter counts."""

import json
import math

import pytest
import torch
from transformers import CLIPTextModel, LlamaModel

from hyvideo.checkpoint import OFFICIAL_DIT, find_model_files, load_dit
from hyvideo.config import DIT_CONFIGS
from hyvideo.diffusers_keys import diffusers_to_official
from hyvideo.dit import HunyuanVideoDiT
from lowvram.setup.synthetic_checkpoint import (
    SIZES, RandomWeights, clip_config, llm_config, meta_layout, plan_folder, write_synthetic_checkpoint,
)
from hyvideo.text_encoder import ClipTextEncoder, LlamaTextEncoder
from lowvram.setup.tiny_tokenizers import build_tiny_clip_tokenizer, build_tiny_llama3_tokenizer
from hyvideo.weight_io import SAFETENSORS_DTYPES, read_torch_file


def text_encoders(root):
    files = find_model_files(root)
    return (LlamaTextEncoder.from_folder(files.llm, dtype=torch.float32, tokenizer_folder=files.llm_tokenizer),
            ClipTextEncoder.from_folder(files.clip, dtype=torch.float32, tokenizer_folder=files.clip_tokenizer))


def test_text_encoders_equal_in_both_layouts(tiny_official, tiny_diffusers):
    """(The DiT and VAE: tests/test_checkpoint.py::test_both_layouts_give_identical_weights.)"""
    for a, b in zip(text_encoders(tiny_official), text_encoders(tiny_diffusers)):
        sa, sb = a.model.state_dict(), b.model.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert a.tokenizer("a red fox")["input_ids"] == b.tokenizer("a red fox")["input_ids"]


def test_any_tensor_regenerates_alone(tiny_official, tiny_diffusers):
    layout = meta_layout(lambda: HunyuanVideoDiT(DIT_CONFIGS["tiny"]), torch.float32)
    weights = RandomWeights("dit", layout, seed=0)
    name, dtype, shape = layout[len(layout) // 2]
    for root in (tiny_official, tiny_diffusers):
        assert torch.equal(load_dit(find_model_files(root), torch.float32).state_dict()[name], weights.tensor(name, dtype, shape))


def test_official_pt_is_a_plain_torch_file(tiny_official):
    path = tiny_official / OFFICIAL_DIT
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == ["module"]
    ours = read_torch_file(path)
    assert loaded["module"].keys() == ours.keys() and all(torch.equal(loaded["module"][k], ours[k]) for k in ours)


def test_safetensors_tensors_are_aligned(tiny_official, tiny_diffusers):
    """Every tensor of a multiple of 64 bytes starts 64-byte aligned in the file (so in the read-only
    mapping), every other one at a multiple of its element size (hyvideo/weight_io.py)."""
    files = [*tiny_official.rglob("*.safetensors"), *tiny_diffusers.rglob("*.safetensors")]
    assert len(files) == 2 + 5  # official: 2 text encoders; diffusers: 2 DiT shards, VAE, 2 text encoders
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    for path in files:
        data = path.read_bytes()
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
        header.pop("__metadata__")
        for name, entry in header.items():
            start, end = (8 + header_len + offset for offset in entry["data_offsets"])
            alignment = 64 if (end - start) % 64 == 0 else names[entry["dtype"]].itemsize
            assert start % alignment == 0, (path, name)


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_other_tools_load_the_folders_with_no_unexpected_keys(tiny_official, tiny_diffusers, layout):
    """transformers and diffusers load every safetensors model we write (text encoders; in the
    diffusers layout also the transformer and the VAE) with no missing or unexpected key. The tiny
    official folder is what `lowvram demo --save-model` writes."""
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel
    from transformers import LlamaForCausalLM

    root = tiny_official if layout == "official" else tiny_diffusers
    models = {"text_encoder": LlamaForCausalLM if layout == "official" else LlamaModel, "text_encoder_2": CLIPTextModel}
    if layout == "diffusers":
        models |= {"transformer": HunyuanVideoTransformer3DModel, "vae": AutoencoderKLHunyuanVideo}
    for folder, model_class in models.items():
        _, info = model_class.from_pretrained(root / folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (folder, info)


def test_progress_is_reported(tmp_path):
    calls = []
    write_synthetic_checkpoint(tmp_path, "official", "tiny", on_progress=lambda done, total: calls.append((done, total)))
    total = sum(f.nbytes for f in plan_folder("official", "tiny").weights)
    assert calls[-1] == (total, total) and all(a[0] < b[0] for a, b in zip(calls, calls[1:]))


# --- full size, layouts only ---------------------------------------------------------------------


def official_13b_shapes() -> dict:
    """Facts §1.12, written out independently of the model code."""
    h, mlp, head = 3072, 12288, 128
    shapes = {"img_in.proj.weight": (h, 16, 1, 2, 2), "img_in.proj.bias": (h,)}

    def linear(name, out, inp):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp), (out,)

    linear("txt_in.input_embedder", h, 4096)
    for prefix in ("txt_in.t_embedder", "time_in", "guidance_in"):
        linear(f"{prefix}.mlp.0", h, 256)
        linear(f"{prefix}.mlp.2", h, h)
    linear("txt_in.c_embedder.linear_1", h, 4096)
    linear("txt_in.c_embedder.linear_2", h, h)
    for n in range(2):
        block = f"txt_in.individual_token_refiner.blocks.{n}"
        for norm in ("norm1", "norm2"):
            shapes[f"{block}.{norm}.weight"] = shapes[f"{block}.{norm}.bias"] = (h,)
        linear(f"{block}.self_attn_qkv", 3 * h, h)
        linear(f"{block}.self_attn_proj", h, h)
        linear(f"{block}.mlp.fc1", mlp, h)
        linear(f"{block}.mlp.fc2", h, mlp)
        linear(f"{block}.adaLN_modulation.1", 2 * h, h)
    linear("vector_in.in_layer", h, 768)
    linear("vector_in.out_layer", h, h)
    for n in range(20):
        for stream in ("img", "txt"):
            block = f"double_blocks.{n}.{stream}"
            linear(f"{block}_mod.linear", 6 * h, h)
            linear(f"{block}_attn_qkv", 3 * h, h)
            shapes[f"{block}_attn_q_norm.weight"] = shapes[f"{block}_attn_k_norm.weight"] = (head,)
            linear(f"{block}_attn_proj", h, h)
            linear(f"{block}_mlp.fc1", mlp, h)
            linear(f"{block}_mlp.fc2", h, mlp)
    for n in range(40):
        block = f"single_blocks.{n}"
        linear(f"{block}.linear1", 3 * h + mlp, h)
        linear(f"{block}.linear2", h, h + mlp)
        shapes[f"{block}.q_norm.weight"] = shapes[f"{block}.k_norm.weight"] = (head,)
        linear(f"{block}.modulation.linear", 3 * h, h)
    linear("final_layer.linear", 64, h)
    linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return shapes


@pytest.fixture(scope="module")
def full_plans():
    return {layout: plan_folder(layout, "full") for layout in ("official", "diffusers")}


def test_full_dit_is_the_13b_release(full_plans):
    dit = next(f for f in full_plans["official"].weights if f.path == OFFICIAL_DIT)
    assert dit.under == "module"
    assert {name: shape for name, _, shape in dit.layout} == official_13b_shapes()
    assert len(dit.layout) == 856 and {dtype for _, dtype, _ in dit.layout} == {torch.bfloat16}
    assert sum(math.prod(shape) for _, _, shape in dit.layout) == 12_821_012_544  # facts §1.1
    assert dit.nbytes == 25_642_025_088  # tensor bytes; torch.save adds ~0.3 MB of zip and pickle


def test_full_diffusers_transformer_maps_back_to_the_13b_release(full_plans):
    plan = full_plans["diffusers"]
    shards = [f for f in plan.weights if f.path.startswith("transformer/")]
    assert len(shards) == 6 and all(f.nbytes <= 5 * 10**9 for f in shards)  # HF's 5 GB shards: 25.6 GB -> 6
    index = plan.json_files["transformer/diffusion_pytorch_model.safetensors.index.json"]
    assert index["metadata"]["total_size"] == 25_642_025_088
    diffusers_sd = {name: torch.empty(shape, device="meta") for f in shards for name, _, shape in f.layout}
    assert index["weight_map"].keys() == diffusers_sd.keys()
    official, missing, unused = diffusers_to_official(diffusers_sd, list(official_13b_shapes()))
    assert missing == [] and unused == []
    assert {k: tuple(v.shape) for k, v in official.items()} == official_13b_shapes()


def test_full_text_encoders_are_llama3_8b_and_clip_l(full_plans):
    """Parameter counts checked against transformers' own models built from the same configs, and
    against the known sizes: Llama-3-8B without its LM head 7,504,924,672; CLIP-L's text model 123,060,480."""
    size = SIZES["full"]
    for layout in ("official", "diffusers"):
        plan = full_plans[layout]
        llm = [e for f in plan.weights if f.path.startswith("text_encoder/") for e in f.layout]
        clip = [e for f in plan.weights if f.path.startswith("text_encoder_2/") for e in f.layout]
        base = sum(math.prod(shape) for name, _, shape in llm if not name.startswith("lm_head."))
        assert base == 7_504_924_672
        shapes = dict((n, s) for n, _, s in llm)
        if layout == "official":  # a LlamaForCausalLM, untied (the head --rewrite generates with)
            assert shapes["lm_head.weight"] == (128256, 4096) and "model.embed_tokens.weight" in shapes
        else:  # diffusers: a LlamaModel, headless, without the "model." prefix
            assert "embed_tokens.weight" in shapes and not any(n.startswith(("lm_head", "model.")) for n in shapes)
        assert sum(math.prod(shape) for _, _, shape in clip) == 123_060_480
        assert {dtype for _, dtype, _ in llm + clip} == {torch.float16}
        config = plan.json_files["text_encoder/config.json"]
        assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (4096, 32, 8)
    with torch.device("meta"):
        assert sum(p.numel() for p in LlamaModel(llm_config(size, build_tiny_llama3_tokenizer())).parameters()) == 7_504_924_672
        assert sum(p.numel() for p in CLIPTextModel(clip_config(size, build_tiny_clip_tokenizer())).parameters()) == 123_060_480


def test_official_fp8_layout_is_tencents_pair_of_the_same_weights(tmp_path):
    """"official-fp8" writes Tencent's FP8 pair instead of the bf16 .pt: the block linears are the
    same draw rounded to e4m3 (relative error ~2.6 %, e4m3's 3 mantissa bits), the rest identical."""
    import torch

    from hyvideo.checkpoint import find_model_files, load_dit
    from lowvram.stages import dit_config_for
    from quant.tencent_fp8 import load_tencent_fp8

    bf16 = find_model_files(write_synthetic_checkpoint(tmp_path / "bf16", "official", "tiny"))
    fp8 = find_model_files(write_synthetic_checkpoint(tmp_path / "fp8", "official-fp8", "tiny"))
    assert fp8.dit_weights == [] and fp8.dit_fp8 is not None and fp8.dit_fp8_map is not None
    model = load_tencent_fp8(fp8.dit_fp8, dit_config_for(fp8), fp8.dit_fp8_map, dtype=torch.float32)
    reference = load_dit(bf16, torch.float32)
    layer, ref = model.single_blocks[0].linear1, reference.single_blocks[0].linear1.weight
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert 0.01 < ((layer.dequantize(torch.float32) - ref).norm() / ref.norm()).item() < 0.04
    assert torch.equal(model.img_in.proj.weight, reference.img_in.proj.weight)


@pytest.mark.cuda
def test_weights_drawn_on_the_gpu_load_like_the_cpu_ones(tmp_path):
    """`lowvram bench` on a GPU draws its random folder there (issue 21, item 1): other values than
    the CPU's generators give, the same names, shapes, dtypes and ranges, written to the host."""
    from quant.tencent_fp8 import load_tencent_fp8
    from lowvram.setup.synthetic_checkpoint import write_plan
    from lowvram.stages import dit_config_for

    cpu = find_model_files(write_synthetic_checkpoint(tmp_path / "cpu", "official-fp8", "tiny"))
    gpu = find_model_files(write_plan(tmp_path / "gpu", plan_folder("official-fp8", "tiny", device="cuda")))
    a = load_tencent_fp8(cpu.dit_fp8, dit_config_for(cpu), cpu.dit_fp8_map, dtype=torch.float32).state_dict()
    b = load_tencent_fp8(gpu.dit_fp8, dit_config_for(gpu), gpu.dit_fp8_map, dtype=torch.float32).state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    weight = "img_in.proj.weight"
    assert not torch.equal(a[weight], b[weight]) and b[weight].abs().max() <= a[weight].abs().max() * 1.01 + 1e-6
