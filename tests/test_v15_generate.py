"""`lowvram generate` on HunyuanVideo-1.5 text-to-video weights through the one runner (tiny weights
in Tencent's layout, tiny encoders of tests/tiny_v15_text.py): the transformer's own sampling
defaults, the FP8 DiT streamed under real CFG, the 16x VAE in tiles, a video out; stopped after a
step, or killed as a process, and resumed, the final latents equal an uninterrupted run's; a batch's
clips equal each clip alone; on two CPU ranks (`--gpus 2`) a run equals one process's; a
sparse-attention transformer runs dense and says so."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from hyvideo.errors import HyVideoError
from hyvideo.pipeline import GenerationRequest
from lowvram.generation.preflight import RunOptions, start_run
from lowvram.generation.run_folder import find_run
from lowvram.generation.runner import DEMO_PROFILE, RunInterrupted, StopRequest, execute, resume_run
from lowvram.progress import Reporter
from lowvram.setup.synthetic_v15 import write_v15_checkpoint
from tests.tiny_v15_text import write_official_encoders

PROFILE = dataclasses.replace(DEMO_PROFILE, vae_spatial_tile=8, pin_memory=False)  # 1 of 2 blocks resident, FP8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("v15gen") / "ckpts"
    write_v15_checkpoint(root, "official", "tiny")
    return write_official_encoders(root)


def options(model_dir, runs_dir, **fields) -> RunOptions:
    request = GenerationRequest('a fox with a sign that says "hi"', width=96, height=64, frames=9, seed=5, steps=3)
    return RunOptions(request, model_dir, runs_dir, PROFILE, device="cpu", sampling_given=frozenset({"steps", "frames", "size"}), **fields)


class StopAfterFirstStep(Reporter):
    def __init__(self, stop: StopRequest):
        self.stop = stop

    def advance(self, completed: int, **info) -> None:
        if completed >= 1:
            self.stop.set()


@pytest.mark.slow
def test_generate_and_resume_bit_identical(model_dir, tmp_path):
    run, files, plan = start_run(options(model_dir, tmp_path / "a"))
    assert (run.settings["guidance"], run.settings["flow_shift"], run.settings["model"]) == (6.0, 5.0, "1.5-480p_t2v")  # 480p_t2v's
    assert plan.schedule.forwards_per_step == 2 and plan.profile.step_cache == "off"
    whole = execute(run, files, plan)
    assert whole.state == "done" and whole.video and whole.stats["dit"]["blocks_copied_per_step"] == [1] * 6  # 3 steps x 2 forwards

    run, files, plan = start_run(options(model_dir, tmp_path / "b"))
    stop = StopRequest()
    with pytest.raises(RunInterrupted):
        execute(run, files, plan, StopAfterFirstStep(stop), stop)
    assert find_run(tmp_path / "b", run.id).step == 1
    resumed = resume_run(tmp_path / "b", run.id)
    assert resumed.resumed_from == "step 1/3"
    final = find_run(tmp_path / "b", run.id).load_final()
    assert torch.equal(final, find_run(tmp_path / "a", whole.run_id).load_final())


def test_riflex_is_refused_and_the_trained_length_is_the_default(model_dir, tmp_path):
    """No RIFLEx component is published for 1.5: `--riflex on` is one line; a clip past 1.5's
    trained 121 frames says it may repeat; frames and size not given are 1.5's 121 frames at the
    transformer's own resolution (480p: 848x480 at 16:9), not the 13B's 129 at 1280x720."""
    with pytest.raises(HyVideoError, match="--riflex on: .*none is published for HunyuanVideo-1.5"):
        start_run(dataclasses.replace(options(model_dir, tmp_path / "a"), request=GenerationRequest("a fox", 96, 64, 9, riflex=True)))
    warnings = []

    class Warnings(Reporter):
        def warn(self, message: str) -> None:
            warnings.append(message)

    request = GenerationRequest("a fox", 96, 64, 125, steps=1)
    run, _, _ = start_run(dataclasses.replace(options(model_dir, tmp_path / "b"), request=request), Warnings())
    assert run.settings["frames"] == 125 and any("trained on clips of up to 121 frames" in w for w in warnings)
    run, _, _ = start_run(dataclasses.replace(options(model_dir, tmp_path / "c"), sampling_given=frozenset({"steps"})))
    # 480p_t2v's own bucket at the request's aspect (96x64: 3:2; the CLI's default 1280x720 gives 848x480)
    assert (run.settings["frames"], run.settings["width"], run.settings["height"]) == (121, 768, 512)


def test_a_sparse_transformer_runs_dense_and_says_so(model_dir, tmp_path):
    """No SSTA kernel here (flex-block-attn, H-series GPUs): a `*_sparse` transformer is planned
    with dense attention, and one warning says so."""
    import shutil

    root = tmp_path / "ckpts"
    shutil.copytree(model_dir, root)
    (root / "transformer" / "480p_t2v").rename(root / "transformer" / "720p_t2v_distilled_sparse")
    warnings = []

    class Warnings(Reporter):
        def warn(self, message: str) -> None:
            warnings.append(message)

    run, files, plan = start_run(options(root, tmp_path / "runs"), Warnings())
    assert files.variant == "720p_t2v_distilled_sparse" and run.settings["guidance"] == 1.0
    assert [w for w in warnings if "sparse" in w] == [warnings[0]] and "dense attention" in warnings[0]


CLI_ARGS = ["--size", "96x64", "--frames", "9", "--seed", "5", "--device", "cpu"]


def test_a_batch_equals_each_clip_alone(model_dir, tmp_path):
    """`--prompts` on 1.5 weights: each clip (two prompts, two sizes) bit-identical to the same clip
    run alone."""
    from tests.helpers import as_json, final_latents, invoke

    clips = [('a fox with a sign that says "hi"', "96x64"), ("a quiet lake at dawn", "64x64")]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "size": s}) + "\n" for p, s in clips))
    batch = invoke("generate", "--prompts", prompts, "--model-dir", model_dir, "--runs-dir", tmp_path / "batch", "--json",
                   "--steps", "2", *CLI_ARGS)
    assert batch.exit_code == 0, batch.output
    runs = as_json(batch)["runs"]
    assert [r["settings"]["model"] for r in runs] == ["1.5-480p_t2v"] * 2
    for result, (prompt, size) in zip(runs, clips):
        alone = invoke("generate", prompt, "--model-dir", model_dir, "--runs-dir", tmp_path / "alone", "--json",
                       "--steps", "2", *CLI_ARGS[2:], "--size", size)
        assert alone.exit_code == 0, alone.output
        assert load_file(result["final_latents"])["latents"].equal(final_latents(alone.stdout))


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(model_dir, tmp_path):
    """A 1.5 run killed (SIGKILL, as a process) after a saved step resumes to the uninterrupted
    run's final latents, bit for bit (the CFG pair of each step is checkpointed as one step)."""
    from tests.helpers import final_latents, invoke, killed_after_a_step, uninterrupted_latents

    args = ["--steps", "16", *CLI_ARGS]  # 0.05-0.2 s a step here: a window of a second or more after step 1
    reference = uninterrupted_latents(model_dir, tmp_path / "reference", args)
    runs = tmp_path / "killed"
    killed = killed_after_a_step(runs, model_dir, args)
    assert killed["state"] == "denoising" and 1 <= killed["step"] < 16
    resumed = invoke("resume", "--runs-dir", runs, "--json")
    assert resumed.exit_code == 0, resumed.output
    assert final_latents(resumed.stdout).equal(reference)


