"""RIFLEx (hyvideo/rope.py): the paper's frequency for HunyuanVideo's RoPE, the DiT against a direct
implementation of the paper's change, nothing changed at or below 129 frames, and the switch as a
run setting (auto above 129 frames, recorded, resumed the same)."""

import math

import pytest
import torch
from safetensors.torch import load_file

from hyvideo.config import DIT_CONFIGS
from hyvideo.dit import HunyuanVideoDiT
from hyvideo.errors import HyVideoError
from hyvideo.pipeline import GenerationRequest, denoise, riflex_choice, uses_riflex, validate_request
from hyvideo.rope import intrinsic_index, rope_frequencies
from hyvideo.text_encoder import TextEmbeddings
from lowvram.generation.batch import clips_for, parse_line
from lowvram.generation.preflight import RunOptions, start_run
from lowvram.generation.runner import RunInterrupted, StopRequest, execute, resume_run
from tests.diffusers_oracle import diffusers_transformer
from tests.helpers import PARITY_TOL, StopAfter, max_rel_err, parity_inputs, randomize_

TINY = DIT_CONFIGS["tiny"]
HUNYUAN = DIT_CONFIGS["HYVideo-T/2-cfgdistill"]


# --- the frequency ------------------------------------------------------------------------------


def test_hunyuan_intrinsic_component_is_the_papers():
    """The paper (and thu-ml/RIFLEx `identify_k(b=256, d=16, N=48)`) names k = 4, period 50 latent
    frames, for HunyuanVideo: 1/256^(6/16) = 1/8, 2 pi * 8 = 50.3."""
    assert HUNYUAN.rope_axes_dim == (16, 56, 56) and HUNYUAN.rope_theta == 256.0
    assert intrinsic_index(16, 256.0) == 4


def test_riflex_frequencies_equal_the_papers_formula_hand_computed():
    """261 frames = 66 latent frames. Temporal frequencies 1/256^(2j/16) = 2^-j exactly; RIFLEx sets
    the 4th (j = 3, channels 6 and 7) to 0.9 * 2 pi / 66 = 0.0856798 (hand: 5.6548668 / 66) and
    leaves the rest, and the y and x axes, alone."""
    grid, axes = (66, 2, 3), HUNYUAN.rope_axes_dim
    cos, sin = rope_frequencies(grid, axes, 256.0, riflex=True)
    plain_cos, plain_sin = rope_frequencies(grid, axes, 256.0)
    hand = [1.0, 0.5, 0.25, 0.0856798, 0.0625, 0.03125, 0.015625, 0.0078125]
    t = torch.arange(66, dtype=torch.float64).repeat_interleave(6)  # t slowest: 2 x 3 tokens per frame
    for j, freq in enumerate(hand):
        for channel in (2 * j, 2 * j + 1):
            # float32 tables: angles up to 65 rad carry ~4e-6 absolute error; 1e-5 leaves room, and
            # the unchanged 0.125 would be off by up to 1 (cos of 8.1 rad vs 5.6 rad)
            torch.testing.assert_close(cos[:, channel].double(), torch.cos(t * freq), atol=1e-5, rtol=0)
            torch.testing.assert_close(sin[:, channel].double(), torch.sin(t * freq), atol=1e-5, rtol=0)
    assert 0.9 * 2 * math.pi / 66 == pytest.approx(0.0856798, abs=1e-7)
    changed = [c for c in range(128) if not torch.equal(cos[:, c], plain_cos[:, c]) or not torch.equal(sin[:, c], plain_sin[:, c])]
    assert changed == [6, 7]


def test_riflex_never_raises_the_frequency():
    """At 45 latent frames (177 frames) 0.9 * 2 pi / 45 = 0.1257 > 1/8: the trained period (50)
    already covers the clip, so the table is the plain one; at 46 (181 frames) 0.1229 < 1/8 lowers it."""
    axes = HUNYUAN.rope_axes_dim
    for frames, lowered in ((3, False), (45, False), (46, True)):
        cos, _ = rope_frequencies((frames, 1, 1), axes, 256.0, riflex=True)
        plain, _ = rope_frequencies((frames, 1, 1), axes, 256.0)
        assert torch.equal(cos, plain) != lowered


