"""--rewrite: the instructions and chat the LLM gets, greedy decoding, the rewritten prompt stored in
the run and encoded, resume without rewriting, and the diffusers layout's headless encoder
(hyvideo/prompt_rewrite.py, lowvram/generation/rewrite.py), on the tiny official text encoder (a random
LlamaForCausalLM: its rewrites are gibberish, but deterministic)."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import cli
from hyvideo.errors import HyVideoError
from hyvideo.pipeline import GenerationRequest
from hyvideo.prompt_rewrite import INSTRUCTIONS, chat_input_ids, rewrite_prompt
from lowvram.generation import rewrite as rewrite_module
from lowvram.generation import runner as runner_module
from lowvram.generation.preflight import RunOptions, start_run
from lowvram.generation.runner import RunInterrupted, StopRequest, execute, resume_run
from lowvram.generation.run_folder import Run
from tests.helpers import StopAfter

PROMPT = "a red fox running through snow"
# 32x32, one frame, 2 steps: the smallest run; the rewrite (256 greedy tokens) is most of its time.
REQUEST = GenerationRequest(PROMPT, width=32, height=32, frames=1, steps=2, seed=1)


@pytest.fixture(scope="module")
def llm(tiny_official):
    folder = tiny_official / "text_encoder"
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(folder)


def test_the_chat_holds_the_modes_instructions_and_the_prompt(llm):
    _, tokenizer = llm
    chats = {mode: tokenizer.decode(chat_input_ids(tokenizer, f"  {PROMPT} ", mode)[0]) for mode in INSTRUCTIONS}
    for mode, chat in chats.items():
        # Llama-3's chat format (the tiny tokenizer has no template of its own): system, user, then the answer's header
        assert chat == (f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{INSTRUCTIONS[mode]}<|eot_id|>"
                        f"<|start_header_id|>user<|end_header_id|>\n\n{PROMPT}<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "camera" in INSTRUCTIONS["master"] and "lighting" in INSTRUCTIONS["master"] and "camera" not in INSTRUCTIONS["normal"]
    assert all("same language" in text for text in INSTRUCTIONS.values())
    with pytest.raises(HyVideoError, match="--rewrite must be normal or master"):
        chat_input_ids(tokenizer, PROMPT, "poetic")


def test_rewrite_is_greedy_decoding(llm):
    """The first tokens equal an independent greedy loop (argmax of the logits, one token at a time)."""
    model, tokenizer = llm
    ids = chat_input_ids(tokenizer, PROMPT, "normal")
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = tokenizer.decode(ids[0, -6:], skip_special_tokens=True).strip()
    text = rewrite_prompt(model, tokenizer, PROMPT, "normal", max_new_tokens=6)
    assert text == expected.strip('"').strip() and text
    assert rewrite_prompt(model, tokenizer, PROMPT, "normal", max_new_tokens=6) == text  # deterministic


@pytest.fixture(scope="module")
def rewritten_run(tiny_official, tmp_path_factory):
    """A --rewrite master run on the tiny model, recording what the rewrite and the encoders got."""
    calls = {"rewrite": [], "encode": []}
    real_rewrite, real_encode = rewrite_module.rewrite_prompt, runner_module.encode_prompts

    def spy_rewrite(model, tokenizer, prompt, mode, **kw):
        calls["rewrite"].append((type(model).__name__, tokenizer.decode(chat_input_ids(tokenizer, prompt, mode)[0])))
        return real_rewrite(model, tokenizer, prompt, mode, **kw)

    def spy_encode(llm, clip, prompts, frames, **kw):
        calls["encode"].append(list(prompts))
        return real_encode(llm, clip, prompts, frames, **kw)

    patch = pytest.MonkeyPatch()
    patch.setattr(rewrite_module, "rewrite_prompt", spy_rewrite)
    patch.setattr(runner_module, "encode_prompts", spy_encode)
    runs_dir = tmp_path_factory.mktemp("runs")
    try:
        run, files, plan = start_run(RunOptions(REQUEST, tiny_official, runs_dir, device="cpu", rewrite="master"))
        result = execute(run, files, plan)
    finally:
        patch.undo()
    return result, calls


@pytest.mark.slow
def test_the_run_rewrites_once_with_the_encoder_and_encodes_the_stored_prompt(rewritten_run, llm):
    result, calls = rewritten_run
    manifest = json.loads((Path(result.folder) / "manifest.json").read_text())
    stored = manifest["rewritten_prompt"]["text"]
    assert manifest["settings"]["rewrite"] == {"mode": "master", "model": None} and manifest["settings"]["prompt"] == PROMPT
    assert len(calls["rewrite"]) == 1 and calls["rewrite"][0][0] == "LlamaForCausalLM"  # the encoder, with its LM head
    assert INSTRUCTIONS["master"] in calls["rewrite"][0][1] and f"user<|end_header_id|>\n\n{PROMPT}<|eot_id|>" in calls["rewrite"][0][1]
    assert calls["encode"] == [[stored]] and result.rewritten_prompt == stored
    assert stored == rewrite_prompt(*llm, PROMPT, "master")  # the same greedy answer outside the run


@pytest.mark.slow
def test_resume_reuses_the_rewritten_prompt(tiny_official, tmp_path, rewritten_run, monkeypatch):
    """Stopped after step 1, its embeddings lost: the resume encodes the stored rewrite again, never rewrites."""
    run, files, plan = start_run(RunOptions(REQUEST, tiny_official, tmp_path, device="cpu", rewrite="master"))
    stop = StopRequest()
    with pytest.raises(RunInterrupted):
        execute(run, files, plan, StopAfter(stop, 1), stop)
    (run.folder / "embeddings.safetensors").unlink()

    def no_rewrite(*args, **kwargs):
        raise AssertionError("a resume must reuse the stored rewritten prompt")

    encoded = []
    real_encode = runner_module.encode_prompts
    monkeypatch.setattr(rewrite_module, "rewrite_prompt", no_rewrite)
    monkeypatch.setattr(runner_module, "encode_prompts", lambda llm, clip, prompts, frames, **kw: encoded.append(prompts) or real_encode(llm, clip, prompts, frames, **kw))
    result = resume_run(tmp_path, run.id)
    assert result.state == "done" and encoded == [[rewritten_run[0].rewritten_prompt]]
    manifest = json.loads((run.folder / "manifest.json").read_text())
    manifest["rewritten_prompt"]["text"] = "a hand-edited prompt"
    (run.folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(HyVideoError, match="rewritten prompt .* was changed"):
        Run.open(run.folder)


def test_the_diffusers_encoder_has_no_head_so_rewrite_model_is_asked_for(tiny_diffusers, tiny_official, tmp_path):
    with pytest.raises(HyVideoError, match="has no LM head .*pass --rewrite-model DIR"):
        start_run(RunOptions(REQUEST, tiny_diffusers, tmp_path / "a", device="cpu", rewrite="normal"))
    assert not (tmp_path / "a").exists()  # refused before the run folder
    run, _, _ = start_run(RunOptions(REQUEST, tiny_diffusers, tmp_path / "b", device="cpu", rewrite="normal",
                                     rewrite_model=tiny_official / "text_encoder"))
    assert run.settings["rewrite"]["model"] == str((tiny_official / "text_encoder").resolve())
    with pytest.raises(HyVideoError, match="not a causal language model"):
        start_run(RunOptions(REQUEST, tiny_official, tmp_path / "c", device="cpu", rewrite="normal",
                             rewrite_model=tiny_diffusers / "text_encoder"))
    with pytest.raises(HyVideoError, match="--rewrite-model needs --rewrite"):
        start_run(RunOptions(REQUEST, tiny_official, tmp_path / "d", device="cpu", rewrite_model=tiny_official / "text_encoder"))


@pytest.mark.slow
def test_cli_rewrite_prints_the_prompt_and_generate_reports_it(tiny_official, tiny_diffusers, rewritten_run, tmp_path):
    runner = CliRunner()
    printed = runner.invoke(cli.app, ["rewrite", PROMPT, "--mode", "master", "--model-dir", str(tiny_official), "--device", "cpu"])
    assert printed.exit_code == 0, printed.output
    assert printed.stdout.strip() == rewritten_run[0].rewritten_prompt.strip()
    headless = runner.invoke(cli.app, ["rewrite", PROMPT, "--model-dir", str(tiny_diffusers), "--device", "cpu"])
    assert headless.exit_code == 2 and "--rewrite-model" in headless.stderr
    bad = runner.invoke(cli.app, ["rewrite", PROMPT, "--mode", "poetic", "--model-dir", str(tiny_official)])
    assert bad.exit_code == 2 and "--rewrite must be normal or master" in bad.stderr
    generated = runner.invoke(cli.app, ["generate", PROMPT, "--rewrite", "master", "--model-dir", str(tiny_official), "--runs-dir",
                                        str(tmp_path), "--size", "32x32", "--frames", "1", "--steps", "1", "--device", "cpu"])
    assert generated.exit_code == 0, generated.output
    assert "rewritten prompt: " + rewritten_run[0].rewritten_prompt[:20] in generated.stderr


def test_nf4_rewrite_model_or_its_bf16_fallback(tiny_official):
    """Where the profile runs the encoder in NF4, the rewrite LLM loads through quant/nf4.py: NF4
    linears, or (bitsandbytes cannot run these tiny shapes on the CPU: its kernel wants out
    features in blocks of 32) a warning and the bf16 model on the CPU, never a traceback."""
    from lowvram.progress import Reporter
    from lowvram.generation.rewrite import load_rewriter

    class Warnings(Reporter):
        def __init__(self):
            self.messages = []

        def warn(self, message):
            self.messages.append(message)

    folder, reporter = tiny_official / "text_encoder", Warnings()
    model, tokenizer = load_rewriter(folder, folder, torch.device("cpu"), torch.float32, True, reporter)
    quantized = type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert quantized != bool(reporter.messages)
    assert quantized or ("NF4 unavailable for the rewrite model" in reporter.messages[0] and model.lm_head.weight.dtype == torch.bfloat16)
    assert type(model).__name__ == "LlamaForCausalLM" and rewrite_prompt(model, tokenizer, PROMPT, "normal", max_new_tokens=4)