@pytest.mark.slow
@pytest.mark.parametrize("cache", [[], ["--cache", "deepcache"]], ids=["no-cache", "deepcache"])
def test_two_ranks_equal_one_process(model_dir, tmp_path, cache):
    """`--gpus 2` on 1.5 weights (two CPU ranks talking gloo, 96x64: a 4 x 6 token grid whose 4
    rows halve): both CFG forwards of every step split across the ranks, the final latents equal
    one process's within the 13B --gpus runs' bound (tests/test_cli_multigpu.py: 1e-4, float32,
    attention summed in another order; a token in the wrong place is ~1e-1). With DeepCache (3
    steps: step 2 runs the last block alone) each rank keeps every rank's image tokens of step 1
    and takes its own share back."""
    pytest.importorskip("yunchang")
    from tests.helpers import uninterrupted_latents

    args = ["--steps", "3", *CLI_ARGS, *cache]
    one = uninterrupted_latents(model_dir, tmp_path / "one", args)
    two = uninterrupted_latents(model_dir, tmp_path / "two", [*args, "--gpus", "2"])
    torch.testing.assert_close(two, one, rtol=0, atol=1e-4)
    assert not two.equal(one)  # the ranks did split the attention (else this would be bit-identical)


def test_a_lora_runs_on_the_streamed_fp8_dit(model_dir, tmp_path):
    """`--lora` on 1.5 weights (musubi's kohya names, q apart from k and v) through the runner: the
    streamed FP8 blocks carry it; strength 0 leaves the run's latents bit-identical to no LoRA,
    strength 1 moves them, and the run records it."""
    from safetensors.torch import save_file

    from hyvideo.lora import LoraSpec

    gen = torch.Generator().manual_seed(6)
    lora = tmp_path / "musubi.safetensors"
    save_file({f"lora_unet_double_blocks_{i}_img_attn_q.lora_{kind}.weight": torch.randn(*shape, generator=gen)
               for i in range(2) for kind, shape in (("down", (4, 64)), ("up", (64, 4)))}, lora)

    def final(runs, loras):
        run, files, plan = start_run(options(model_dir, runs, loras=loras))
        done = execute(run, files, plan)
        return find_run(runs, done.run_id).load_final(), done

    plain, _ = final(tmp_path / "plain", [])
    off, _ = final(tmp_path / "off", [LoraSpec(lora, 0.0)])
    on, done = final(tmp_path / "on", [LoraSpec(lora)])
    assert off.equal(plain) and not on.equal(plain)
    assert done.stats["dit"]["blocks_copied_per_step"] == [1] * 6 and done.settings["loras"][0]["strength"] == 1.0


