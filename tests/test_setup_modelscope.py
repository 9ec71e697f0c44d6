"""`lowvram download --source modelscope`: the official layout from ModelScope's three repos and the
LLaVA -> text_encoder/ extraction (lowvram/setup/download.py, lowvram/setup/llava.py). The `modelscope`
package is replaced at its boundary (`snapshot_download`) by a fake that copies tiny folders."""

import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

from hyvideo.checkpoint import OFFICIAL_DIT, OFFICIAL_VAE
from hyvideo.errors import HyVideoError
from lowvram.setup.synthetic_checkpoint import SIZES, llm_config
from hyvideo.text_encoder import LlamaTextEncoder
from lowvram.setup.tiny_tokenizers import build_tiny_llama3_tokenizer
from lowvram.setup import download as dl
from lowvram.setup.model_folder import check_model_folder
from lowvram.setup.llava import extract_language_model


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    """A random LLaVA (tiny Llama-3 + tiny CLIP vision tower) saved as the xtuner repo is: a
    LlavaForConditionalGeneration folder with its tokenizer."""
    torch.manual_seed(0)
    tokenizer = build_tiny_llama3_tokenizer()
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14)
    config = LlavaConfig(vision_config=vision, text_config=llm_config(SIZES["tiny"], tokenizer),
                         image_token_id=len(tokenizer) - 1)
    model = LlavaForConditionalGeneration(config).eval()
    folder = tmp_path_factory.mktemp("llava")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


def test_extracted_language_model_keeps_the_head_and_encodes_as_llava(tiny_llava, tmp_path):
    folder, llava = tiny_llava
    out = extract_language_model(folder, tmp_path / "text_encoder")
    assert not (tmp_path / "text_encoder.partial").exists()
    causal, loading = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]  # a standard folder: the model's tensors only
    causal.eval()
    assert torch.equal(causal.lm_head.weight, llava.lm_head.weight)  # the head part 2's rewrite generates with
    encoder = LlamaTextEncoder.from_folder(out, dtype=torch.float32)  # how generate loads text_encoder/ (AutoModel)
    ids = encoder.tokenizer("a red fox running through snow", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = encoder.model(ids, output_hidden_states=True).hidden_states[-3]
        theirs = llava.model.language_model(ids, output_hidden_states=True).hidden_states[-3]
        logits = llava(input_ids=ids).logits
    assert torch.equal(ours, theirs)  # the same weights on the same path: bit-identical on the CPU
    assert torch.equal(causal(ids).logits, logits)
    assert not any("vision" in name or "projector" in name for name, _ in causal.named_parameters())


def test_extraction_streams_sharded_and_torch_file_checkpoints(tiny_llava, tmp_path):
    """The 8B LLaVA is 4 shards; older uploads are torch files. Each is copied tensor by tensor
    from a read-only mapping (no whole model in RAM) and gives LLaVA's own logits."""
    folder, llava = tiny_llava
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        expected = llava(input_ids=ids).logits
    sharded, torch_file = tmp_path / "sharded", tmp_path / "torch-file"
    llava.save_pretrained(sharded, max_shard_size="200KB")
    shutil.copytree(folder, torch_file)
    for weights in torch_file.glob("*.safetensors"):
        weights.unlink()
    torch.save(llava.state_dict(), torch_file / "pytorch_model.bin")
    for source in (sharded, torch_file):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(folder / name, source / name)
        out = extract_language_model(source, tmp_path / f"{source.name}-text_encoder")
        with torch.no_grad():
            assert torch.equal(LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits, expected), source.name
    assert len(list((tmp_path / "sharded-text_encoder").glob("*.safetensors"))) > 1


def test_extraction_of_a_missing_or_broken_checkpoint_says_what(tmp_path):
    with pytest.raises(HyVideoError, match="no LLaVA checkpoint"):
        extract_language_model(tmp_path / "nothing", tmp_path / "text_encoder")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken/config.json").write_text("{")
    with pytest.raises(HyVideoError, match="cannot read the LLaVA checkpoint"):
        extract_language_model(tmp_path / "broken", tmp_path / "text_encoder")


def fake_modelscope(monkeypatch, sources: dict[str, Path], calls: list):
    """`modelscope.snapshot_download` copying the files of `sources[repo]` that match the patterns."""
    from fnmatch import fnmatch

    def snapshot_download(model_id, local_dir=None, allow_patterns=None, **kwargs):
        calls.append((model_id, Path(local_dir), tuple(allow_patterns)))
        root = sources[model_id]
        for path in root.rglob("*"):
            name = path.relative_to(root).as_posix()
            if path.is_file() and any(fnmatch(name, p) for p in allow_patterns):
                (Path(local_dir) / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, Path(local_dir) / name)
        return local_dir

    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(snapshot_download=snapshot_download))


def test_modelscope_download_makes_a_complete_official_folder_and_reruns_offline(tiny_official, tiny_llava, tmp_path, monkeypatch):
    calls = []
    sources = {dl.MS_OFFICIAL_REPO: tiny_official, dl.MS_CLIP_REPO: tiny_official / "text_encoder_2", dl.MS_LLAVA_REPO: tiny_llava[0]}
    fake_modelscope(monkeypatch, sources, calls)
    model_dir = tmp_path / "ckpts"
    dl.download(model_dir, None, source="modelscope")
    assert [(repo, into) for repo, into, _ in calls] == [
        (dl.MS_OFFICIAL_REPO, model_dir), (dl.MS_CLIP_REPO, model_dir / "text_encoder_2"),
        (dl.MS_LLAVA_REPO, model_dir / dl.LLAVA_FOLDER)]
    assert OFFICIAL_DIT in calls[0][2] and f"{OFFICIAL_VAE}/pytorch_model.pt" in calls[0][2]
    layout, checks = check_model_folder(model_dir)
    assert layout == "official" and all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert all(p.present for p in dl.plan_download(model_dir, source="modelscope"))

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'modelscope.cn'")

    shutil.rmtree(model_dir / "text_encoder")
    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(snapshot_download=offline))
    dl.download(model_dir, "official", source="modelscope")  # every part there: no network, only the extraction
    assert check_model_folder(model_dir)[0] == "official" and (model_dir / "text_encoder/config.json").is_file()
    shutil.rmtree(model_dir / dl.LLAVA_FOLDER)  # not needed once text_encoder/ is extracted
    dl.download(model_dir, "official", source="modelscope")