def test_the_switch_and_the_frame_limit():
    request = GenerationRequest("a fox", frames=129)
    assert not uses_riflex(request) and uses_riflex(GenerationRequest("a fox", frames=133))
    assert uses_riflex(GenerationRequest("a fox", frames=129, riflex=True))
    assert not uses_riflex(GenerationRequest("a fox", frames=261, riflex=False))
    assert [riflex_choice(text) for text in ("auto", "on", "off")] == [None, True, False]
    with pytest.raises(HyVideoError, match="--riflex must be one of auto, on, off"):
        riflex_choice("yes")
    validate_request(GenerationRequest("a fox", width=960, height=544, frames=261))
    with pytest.raises(HyVideoError, match="more than 261"):
        validate_request(GenerationRequest("a fox", frames=265))
    with pytest.raises(HyVideoError, match=r"4k\+1 \(1, 5, \.\.\., 261\)"):
        validate_request(GenerationRequest("a fox", frames=200))


# --- the DiT ------------------------------------------------------------------------------------


class PaperRope(torch.nn.Module):
    """diffusers' HunyuanVideo RoPE with the paper's one-line change, written out as the RIFLEx
    repository applies it to diffusers (HunyuanVideoRotaryPosEmbedRifleX in hunyuanvideo.py):
    freqs[k-1] = 0.9 * 2 pi / L_test on the temporal axis."""

    def __init__(self, rope_dim, theta, k, latent_frames):
        super().__init__()
        self.rope_dim, self.theta, self.k, self.latent_frames = rope_dim, theta, k, latent_frames

    def forward(self, hidden_states):
        _, _, frames, height, width = hidden_states.shape
        sizes = [frames, height // 2, width // 2]  # tiny: patch 1 x 2 x 2
        grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in sizes], indexing="ij")
        cos, sin = [], []
        for axis, dim in enumerate(self.rope_dim):
            freqs = 1.0 / (self.theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
            if axis == 0:
                freqs[self.k - 1] = 0.9 * 2 * torch.pi / self.latent_frames
            angles = torch.outer(grids[axis].reshape(-1), freqs)
            cos.append(angles.cos().repeat_interleave(2, dim=1))
            sin.append(angles.sin().repeat_interleave(2, dim=1))
        return torch.cat(cos, dim=1), torch.cat(sin, dim=1)


@pytest.fixture(scope="module")
def tiny_models():
    ours = HunyuanVideoDiT(TINY).eval()
    randomize_(ours, seed=1)
    return ours, diffusers_transformer(TINY, ours.state_dict())


def test_dit_with_riflex_matches_the_papers_change_in_diffusers(tiny_models):
    """The tiny DiT's temporal axis has 4 dims: periods round(2 pi * 256^(2j/4)) = 6, 101 latent
    frames; the one nearest the repetition frame 48 is k = 1. Same weights in diffusers with the
    paper's RoPE: the same velocity (test_dit's float32 tolerance), and RIFLEx really changes it."""
    ours, reference = tiny_models
    assert intrinsic_index(TINY.rope_axes_dim[0], TINY.rope_theta) == 1
    inputs = parity_inputs(TINY, 1, frames=7, height=6, width=10, text_len=12, valid=[5])
    reference.rope = PaperRope(TINY.rope_axes_dim, TINY.rope_theta, k=1, latent_frames=7)
    with torch.no_grad():
        out = ours(*inputs, riflex=True)
        plain = ours(*inputs)
        expected = reference(*inputs, return_dict=False)[0]
    assert max_rel_err(out, expected) <= PARITY_TOL
    assert max_rel_err(plain, expected) > 100 * PARITY_TOL


def _pre_riflex_rope(grid, axes_dim, theta=256.0, device=None, riflex=False):
    """rope_frequencies as it was before RIFLEx (commit 1c0231e), for the bit-identity check."""
    positions = torch.meshgrid(*[torch.arange(n, device=device, dtype=torch.float32) for n in grid], indexing="ij")
    cos_parts, sin_parts = [], []
    for pos, dim in zip(positions, axes_dim):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32)[: dim // 2] / dim)
        angles = pos.reshape(-1, 1) * freqs
        cos_parts.append(angles.cos().repeat_interleave(2, dim=1))
        sin_parts.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos_parts, dim=1), torch.cat(sin_parts, dim=1)


def test_at_129_frames_nothing_changes_bit_for_bit(tiny_models, monkeypatch):
    """Two denoising steps of a 129-frame request (riflex auto) equal, bit for bit, the same steps
    with the RoPE table of before RIFLEx; a 189-frame request (auto: on, 48 latent frames: lowered)
    does not."""
    import hyvideo.dit

    ours, _ = tiny_models
    short, _, text, mask, pooled, _ = parity_inputs(TINY, 1, frames=33, height=2, width=2, text_len=12, valid=[5])
    long = parity_inputs(TINY, 1, frames=48, height=2, width=2, text_len=12, valid=[5])[0]
    embeddings = TextEmbeddings(text, mask, pooled, [False], [False])

    def run(frames, x):
        request = GenerationRequest("a fox", width=64, height=48, frames=frames, steps=2, seed=0)
        return denoise(ours, embeddings, x, request, "cpu")

    now, longer = run(129, short), run(189, long)
    monkeypatch.setattr(hyvideo.dit, "rope_frequencies", _pre_riflex_rope)
    assert torch.equal(now, run(129, short)) and not torch.equal(longer, run(189, long))


