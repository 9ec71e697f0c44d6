"""`lowvram doctor` checks what each weight file holds, from its index alone (hyvideo/weight_contents.py,
weight_io.read_weight_index): a pickle that calls a function, a DiT of the other release, a LoRA, a
whole LLaVA or a bare Llama in the wrong place, each named; and `lowvram download --model i2v|i2v-33ch`
(lowvram/setup/download.py) with the hub and ModelScope replaced at `snapshot_download`."""

import os
import shutil
import sys
import types
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hyvideo.checkpoint import OFFICIAL_DIT, OFFICIAL_I2V_DIT, OFFICIAL_I2V_VAE, OFFICIAL_VAE
from hyvideo.errors import HyVideoError
from hyvideo.weight_io import read_torch_file, read_weight_index
from lowvram.setup import download as dl
from lowvram.setup.model_folder import check_model_folder
from lowvram.setup.synthetic_checkpoint import write_synthetic_checkpoint
from tests.helpers import as_json, invoke, one_line_error


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny folders: official ckpts/ with both releases (T2V + the 33-channel I2V DiT), official
    token_replace I2V alone, diffusers token_replace I2V."""
    root = tmp_path_factory.mktemp("contents")
    both = write_synthetic_checkpoint(root / "both", "official", "tiny")
    write_synthetic_checkpoint(both, "official", "tiny-i2v-33ch")
    return {"both": both, "official-i2v": write_synthetic_checkpoint(root / "official-i2v", "official", "tiny-i2v"),
            "diffusers-i2v": write_synthetic_checkpoint(root / "diffusers-i2v", "diffusers", "tiny-i2v")}


def copy(folders, name, tmp_path) -> Path:
    return Path(shutil.copytree(folders[name], tmp_path / name))


def problems(root: Path) -> dict[str, str]:
    layout, checks = check_model_folder(root)
    assert layout
    return {c.path.relative_to(root).as_posix(): c.problem for c in checks if not c.ok}


class CallsOsSystem:
    """Pickles as `os.system(command)`: what a malicious .pt runs under a plain torch.load."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_pickle_that_calls_os_system_fails_the_doctor_and_runs_nothing(folders, tmp_path):
    """The user's case: a ~1 kB torch.save file whose pickle calls os.system, where the T2V DiT
    belongs. The zip reads, so the doctor said ok before; the weights-only unpickler refuses the
    call by name. If anything ran, the payload would have created `marker`."""
    model = copy(folders, "both", tmp_path)
    marker = tmp_path / "executed"
    torch.save(CallsOsSystem(f"touch {marker}"), tmp_path / "m.pt")  # a short archive name, as a small file has
    shutil.move(tmp_path / "m.pt", model / OFFICIAL_DIT)
    assert (model / OFFICIAL_DIT).stat().st_size < 2000
    expected = "is not a weights file: its pickle calls os.system (refused, nothing executed)"
    assert expected in problems(model)[OFFICIAL_DIT]
    with pytest.raises(HyVideoError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        read_torch_file(model / OFFICIAL_DIT)  # generate's reader says the same
    result = invoke("doctor", "--model-dir", model, "--runs-dir", tmp_path / "runs", "--json")
    report = as_json(result)
    weights = next(c for c in report["checks"] if c["name"] == "weights")
    assert result.exit_code == 1 and weights["status"] == "fail" and "os.system" in weights["detail"]
    assert not marker.exists()


def test_the_index_is_names_dtypes_and_shapes_on_the_meta_device(folders, tmp_path):
    index = read_weight_index([folders["both"] / OFFICIAL_I2V_DIT])
    assert all(t.device.type == "meta" for t in index.values())
    assert index["img_in.proj.weight"].shape[1] == 33  # latent_concat: noisy latent | image latent | mask
    assert index.keys() == read_torch_file(folders["both"] / OFFICIAL_I2V_DIT).keys()
    base = torch.zeros(4, 6)
    state = {"fp8": torch.zeros(7, dtype=torch.float8_e4m3fn), "bf16": torch.zeros(3, 5, dtype=torch.bfloat16),
             "slice": base[1:, 2:], "transposed": base.t(), "scalar": torch.tensor(2.5)}  # v3 rebuilds, shared storages
    torch.save(state, tmp_path / "varied.pt")
    save_file({"fp8": state["fp8"], "bf16": state["bf16"]}, tmp_path / "varied.safetensors")
    for path, names in ((tmp_path / "varied.pt", state), (tmp_path / "varied.safetensors", ("fp8", "bf16"))):
        index = read_weight_index([path])
        assert set(index) == set(names)
        assert all((index[k].dtype, index[k].shape) == (state[k].dtype, state[k].shape) for k in names), path.name


def test_a_dit_of_the_other_release_is_named(folders, tmp_path):
    """The two DiTs share a file name. The 33-channel I2V DiT where the T2V DiT belongs is named;
    the 16-channel one is the token_replace I2V DiT's names and shapes, so a T2V DiT in the I2V
    place passes (only the values differ, which the index cannot show)."""
    model = copy(folders, "both", tmp_path)
    assert problems(model) == {}
    t2v, i2v = (model / OFFICIAL_DIT).read_bytes(), (model / OFFICIAL_I2V_DIT).read_bytes()
    (model / OFFICIAL_DIT).write_bytes(i2v)
    (model / OFFICIAL_I2V_DIT).write_bytes(t2v)
    assert problems(model) == {OFFICIAL_DIT: "this is the HunyuanVideo-I2V DiT (33-channel latent_concat); "
                                             "the text-to-video DiT belongs here"}


def test_a_lora_or_a_vae_where_a_dit_belongs_is_named(folders, tmp_path):
    model = copy(folders, "both", tmp_path)
    lora = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 64),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(192, 4)}  # kohya names
    torch.save(lora, model / OFFICIAL_DIT)
    shutil.copy(model / OFFICIAL_VAE / "pytorch_model.pt", model / OFFICIAL_I2V_DIT)
    found = problems(model)
    assert found[OFFICIAL_DIT] == "this is a LoRA (lora_A/lora_down keys), not a DiT; the text-to-video DiT belongs here"
    assert found[OFFICIAL_I2V_DIT] == "this is the HunyuanVideo VAE, not a DiT; the HunyuanVideo-I2V DiT belongs here"
    diffusers = copy(folders, "diffusers-i2v", tmp_path)
    for shard in (diffusers / "transformer").glob("*.safetensors*"):
        shard.unlink()
    save_file({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64),
               "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4)},
              diffusers / "transformer/diffusion_pytorch_model.safetensors")
    assert problems(diffusers) == {"transformer/diffusion_pytorch_model.safetensors":
                                   "this is a LoRA (lora_A/lora_down keys), not a DiT; the HunyuanVideo-I2V DiT belongs here"}