def test_modelscope_without_the_package_or_network_gives_the_manual_commands(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # `import modelscope` raises ImportError
    with pytest.raises(HyVideoError, match=r'needs the modelscope package: pip install "hyvideo-lowvram\[modelscope\]"') as info:
        dl.download(tmp_path, source="modelscope", layout=None)
    message = str(info.value)
    assert f'modelscope download --model {dl.MS_OFFICIAL_REPO} --include "{OFFICIAL_DIT}"' in message
    assert f"--local_dir {tmp_path}/{dl.LLAVA_FOLDER}" in message and f"--local_dir {tmp_path}/text_encoder_2" in message
    assert f"lowvram download --source modelscope --model-dir {tmp_path}" in message

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'modelscope.cn'")

    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(snapshot_download=offline))
    with pytest.raises(HyVideoError, match=r"cannot download from modelscope.cn \(ConnectionError") as info:
        dl.download(tmp_path, source="modelscope", layout=None)
    assert "modelscope download --model" in str(info.value)
    with pytest.raises(HyVideoError, match="official layout only"):
        dl.download_parts("diffusers", source="modelscope")


def test_modelscope_dry_run_lists_repos_without_asking(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # a dry run needs neither the package nor the network
    planned = dl.plan_download(tmp_path, None, fp8=True, source="modelscope")
    assert {p.repo for p in planned} >= {dl.MS_OFFICIAL_REPO, dl.MS_CLIP_REPO, dl.MS_LLAVA_REPO}
    assert all(p.size is None and not p.present for p in planned)
    assert planned[-1].file == "text_encoder/" and any(p.file == dl.OFFICIAL_DIT_FP8 for p in planned)


def test_cli_download_source_modelscope(tiny_official, tiny_llava, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import cli

    def invoke(*args):
        return CliRunner().invoke(cli.app, [str(a) for a in args])

    dry = invoke("download", "--source", "modelscope", "--model-dir", tmp_path, "--dry-run")
    assert dry.exit_code == 0 and dl.MS_LLAVA_REPO in dry.stdout and "sizes unknown" in dry.stdout
    wrong = invoke("download", "--source", "modelscope", "--layout", "diffusers", "--model-dir", tmp_path)
    assert wrong.exit_code == 2 and "official layout only" in wrong.stderr
    sources = {dl.MS_OFFICIAL_REPO: tiny_official, dl.MS_CLIP_REPO: tiny_official / "text_encoder_2", dl.MS_LLAVA_REPO: tiny_llava[0]}
    fake_modelscope(monkeypatch, sources, [])
    done = invoke("download", "--source", "modelscope", "--model-dir", tmp_path / "ckpts")
    assert done.exit_code == 0, done.output
    assert "weights complete" in done.stdout and "official layout" in done.stdout


def test_a_full_clip_checkpoint_serves_as_text_encoder_2(tmp_path):
    """AI-ModelScope/clip-vit-large-patch14 (like openai's) is a whole CLIPModel, text and vision:
    as text_encoder_2/ it loads as the text model alone, with the CLIPModel's own pooled output."""
    from transformers import CLIPConfig, CLIPModel

    from hyvideo.text_encoder import ClipTextEncoder
    from lowvram.setup.tiny_tokenizers import build_tiny_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tiny_clip_tokenizer()
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14}
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    clip.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    encoder = ClipTextEncoder.from_folder(tmp_path, dtype=torch.float32)
    ids = tokenizer(["a red fox running through snow"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(encoder.model(**ids).pooler_output, clip.text_model(**ids).pooler_output)