# --- as a run setting -----------------------------------------------------------------------------


def _options(model_dir, runs_dir, **request):
    values = {"width": 64, "height": 48, "frames": 9, "steps": 4, "seed": 11, **request}
    return RunOptions(GenerationRequest("a red fox running through snow", **values), model_dir, runs_dir, device="cpu")


def test_auto_is_settled_and_recorded_when_the_run_starts(tiny_official, tmp_path):
    long_run, _, _ = start_run(_options(tiny_official, tmp_path, frames=133))
    short_run, _, _ = start_run(_options(tiny_official, tmp_path))
    off_run, _, _ = start_run(_options(tiny_official, tmp_path, frames=133, riflex=False))
    assert (long_run.settings["riflex"], short_run.settings["riflex"], off_run.settings["riflex"]) == (True, False, False)


@pytest.mark.slow
def test_stop_and_resume_with_riflex_is_bit_exact(tiny_official, tmp_path):
    """RIFLEx on at 189 frames (48 latent frames: the frequency is lowered; 16x16 px keeps it cheap):
    stopped after 2 of 4 steps and resumed equals the uninterrupted run, which differs from RIFLEx off."""
    long = {"width": 16, "height": 16, "frames": 189}
    run, files, plan = start_run(_options(tiny_official, tmp_path / "whole", riflex=True, **long))
    whole = load_file(execute(run, files, plan).final_latents)["latents"]
    run, files, plan = start_run(_options(tiny_official, tmp_path / "off", riflex=False, **long))
    off = load_file(execute(run, files, plan).final_latents)["latents"]

    run, files, plan = start_run(_options(tiny_official, tmp_path / "stopped", riflex=True, **long))
    stop = StopRequest()
    with pytest.raises(RunInterrupted):
        execute(run, files, plan, StopAfter(stop, 2), stop)
    resumed = resume_run(tmp_path / "stopped", run.id)
    assert resumed.resumed_from == "step 2/4" and resumed.settings["riflex"] is True
    assert torch.equal(load_file(resumed.final_latents)["latents"], whole) and not torch.equal(whole, off)


def test_a_batch_line_sets_riflex():
    defaults = GenerationRequest("", width=64, height=48, frames=9, steps=2, seed=1)
    prompt, overrides = parse_line('{"prompt": "a fox", "frames": 261, "riflex": "off"}')
    [clip] = clips_for(prompt, defaults, None, overrides=overrides)
    assert clip.request.riflex is False and clip.request.frames == 261
    [auto] = clips_for("a fox", defaults, None, overrides={"frames": 261})
    assert auto.request.riflex is None and uses_riflex(auto.request)
    prompt, overrides = parse_line('{"prompt": "a fox", "riflex": "yes"}')
    with pytest.raises(HyVideoError, match="--riflex must be one of"):
        clips_for(prompt, defaults, None, overrides=overrides)


# --- how long a clip fits -------------------------------------------------------------------------


def frame_ceiling(profile, width: int, height: int, limit: int) -> int | None:
    """The most frames (4k+1, at most `limit`) whose plan fits `profile`'s VRAM budget, by
    bisection: more frames never need less memory (more tokens; the VAE's tiles stay the same)."""
    from lowvram.planner import plan

    def fits(k: int) -> bool:
        return plan(profile, width, height, 4 * k + 1).fits_vram

    if not fits(0):
        return None
    low, high = 0, (limit - 1) // 4 + 1  # fits(low); high: past the limit
    if fits(high - 1):
        return 4 * (high - 1) + 1
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return 4 * low + 1


@pytest.mark.slow
def test_readme_frame_ceilings_are_the_planners():
    """README's RIFLEx table: per consumer profile, the longest clip the planner fits at 720p and
    540p 16:9, within the 261-frame limit, and where memory alone would stop (searched to 1001)."""
    from pathlib import Path

    from lowvram.profiles import load_profile

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name in ("24gb", "16gb", "12gb", "8gb"):
        profile = load_profile(name)
        cells = []
        for width, height in ((1280, 720), (960, 544)):
            ceiling, memory = frame_ceiling(profile, width, height, 261), frame_ceiling(profile, width, height, 1001)
            cells.append(f"{ceiling}" + (f" (memory: {'1001+' if memory == 1001 else memory})" if memory != ceiling else ""))
        assert f"| {name} | {cells[0]} | {cells[1]} |" in readme
