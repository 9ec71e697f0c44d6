"""Image-to-video weights in both layouts: detection (alone and beside the text-to-video release),
the synthetic folders (tiny written and loaded; full size planned on the meta device)."""

import math
from pathlib import Path

import pytest
import torch

from hyvideo.checkpoint import find_model_files, load_dit, load_vae
from hyvideo.config import DIT_CONFIGS
from lowvram.setup.synthetic_checkpoint import plan_folder, write_synthetic_checkpoint
from lowvram.stages import default_cache_dir, dit_config_for, model_sizes


@pytest.mark.parametrize("layout", ["official", "diffusers"])
@pytest.mark.parametrize("size,kind", [("tiny-i2v", "token_replace"), ("tiny-i2v-33ch", "latent_concat")])
def test_tiny_i2v_folders_are_detected_and_load(tmp_path, layout, size, kind):
    files = find_model_files(write_synthetic_checkpoint(tmp_path / "model", layout, size))
    assert files.image_to_video and (files.image_processor / "preprocessor_config.json").is_file()
    assert dit_config_for(files).image_condition_type == kind
    assert load_dit(files, torch.float32).config.image_condition_type == kind
    assert load_vae(files, torch.float32).encoder is not None
    sizes = model_sizes(files, (64, 96))
    assert [encoder.name for encoder in sizes["text_encoders"]] == ["llm", "vision", "clip"]
    assert sizes["image_size"] == (64, 96)  # the image the text stage encodes: the planner counts it


def test_official_folder_with_both_releases(tmp_path):
    """Tencent's ckpts/ may hold both: text-to-video unless image-to-video is asked for."""
    root = tmp_path / "ckpts"
    write_synthetic_checkpoint(root, "official", "tiny")
    write_synthetic_checkpoint(root, "official", "tiny-i2v")
    assert not find_model_files(root).image_to_video
    i2v = find_model_files(root, image_to_video=True)
    assert i2v.image_to_video and i2v.llm.name == "text_encoder_i2v" and "i2v" in str(i2v.dit_weights[0])
    # each release's quantized DiT in a folder of its own (same cache file names, other weights)
    assert default_cache_dir(i2v) != default_cache_dir(find_model_files(root))


def test_t2v_folder_is_not_i2v(tmp_path):
    files = find_model_files(write_synthetic_checkpoint(tmp_path / "model", "diffusers", "tiny"))
    assert not files.image_to_video and dit_config_for(files).image_condition_type is None


def _params(weight_files, prefix):
    return sum(math.prod(shape) for f in weight_files for name, _, shape in f.layout if name.startswith(prefix))


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_full_size_i2v_shapes(layout):
    """The 13B I2V folders as planned (meta shapes, nothing written): the released DiT's parameter
    counts, LLaVA's vision tower (CLIP-ViT-L/14-336) and projector, the Llama's 128,320-row LM head."""
    for size, dit_name in (("full-i2v", "HYVideo-T/2-I2V-16ch"), ("full-i2v-33ch", "HYVideo-T/2-I2V-33ch")):
        planned = plan_folder(layout, size)
        dit = [f for f in planned.weights if "transformer" in f.path]
        with torch.device("meta"):
            from hyvideo.dit import HunyuanVideoDiT

            expected = sum(p.numel() for p in HunyuanVideoDiT(DIT_CONFIGS[dit_name]).parameters())
        assert sum(math.prod(shape) for f in dit for _, _, shape in f.layout) == expected
        llava = [f for f in planned.weights if f.path.startswith(("text_encoder_i2v/", "text_encoder/"))]
        assert _params(llava, "vision_tower.") == 303_507_456
        assert _params(llava, "multi_modal_projector.") == 20_979_712
        assert _params(llava, "language_model.lm_head.") == 128_320 * 4096
    assert expected == 12_810_991_680  # the 33-channel DiT


def test_plan_counts_the_i2v_text_stage():
    """`lowvram plan --model i2v`: LLaVA's vision tower (0.60 GiB fp16) and the image's VAE encode
    (the whole VAE, 0.46 GiB, and one 256 px tile's activations, 0.18 GiB) in the text stage, whose
    LLM runs 934 positions instead of 351; the DiT reads 144 image states + 252 prompt tokens."""
    from lowvram.generation.preflight import PlanQuery, plan_only
    from lowvram.families import i2v_text_tokens

    def text_parts(model):
        query = PlanQuery(1248, 704, 129, vram_bytes=24 * 2**30, ram_bytes=64 * 2**30, profile="24gb")
        query.model = model
        return plan_only(query).result["stages"]["text"]["parts_gb"]

    t2v, i2v = text_parts("t2v"), text_parts("i2v")
    assert set(i2v) - set(t2v) == {"vision", "image encode"}
    assert i2v["llm"] == t2v["llm"] and i2v["clip"] == t2v["clip"]
    assert round(i2v["vision"] * 2**30) == 2 * (303_507_456 + 20_979_712)
    assert 0.35 < i2v["activations"] < 0.5  # the LLM's 934 positions (0.41 GiB) over the tiled encode's 0.18
    assert (i2v_text_tokens("token_replace"), i2v_text_tokens("latent_concat")) == (396, 540)
    with pytest.raises(Exception, match="--model must be one of t2v, i2v, i2v-33ch"):
        text_parts("i2v-64ch")


def test_doctor_lists_the_i2v_files(tmp_path):
    """`lowvram doctor`'s file list: each release a ckpts/ folder holds, LLaVA's image processor too."""
    from lowvram.setup.model_folder import check_model_folder

    root = tmp_path / "ckpts"
    write_synthetic_checkpoint(root, "official", "tiny-i2v")
    layout, checks = check_model_folder(root)
    names = {str(c.path.relative_to(root)) for c in checks}
    assert layout == "official" and all(c.ok for c in checks)
    assert "text_encoder_i2v/preprocessor_config.json" in names and not any("t2v" in n for n in names)
    write_synthetic_checkpoint(root, "official", "tiny")
    names = {str(c.path.relative_to(root)) for c in check_model_folder(root)[1]}
    assert {"hunyuan-video-t2v-720p/vae/config.json", "hunyuan-video-i2v-720p/vae/config.json", "text_encoder/config.json"} <= names
    diffusers = write_synthetic_checkpoint(tmp_path / "diffusers", "diffusers", "tiny-i2v-33ch")
    assert any(c.path.name == "preprocessor_config.json" and c.ok for c in check_model_folder(diffusers)[1])


def test_quantize_model_i2v_takes_the_i2v_release(tmp_path):
    """`lowvram quantize --model i2v` in a ckpts/ holding both releases builds the I2V DiT's cache
    (without it, text-to-video's, as generate without --image)."""
    from hyvideo.checkpoint import MODEL_13B_I2V
    from lowvram.progress import Reporter
    from lowvram.setup.quantize import quantize_model

    root = tmp_path / "ckpts"
    write_synthetic_checkpoint(root, "official", "tiny")
    write_synthetic_checkpoint(root, "official", "tiny-i2v")
    assert find_model_files(root, model=MODEL_13B_I2V).image_to_video
    result = quantize_model(root, "fp8", "blocks", "dit", None, Reporter(), MODEL_13B_I2V)
    assert result["cache_dir"] == str(default_cache_dir(find_model_files(root, image_to_video=True)))
    assert result["dit"]["found"] == "missing" and Path(result["dit"]["path"]).is_file()
