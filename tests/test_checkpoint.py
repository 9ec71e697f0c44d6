"""Checkpoint loading: both layouts, error cases, and single-copy (mmap + assign) memory."""

import dataclasses
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from hyvideo.checkpoint import OFFICIAL_DIT, find_model_files, infer_dit_config, load_dit, load_vae
from hyvideo.config import DIT_CONFIGS, VAE_CONFIGS
from hyvideo.errors import HyVideoError


def test_layouts_detected_and_configs_recovered(tiny_official, tiny_diffusers):
    official, diffusers = find_model_files(tiny_official), find_model_files(tiny_diffusers)
    assert (official.layout, diffusers.layout) == ("official", "diffusers")
    for files in (official, diffusers):
        assert load_dit(files, torch.float32).config == DIT_CONFIGS["tiny"]
        assert load_vae(files, torch.float32).config == VAE_CONFIGS["tiny"]


def test_both_layouts_give_identical_weights(tiny_official, tiny_diffusers):
    a = load_dit(find_model_files(tiny_official), torch.float32).state_dict()
    b = load_dit(find_model_files(tiny_diffusers), torch.float32).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    va = load_vae(find_model_files(tiny_official), torch.float32).state_dict()
    vb = load_vae(find_model_files(tiny_diffusers), torch.float32).state_dict()
    assert all(torch.equal(va[k], vb[k]) for k in va)


def test_13b_config_inferred_from_shapes():
    with torch.device("meta"):
        from hyvideo.dit import HunyuanVideoDiT

        sd = HunyuanVideoDiT(DIT_CONFIGS["HYVideo-T/2-cfgdistill"]).state_dict()
    assert infer_dit_config(sd) == DIT_CONFIGS["HYVideo-T/2-cfgdistill"]


@pytest.mark.parametrize("name,token_replace", [("HYVideo-T/2-I2V-33ch", False), ("HYVideo-T/2-I2V-16ch", True)])
def test_13b_i2v_config_inferred_from_shapes(name, token_replace):
    """33 input channels name the latent_concat DiT; token_replace has T2V shapes, its folder says it."""
    with torch.device("meta"):
        from hyvideo.dit import HunyuanVideoDiT

        sd = HunyuanVideoDiT(DIT_CONFIGS[name]).state_dict()
    assert infer_dit_config(sd, token_replace=token_replace) == DIT_CONFIGS[name]


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_file_named(tiny_official, tmp_path):
    root = copy_checkpoint(tiny_official, tmp_path / "ckpt")
    (root / "hunyuan-video-t2v-720p/vae/pytorch_model.pt").unlink()
    with pytest.raises(HyVideoError, match=r"1 file\(s\) missing .*vae/pytorch_model.pt.*lowvram download"):
        find_model_files(root)


def test_missing_shard_named(tiny_diffusers, tmp_path):
    root = copy_checkpoint(tiny_diffusers, tmp_path / "ckpt")
    (root / "transformer/diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(HyVideoError, match="00002-of-00002"):
        find_model_files(root)


def test_truncated_file_reported(tiny_official, tmp_path):
    root = copy_checkpoint(tiny_official, tmp_path / "ckpt")
    path = root / OFFICIAL_DIT
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(HyVideoError, match="incomplete or corrupt"):
        load_dit(find_model_files(root))


def test_unexpected_and_misshaped_keys_reported(tiny_official, tmp_path):
    root = copy_checkpoint(tiny_official, tmp_path / "ckpt")
    path = root / OFFICIAL_DIT
    sd = torch.load(path, weights_only=True)["module"]
    sd["double_blocks.0.extra.weight"] = torch.zeros(3)
    torch.save({"module": sd}, path)
    with pytest.raises(HyVideoError, match=r"1 unexpected tensor\(s\), first: double_blocks.0.extra.weight"):
        load_dit(find_model_files(root))
    del sd["double_blocks.0.extra.weight"]
    sd["final_layer.linear.bias"] = torch.zeros(7)
    torch.save({"module": sd}, path)
    with pytest.raises(HyVideoError, match=r"mis-shaped .*final_layer.linear.bias \(7,\) != expected \(64,\)"):
        load_dit(find_model_files(root))
    del sd["final_layer.linear.bias"]
    torch.save({"module": sd}, path)
    with pytest.raises(HyVideoError, match=r"1 missing tensor\(s\), first: final_layer.linear.bias"):
        load_dit(find_model_files(root))


def test_wrong_folder_and_wrong_checkpoint(tiny_official, tmp_path):
    with pytest.raises(HyVideoError, match="does not exist"):
        find_model_files(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HyVideoError, match="neither the official layout"):
        find_model_files(tmp_path / "empty")
    root = copy_checkpoint(tiny_official, tmp_path / "ckpt")
    torch.save({"module": {"model.layers.0.weight": torch.zeros(2)}}, root / OFFICIAL_DIT)  # some other model
    with pytest.raises(HyVideoError, match="not a HunyuanVideo transformer checkpoint"):
        load_dit(find_model_files(root))
    config = root / "hunyuan-video-t2v-720p/vae/config.json"
    config.write_text(config.read_text()[:20])  # truncated JSON
    with pytest.raises(HyVideoError, match="incomplete or corrupt"):
        load_vae(find_model_files(root))


PEAK_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from hyvideo.checkpoint import find_model_files, load_dit

    def peak_rss():  # VmHWM: this process's peak resident set (ru_maxrss would include the parent's)
        line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    files = find_model_files(sys.argv[1])
    before = peak_rss()
    model = load_dit(files, torch.bfloat16)
    touched = sum(float(p.float().sum()) for p in model.parameters())  # fault in every page
    print(json.dumps({"before": before, "after": peak_rss()}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.slow
def test_loading_holds_one_copy(tmp_path):
    """Load a ~140M-parameter bf16 DiT (280 MB file) in a fresh process: the peak RSS growth over
    the file size must stay near 1 (mmap + assign); a loader that builds the model and then copies
    the state dict in would be near 2."""
    from hyvideo.config import DiTConfig
    from lowvram.setup.synthetic_checkpoint import SIZES, write_synthetic_checkpoint

    config = DiTConfig(hidden_size=512, heads=4, double_blocks=8, single_blocks=16, text_states_dim=64, text_states_dim_2=32)
    root = tmp_path / "mid"
    write_synthetic_checkpoint(root, "official", dataclasses.replace(SIZES["tiny"], dit=config, dit_dtype=torch.bfloat16))
    size = (root / OFFICIAL_DIT).stat().st_size
    out = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(root)], capture_output=True, text=True, check=True)
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = (rss["after"] - rss["before"]) / size
    print(f"peak RSS growth while loading: {ratio:.3f} x file size ({size / 1e6:.0f} MB)")
    # Measured ~1.0 (the mapped file pages) plus a few MB of per-parameter float() temporaries.
    assert ratio < 1.3, f"peak RSS growth {ratio:.2f}x the file size"