def test_a_dit_is_checked_against_its_config_and_the_model_built_from_it(folders, tmp_path):
    """Diffusers: the weights against transformer/config.json and the folder's kind; a DiT that
    lacks a tensor gets the loader's own message (its key check, run on the index)."""
    diffusers = copy(folders, "diffusers-i2v", tmp_path)
    shutil.rmtree(diffusers / "image_processor")  # the folder now says text-to-video, its config token_replace
    found = problems(diffusers)
    assert sorted(p.split("/")[0] for p in found) == ["text_encoder", "transformer"]  # the LLaVA is out of place too
    assert "as its config.json says, but the folder is text-to-video (no image_processor/)" in found[
        next(p for p in found if p.startswith("transformer/"))]
    official = copy(folders, "official-i2v", tmp_path)
    state = torch.load(official / OFFICIAL_I2V_DIT, weights_only=True)
    del state["module"]["double_blocks.0.img_mlp.fc2.bias"]
    torch.save(state, official / OFFICIAL_I2V_DIT)
    assert "1 missing tensor(s), first: double_blocks.0.img_mlp.fc2.bias" in problems(official)[OFFICIAL_I2V_DIT]


def test_llava_and_llama_in_each_others_place_are_named(folders, tmp_path):
    model = copy(folders, "both", tmp_path)
    llava, llama = model / "text_encoder_i2v", model / "text_encoder"
    shutil.move(llava, tmp_path / "llava")
    shutil.move(llama, llava)
    shutil.move(tmp_path / "llava", llama)
    shutil.copy(llama / "preprocessor_config.json", llava)
    found = {path.split("/")[0]: problem for path, problem in problems(model).items()}
    assert found.keys() == {"text_encoder", "text_encoder_i2v"}
    assert found["text_encoder"].startswith("this is a whole LLaVA (vision tower, projector and Llama); "
                                            "the bare Llama language model belongs here")
    assert found["text_encoder_i2v"].startswith("this is a bare Llama language model (no vision tower); "
                                                "image-to-video needs the whole LLaVA here")
    assert problems(copy(folders, "diffusers-i2v", tmp_path)) == {}  # its text_encoder/ is the LLaVA


# --- download --model i2v / i2v-33ch ---------------------------------------------------------------


class Info:
    def __init__(self, filename, size):
        self.filename, self.file_size, self.will_download = filename, size, True


def fake_snapshot(sources: dict[str, Path], calls: list):
    """`snapshot_download` copying the files of `sources[repo]` that match the patterns (fnmatch, as
    both hubs match them); a dry run lists them."""

    def snapshot_download(repo, local_dir=None, allow_patterns=None, dry_run=False, **kwargs):
        calls.append((repo, Path(local_dir), tuple(allow_patterns)))
        root = sources[repo]
        names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        names = [n for n in names if any(fnmatch(n, pattern) for pattern in allow_patterns)]
        if dry_run:
            return [Info(n, (root / n).stat().st_size) for n in names]
        for name in names:
            (Path(local_dir) / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / name, Path(local_dir) / name)
        return local_dir

    return snapshot_download


def dry_run_listing(repo, local_dir, allow_patterns, dry_run=False, **kwargs):
    """`snapshot_download` for `download --dry-run`: one config.json of 1 kB in every repo asked."""
    assert dry_run
    return [Info("config.json", 1_000)]


