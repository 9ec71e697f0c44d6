"""HunyuanVideo-1.5 folders: detection in both layouts, the variant's sampling defaults, choosing
between models and variants, and loading the same weights from either layout."""

import json
import shutil

import pytest
import torch

from hyvideo.checkpoint import find_model_files
from hyvideo.errors import HyVideoError
from hyvideo.v15_checkpoint import ConvertedByGroup, load_v15_dit, load_v15_dit_state_dict, load_v15_vae
from hyvideo.v15_config import V15_DIT_CONFIGS, V15_SAMPLING, V15_VAE_CONFIGS
from lowvram.setup.synthetic_v15 import write_v15_checkpoint


@pytest.fixture(scope="module")
def v15_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("v15")
    return {layout: write_v15_checkpoint(root / layout, layout, "tiny") for layout in ("official", "diffusers")}


def test_both_layouts_detected_with_the_same_weights(v15_folders):
    official, diffusers = (find_model_files(v15_folders[layout]) for layout in ("official", "diffusers"))
    assert (official.layout, diffusers.layout) == ("official", "diffusers")
    assert official.variant == diffusers.variant == "480p_t2v" and official.sampling == V15_SAMPLING["480p_t2v"]
    a, b = load_v15_dit(official, torch.float32), load_v15_dit(diffusers, torch.float32)
    assert a.config == b.config == V15_DIT_CONFIGS["tiny"]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    va, vb = load_v15_vae(official, torch.float32), load_v15_vae(diffusers, torch.float32)
    assert va.config == V15_VAE_CONFIGS["tiny"]
    assert all(torch.equal(x, y) for x, y in zip(va.state_dict().values(), vb.state_dict().values()))


def test_diffusers_folder_loads_in_diffusers(v15_folders):
    """The synthetic diffusers folder is what diffusers itself reads (every key used, none missing)."""
    from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Transformer3DModel

    root = v15_folders["diffusers"]
    theirs = HunyuanVideo15Transformer3DModel.from_pretrained(root / "transformer").state_dict()
    ours = load_v15_dit(find_model_files(root), torch.float32)
    assert sum(t.numel() for t in theirs.values()) == sum(p.numel() for p in ours.parameters())
    AutoencoderKLHunyuanVideo15.from_pretrained(root / "vae")


def test_lazy_view_converts_one_block_at_a_time(v15_folders):
    files = find_model_files(v15_folders["official"])
    state = load_v15_dit_state_dict(files)
    assert isinstance(state, ConvertedByGroup)
    qkv = state["double_blocks.1.img_attn_qkv.weight"]
    assert qkv.shape == state.shapes()["double_blocks.1.img_attn_qkv.weight"]
    state["double_blocks.0.img_mod.linear.weight"]
    assert set(state._cached) == {k for k in state if k.startswith("double_blocks.0.")}  # block 1's tensors were let go


def test_variants_and_models_chosen_by_task_or_option(v15_folders, tmp_path, tiny_official):
    root = tmp_path / "ckpts"
    shutil.copytree(v15_folders["official"], root)
    shutil.copytree(root / "transformer" / "480p_t2v", root / "transformer" / "720p_t2v")
    with pytest.raises(HyVideoError, match="several HunyuanVideo-1.5 t2v transformers.*1.5-480p_t2v, 1.5-720p_t2v"):
        find_model_files(root)
    files = find_model_files(root, model="1.5-720p_t2v")
    assert files.variant == "720p_t2v" and files.sampling.flow_shift == 9.0
    with pytest.raises(HyVideoError, match="no HunyuanVideo-1.5 i2v transformer"):
        find_model_files(root, image_to_video=True)
    shutil.copytree(tiny_official / "hunyuan-video-t2v-720p", root / "hunyuan-video-t2v-720p")
    with pytest.raises(HyVideoError, match="holds HunyuanVideo \\(13B\\) and HunyuanVideo-1.5 weights"):
        find_model_files(root)
    assert find_model_files(root, model="1.5-480p_t2v").family == "hunyuanvideo-1.5"
    for folder in ("text_encoder", "text_encoder_2"):  # the 13B's encoders beside 1.5's text_encoder/llm, byt5-small
        shutil.copytree(tiny_official / folder, root / folder, dirs_exist_ok=True)
    files = find_model_files(root, model="hunyuanvideo")  # not 1.5's official transformer/ read as a diffusers folder
    assert (files.family, files.layout) == ("hunyuanvideo", "official")
    with pytest.raises(HyVideoError, match="--model must be"):
        find_model_files(root, model="2.0")


@pytest.mark.parametrize("meanflow, guidance, task, expected", [
    (False, 6.0, "t2v", "480p_t2v"), (False, 1.0, "t2v", "480p_t2v_distilled"), (True, 1.0, "i2v", "480p_i2v_step_distilled")])
def test_diffusers_variant_from_its_configs(v15_folders, tmp_path, meanflow, guidance, task, expected):
    root = tmp_path / "d"
    shutil.copytree(v15_folders["diffusers"], root)
    config = json.loads((root / "transformer/config.json").read_text())
    (root / "transformer/config.json").write_text(json.dumps({**config, "use_meanflow": meanflow, "task_type": task}))
    (root / "guider/guider_config.json").write_text(json.dumps({"guidance_scale": guidance}))
    if task == "i2v":
        shutil.copytree(root / "text_encoder", root / "image_encoder")  # any config.json: detection only
    files = find_model_files(root, image_to_video=task == "i2v")
    assert files.variant == expected and files.sampling == V15_SAMPLING[expected]
    assert V15_SAMPLING["480p_i2v_step_distilled"].steps == 12  # official PIPELINE_CONFIGS; 8 also recommended
