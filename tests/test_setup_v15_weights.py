"""HunyuanVideo-1.5 weights in the setup commands: `lowvram doctor` on tiny 1.5 folders in both layouts
(every file listed, the 1.5 DiT and VAE checked against the models built from their configs, a 13B
DiT or VAE in a 1.5 place and the reverse named), and `lowvram download --model 1.5-<variant>` in
both layouts from both hubs, with `snapshot_download` replaced by a copy out of a tiny folder."""

import dataclasses
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hyvideo.errors import HyVideoError
from lowvram.setup import download as dl
from lowvram.setup.model_folder import check_model_folder
from lowvram.setup.doctor import weight_checks
from lowvram.setup.synthetic_checkpoint import write_synthetic_checkpoint
from lowvram.setup.synthetic_v15 import SIZES, write_v15_checkpoint
from tests.helpers import as_json, invoke, one_line_error
from tests.test_setup_weight_contents import copy, dry_run_listing, fake_snapshot, problems
from tests.tiny_v15_text import write_diffusers_encoders, write_official_encoders

T2V_DIT = "transformer/480p_t2v/diffusion_pytorch_model.safetensors"
I2V_DIT = "transformer/480p_i2v/diffusion_pytorch_model.safetensors"
VAE = "vae/diffusion_pytorch_model.safetensors"
GLYPH = "text_encoder/Glyph-SDXL-v2/checkpoints/byt5_model.pt"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny 1.5 folders with real tiny encoders, each file as the release names it (one DiT file
    per transformer; google/byt5-small's pytorch_model.bin): Tencent's ckpts/ holding a text- and an
    image-to-video transformer, the diffusers text-to-video folder, and a 13B diffusers folder for swaps."""
    root = tmp_path_factory.mktemp("v15")
    official = root / "official"
    for size in ("tiny", "tiny-i2v"):
        write_v15_checkpoint(official, "official", dataclasses.replace(SIZES[size], shard_bytes=10**9))
    write_official_encoders(official)
    byt5 = official / "text_encoder/byt5-small"
    torch.save(load_file(byt5 / "model.safetensors"), byt5 / "pytorch_model.bin")
    (byt5 / "model.safetensors").unlink()
    diffusers = write_v15_checkpoint(root / "diffusers", "diffusers", dataclasses.replace(SIZES["tiny"], shard_bytes=10**9))
    write_diffusers_encoders(diffusers)
    shutil.rmtree(diffusers / "image_encoder")  # text-to-video: no SigLIP, as the real repo
    shutil.rmtree(diffusers / "feature_extractor")
    return {"official": official, "diffusers": diffusers, "13b": write_synthetic_checkpoint(root / "13b", "diffusers", "tiny")}


def test_tiny_v15_folders_pass_the_doctor(folders):
    for layout, root in (("official", folders["official"]), ("diffusers", folders["diffusers"])):
        found, checks = check_model_folder(root)
        names = {c.path.relative_to(root).as_posix() for c in checks}
        assert found == layout and all(c.ok for c in checks), [c for c in checks if not c.ok]
        summary = weight_checks(root)[0][0]
        assert summary.status == "ok" and f"{layout} layout" in summary.detail
    official = {c.path.relative_to(folders["official"]).as_posix() for c in check_model_folder(folders["official"])[1]}
    assert {T2V_DIT, I2V_DIT, "transformer/480p_i2v/config.json", VAE, "text_encoder/llm/config.json", GLYPH,
            "text_encoder/byt5-small/pytorch_model.bin", "text_encoder/byt5-small/tokenizer_config.json",
            "text_encoder/Glyph-SDXL-v2/assets/color_idx.json", "vision_encoder/siglip/image_encoder/model.safetensors",
            "vision_encoder/siglip/feature_extractor/preprocessor_config.json"} <= official
    assert {"transformer/config.json", "guider/guider_config.json", "text_encoder_2/config.json",
            "tokenizer_2/tokenizer_config.json"} <= names  # the diffusers folder's (last in the loop)
    assert not any(n.startswith("image_encoder") for n in names)


def test_a_13b_dit_or_vae_in_a_v15_place_and_the_reverse_are_named(folders, tmp_path):
    official, other = copy(folders, "official", tmp_path), folders["13b"]
    dit_13b = {k: v for shard in sorted((other / "transformer").glob("*.safetensors")) for k, v in load_file(shard).items()}
    save_file(dit_13b, official / T2V_DIT)
    shutil.copy(other / VAE, official / VAE)
    found = problems(official)
    assert found == {
        T2V_DIT: "this is a 16-channel HunyuanVideo DiT (text-to-video, or the I2V token_replace DiT: the same names and "
                 "shapes); the HunyuanVideo-1.5 480p_t2v DiT belongs here",
        VAE: "this is the HunyuanVideo VAE; the HunyuanVideo-1.5 VAE belongs here"}
    assert problems(folders["official"]) == {}  # the swap did it
    model_13b = copy(folders, "13b", tmp_path)
    for path in (model_13b / "transformer").glob("*.safetensors*"):
        path.unlink()
    shutil.copy(folders["diffusers"] / "transformer/diffusion_pytorch_model.safetensors", model_13b / "transformer")
    shutil.copy(folders["diffusers"] / VAE, model_13b / VAE)
    found = problems(model_13b)
    assert found["transformer/diffusion_pytorch_model.safetensors"] == ("this is a HunyuanVideo-1.5 DiT (8.3B: byT5 glyph and condition-type "
                                                       "embeddings); the text-to-video DiT belongs here")
    assert found[VAE] == "this is the HunyuanVideo-1.5 VAE (32 latent channels); the HunyuanVideo VAE belongs here"


def test_13b_text_encoders_in_v15_places_are_named(folders, tmp_path):
    """The 13B release's Llama where Qwen2.5-VL belongs, its CLIP where byT5 belongs; Tencent's
    whole Qwen2.5-VL and diffusers' language model alone both pass (test above)."""
    diffusers = copy(folders, "diffusers", tmp_path)
    for folder in ("text_encoder", "text_encoder_2"):
        shutil.rmtree(diffusers / folder)
        shutil.copytree(folders["13b"] / folder, diffusers / folder)
    found = {path.split("/")[0]: problem for path, problem in problems(diffusers).items()}
    assert found == {"text_encoder": "this is a bare Llama language model (no vision tower); HunyuanVideo-1.5 needs "
                                     "Qwen2.5-VL-7B-Instruct (or its language model) here",
                     "text_encoder_2": "this is CLIP's text model; HunyuanVideo-1.5 needs byT5 here (google/byt5-small, or "
                                       "the diffusers glyph byT5)"}


def test_a_broken_v15_folder_names_the_file(folders, tmp_path):
    """A 1.5 DiT short of a tensor gets the loader's key check (on the index); a truncated glyph
    checkpoint the reader's message; a missing SigLIP file 'missing'; a DiT whose config.json asks
    for MeanFlow (step distilled) lacks its embedder; a diffusers config naming no released
    transformer is named."""
    official = copy(folders, "official", tmp_path)
    state = load_file(official / I2V_DIT)
    del state["double_blocks.1.txt_mlp.fc2.bias"]
    save_file(state, official / I2V_DIT)
    glyph = (official / GLYPH).read_bytes()
    (official / GLYPH).write_bytes(glyph[: len(glyph) // 2])
    (official / "vision_encoder/siglip/image_encoder/model.safetensors").unlink()
    found = problems(official)
    assert set(found) == {I2V_DIT, GLYPH, "vision_encoder/siglip/image_encoder/model.safetensors"}
    assert "1 missing tensor(s), first: double_blocks.1.txt_mlp.fc2.bias" in found[I2V_DIT]
    assert "truncated" in found[GLYPH] or "incomplete" in found[GLYPH], found[GLYPH]
    assert found["vision_encoder/siglip/image_encoder/model.safetensors"] == "missing"
    detail = weight_checks(official)[0][0].detail  # the download that completes it: each transformer in its layout
    assert detail.endswith(f"`lowvram download --model 1.5-480p_i2v --layout official --model-dir {official}` and "
                           f"`lowvram download --model 1.5-480p_t2v --layout official --model-dir {official}`"), detail
    config = official / "transformer/480p_t2v/config.json"
    config.write_text(config.read_text().replace('"use_meanflow": false', '"use_meanflow": true'))
    assert "missing tensor(s), first: time_r_in" in problems(official)[T2V_DIT]
    diffusers = copy(folders, "diffusers", tmp_path)
    config = diffusers / "transformer/config.json"
    config.write_text(config.read_text().replace('"use_meanflow": false', '"use_meanflow": true'))  # no 480p_t2v_step_distilled
    assert "(480p_t2v_step_distilled) this runner does not know" in problems(diffusers)["transformer/config.json"]


# --- download --model 1.5-<variant> --------------------------------------------------------------


def official_sources(root: Path, tencent: str, qwen: str, byt5: str, siglip: str) -> dict[str, Path]:
    return {tencent: root, qwen: root / "text_encoder/llm", byt5: root / "text_encoder/byt5-small",
            dl.GLYPH_REPO: root / "text_encoder/Glyph-SDXL-v2", siglip: root / "vision_encoder/siglip"}


def test_download_v15_official_layout_from_the_hub(folders, tmp_path, monkeypatch):
    """Tencent's checkpoints-download.md: the chosen transformer and the VAE, Qwen2.5-VL into
    text_encoder/llm, byt5-small and Glyph-SDXL-v2 (from ModelScope even here) into text_encoder/,
    FLUX.1-Redux-dev's SigLIP into vision_encoder/siglip for image-to-video."""
    calls, ms_calls = [], []
    sources = official_sources(folders["official"], dl.V15_REPO, dl.QWEN_REPO, dl.BYT5_REPO, dl.SIGLIP_REPO)
    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot(sources, calls))
    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(snapshot_download=fake_snapshot(sources, ms_calls)))
    model_dir = tmp_path / "ckpts"
    planned = dl.plan_download(model_dir, "official", model="1.5-480p_i2v")
    assert {p.file for p in planned} >= {I2V_DIT, VAE, "text_encoder/llm/config.json", GLYPH,
                                         "vision_encoder/siglip/image_encoder/model.safetensors"}
    assert not any("480p_t2v" in p.file for p in planned) and not model_dir.exists()  # one transformer; a dry run writes nothing
    calls.clear()
    dl.download(model_dir, "official", progress=False, model="1.5-480p_i2v")
    assert [(repo, into.relative_to(model_dir).as_posix()) for repo, into, _ in calls] == [
        (dl.V15_REPO, "."), (dl.QWEN_REPO, "text_encoder/llm"), (dl.BYT5_REPO, "text_encoder/byt5-small"),
        (dl.SIGLIP_REPO, "vision_encoder/siglip")]
    assert [repo for repo, _, _ in ms_calls] == [dl.GLYPH_REPO]
    layout, checks = check_model_folder(model_dir)
    assert layout == "official" and all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert dl.official_variants(model_dir) == ["480p_i2v"]
    dl.download(model_dir, "official", progress=False, model="1.5-480p_i2v")
    assert len(ms_calls) == 1  # the ModelScope part is complete: not asked again


def test_download_v15_diffusers_layout_is_one_repo_per_transformer(folders, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("huggingface_hub.snapshot_download",
                        fake_snapshot({"hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v": folders["diffusers"]}, calls))
    dl.download(tmp_path, None, progress=False, model="1.5-480p_t2v")
    assert len(calls) == 1 and "guider/*" in calls[0][2] and "image_encoder/*" not in calls[0][2]
    layout, checks = check_model_folder(tmp_path)
    assert layout == "diffusers" and all(c.ok for c in checks), [c for c in checks if not c.ok]
    i2v = dl.download_parts(None, model="1.5-480p_i2v_step_distilled")
    assert [p.repo for p in i2v] == ["hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_i2v_step_distilled"]
    assert {"image_encoder/*", "feature_extractor/*"} <= set(i2v[0].patterns)


def test_download_v15_from_modelscope(folders, tmp_path, monkeypatch):
    calls = []
    sources = official_sources(folders["official"], dl.MS_V15_REPO, dl.MS_QWEN_REPO, dl.MS_BYT5_REPO, dl.MS_SIGLIP_REPO)
    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(snapshot_download=fake_snapshot(sources, calls)))
    model_dir = tmp_path / "ckpts"
    dl.download(model_dir, None, source="modelscope", model="1.5-480p_t2v")
    assert [repo for repo, _, _ in calls] == [dl.MS_V15_REPO, dl.MS_QWEN_REPO, dl.MS_BYT5_REPO, dl.GLYPH_REPO]
    layout, checks = check_model_folder(model_dir)
    assert layout == "official" and all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert all(p.present for p in dl.plan_download(model_dir, None, source="modelscope", model="1.5-480p_t2v"))
    dl.download(model_dir, None, source="modelscope", model="1.5-480p_t2v")  # every part there: no call
    assert len(calls) == 4


def test_cli_download_v15(monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.snapshot_download", dry_run_listing)
    dry = as_json(invoke("download", "--model", "1.5-720p_i2v", "--layout", "official", "--model-dir", tmp_path, "--dry-run", "--json"))
    assert {f["repo"] for f in dry["files"]} == {dl.V15_REPO, dl.QWEN_REPO, dl.BYT5_REPO, dl.GLYPH_REPO, dl.SIGLIP_REPO}
    assert dry["total_bytes"] is None  # the ModelScope part is not asked for sizes
    for args, message in ((["--model", "1.5-720p_t2v_distilled"], "has not released the HunyuanVideo-1.5 720p_t2v_distilled"),
                          (["--model", "1.5-720p_i2v_distilled_sparse"], "no diffusers conversion of the HunyuanVideo-1.5 720p_i2v"),
                          (["--model", "1.5-480p_t2v", "--source", "modelscope", "--layout", "diffusers"], "official layout only"),
                          (["--model", "1.5-480p_t2v", "--layout", "official", "--fp8"], "--fp8"),
                          (["--model", "1.5-1080p_t2v"], "--model must be one of t2v, i2v, i2v-33ch, 1.5-480p_t2v")):
        result = invoke("download", *args, "--model-dir", tmp_path)
        assert result.exit_code == 2 and message in one_line_error(result), (args, result.output)
    assert "1.5-480p_i2v_step_distilled" in invoke("download", "--help").output

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    result = invoke("download", "--model", "1.5-480p_t2v", "--layout", "official", "--model-dir", tmp_path)
    assert result.exit_code == 2
    assert f"modelscope download --model {dl.GLYPH_REPO} --include \"assets/*\"" in result.stderr
    assert f'hf download {dl.QWEN_REPO} --include "*.json"' in result.stderr


def test_a_missing_modelscope_package_is_one_line(tmp_path, monkeypatch):
    """Glyph-SDXL-v2 comes from ModelScope: without the package the download stops first, saying so."""
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *args, **kwargs: pytest.fail("asked the hub first"))
    monkeypatch.setitem(sys.modules, "modelscope", None)  # import fails
    with pytest.raises(HyVideoError, match="downloading AI-ModelScope/Glyph-SDXL-v2 from ModelScope needs the modelscope package"):
        dl.download(tmp_path, "official", progress=False, model="1.5-480p_t2v")