def test_download_i2v_official_layout_from_the_hub_is_what_the_doctor_expects(folders, tmp_path, monkeypatch):
    """Tencent's ckpts/README.md: the I2V repo's DiT and VAE, xtuner's whole LLaVA into
    text_encoder_i2v/, openai's CLIP into text_encoder_2/."""
    source, calls = folders["official-i2v"], []
    sources = {dl.OFFICIAL_I2V_REPO: source, dl.LLAVA_REPO: source / "text_encoder_i2v", dl.CLIP_REPO: source / "text_encoder_2"}
    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot(sources, calls))
    model_dir = tmp_path / "ckpts"
    planned = dl.plan_download(model_dir, "official", model="i2v")
    assert {p.file for p in planned} >= {OFFICIAL_I2V_DIT, f"{OFFICIAL_I2V_VAE}/pytorch_model.pt",
                                         "text_encoder_i2v/preprocessor_config.json", "text_encoder_2/config.json"}
    assert not (model_dir / "text_encoder_i2v").exists()  # a dry run writes nothing
    dl.download(model_dir, "official", progress=False, model="i2v")
    assert [(repo, into) for repo, into, _ in calls[-3:]] == [
        (dl.OFFICIAL_I2V_REPO, model_dir), (dl.CLIP_REPO, model_dir / "text_encoder_2"),
        (dl.LLAVA_REPO, model_dir / "text_encoder_i2v")]
    layout, checks = check_model_folder(model_dir)
    assert layout == "official" and all(c.ok for c in checks), [c for c in checks if not c.ok]


def test_download_i2v_diffusers_layout_takes_the_image_processor(folders, tmp_path, monkeypatch):
    calls = []
    sources = {dl.COMMUNITY_I2V_REPOS["i2v"]: folders["diffusers-i2v"]}
    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot(sources, calls))
    dl.download(tmp_path, None, progress=False, model="i2v")
    assert calls[0][0] == "hunyuanvideo-community/HunyuanVideo-I2V" and "image_processor/*" in calls[0][2]
    layout, checks = check_model_folder(tmp_path)
    assert layout == "diffusers" and all(c.ok for c in checks) and (tmp_path / "image_processor/preprocessor_config.json").is_file()
    assert dl.download_parts(None, model="i2v-33ch")[0].repo == "hunyuanvideo-community/HunyuanVideo-I2V-33ch"


def test_download_i2v_from_modelscope_keeps_the_whole_llava(folders, tmp_path, monkeypatch):
    source, calls = folders["official-i2v"], []
    sources = {dl.MS_I2V_REPO: source, dl.MS_LLAVA_REPO: source / "text_encoder_i2v", dl.MS_CLIP_REPO: source / "text_encoder_2"}
    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(snapshot_download=fake_snapshot(sources, calls)))
    model_dir = tmp_path / "ckpts"
    planned = dl.plan_download(model_dir, None, source="modelscope", model="i2v")
    assert not any(p.file == "text_encoder/" for p in planned)  # nothing extracted for I2V
    dl.download(model_dir, None, source="modelscope", model="i2v")
    assert [into for _, into, _ in calls] == [model_dir, model_dir / "text_encoder_2", model_dir / "text_encoder_i2v"]
    layout, checks = check_model_folder(model_dir)
    assert layout == "official" and all(c.ok for c in checks) and not (model_dir / "text_encoder").exists()
    assert all(p.present for p in dl.plan_download(model_dir, None, source="modelscope", model="i2v"))
    dl.download(model_dir, None, source="modelscope", model="i2v")  # every part there: no call
    assert len(calls) == 3


def test_cli_download_model_option(monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.snapshot_download", dry_run_listing)
    dry = as_json(invoke("download", "--model", "i2v", "--layout", "official", "--model-dir", tmp_path, "--dry-run", "--json"))
    assert dry["model"] == "i2v" and {f["repo"] for f in dry["files"]} == {dl.OFFICIAL_I2V_REPO, dl.LLAVA_REPO, dl.CLIP_REPO}
    assert {f["file"] for f in dry["files"]} == {"config.json", "text_encoder_2/config.json", "text_encoder_i2v/config.json"}
    for args, message in ((["--model", "i2v-33ch", "--layout", "official"], "diffusers layout only"),
                          (["--model", "i2v-33ch", "--source", "modelscope"], "diffusers layout only"),
                          (["--model", "i2v", "--layout", "official", "--fp8"], "the I2V release has none"),
                          (["--model", "i2v-64ch"], "--model must be one of t2v, i2v, i2v-33ch")):
        result = invoke("download", *args, "--model-dir", tmp_path)
        assert result.exit_code == 2 and message in one_line_error(result), (args, result.output)

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    result = invoke("download", "--model", "i2v", "--layout", "official", "--model-dir", tmp_path)
    assert result.exit_code == 2
    assert (f'hf download {dl.LLAVA_REPO} --include "*.json" --include "*.safetensors" --local-dir {tmp_path}/text_encoder_i2v'
            in result.stderr)