@pytest.mark.slow
def test_rewrite_with_tencents_qwen_instruct_then_encode_the_rewrite(model_dir, tmp_path, monkeypatch):
    """`--rewrite` on 1.5 in Tencent's layout: text_encoder/llm/ is the whole Qwen2.5-VL-Instruct,
    which writes the rewrite (ChatML: the tiny tokenizer has no template of its own); the run keeps
    it and the 1.5 encoders read it. The tiny model's rewrite is gibberish, but greedy, so it equals
    the same call outside the run."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from hyvideo.prompt_rewrite import chat_input_ids, rewrite_prompt
    from hyvideo.v15_text import V15TextEncoder

    encoded = []
    real_encode = V15TextEncoder.encode
    monkeypatch.setattr(V15TextEncoder, "encode", lambda self, prompt: encoded.append(prompt) or real_encode(self, prompt))
    run, files, plan = start_run(options(model_dir, tmp_path, rewrite="normal"))
    done = execute(run, files, plan)
    llm = model_dir / "text_encoder" / "llm"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(llm, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(llm)
    prompt = options(model_dir, tmp_path).request.prompt
    assert tokenizer.decode(chat_input_ids(tokenizer, prompt, "normal")[0]).startswith("<|im_start|>system\n")
    assert done.rewritten_prompt == rewrite_prompt(model, tokenizer, prompt, "normal") and encoded == [done.rewritten_prompt]


def test_preview_fits_its_colours_to_the_vae_once(model_dir, tmp_path, monkeypatch):
    """--preview on 1.5: the latent-to-RGB projection is fitted to the folder's VAE before the DiT
    is placed and kept in the cache folder; the preview is the last step's prediction (at sigma 0,
    the final latents) through it, each latent pixel shown 2 x 2 (1/8 of the video, as the 13B's);
    a second run reads the kept fit instead of fitting again, and the latents are the same as
    without a preview."""
    import numpy as np
    from PIL import Image

    from hyvideo.preview import latent_rgb
    from lowvram import stages as stages_module

    cache = tmp_path / "cache"
    first = execute(*start_run(options(model_dir, tmp_path / "a", preview=True, cache_dir=cache)))
    saved = json.loads((cache / "preview-rgb.json").read_text())
    assert len(saved["factors"]) == 4 and len(saved["bias"]) == 3  # the tiny VAE's 4 latent channels
    final = find_run(tmp_path / "a", first.run_id).load_final()
    expected = latent_rgb(final, saved["factors"], saved["bias"]).repeat_interleave(2, 1).repeat_interleave(2, 2).numpy()
    with Image.open(first.preview) as image:
        assert image.n_frames == 3 and image.size == (12, 8)  # 96x64 at 1/8; 9 frames -> 3 latent frames
        for t in range(3):
            image.seek(t)
            assert np.array_equal(np.asarray(image.convert("RGB")), expected[t])

    def no_second_fit(*args, **kwargs):
        raise AssertionError("fitted again")

    monkeypatch.setattr(stages_module, "fit_latent_rgb", no_second_fit)
    second = execute(*start_run(options(model_dir, tmp_path / "b", preview=True, cache_dir=cache)))
    plain = execute(*start_run(options(model_dir, tmp_path / "c", cache_dir=cache)))
    assert second.preview and find_run(tmp_path / "b", second.run_id).load_final().equal(final)
    assert find_run(tmp_path / "c", plain.run_id).load_final().equal(final)
