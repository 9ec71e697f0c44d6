"""HunyuanVideo-1.5's DiT through the engine on a tiny config: real CFG's two forwards per step
streamed (each copying every streamed block) equal the resident run bit for bit, in float32 and
from the FP8/INT8 quantize-once cache, which stays close to the unquantized model."""

import pytest
import torch

from hyvideo.v15_config import V15_DIT_CONFIGS
from hyvideo.v15_dit import HunyuanVideo15DiT
from hyvideo.v15_pipeline import V15Prompt, denoise
from lowvram.schedule import plan_schedule
from lowvram.streaming import BlockStreamer, forward_blocks
from quant.bytes import block_bytes, dit_block_kinds
from quant.cache import load_cached_dit, quantize_dit_to_cache

CONFIG = V15_DIT_CONFIGS["tiny"]
STEPS = 2


def prompt(seed: int, length: int) -> V15Prompt:
    g = torch.Generator().manual_seed(seed)
    return V15Prompt(torch.randn(1, length, CONFIG.text_states_dim, generator=g), torch.ones(1, length),
                     torch.randn(1, 5, CONFIG.byt5_states_dim, generator=g), torch.tensor([[1, 1, 1, 0, 0]]))


def run(model, blocks_for_forward=None) -> torch.Tensor:
    latents = torch.randn(1, CONFIG.latent_channels, 2, 4, 6, generator=torch.Generator().manual_seed(3))
    return denoise(model, prompt(1, 7), prompt(2, 4), latents, STEPS, 5.0, 6.0, "cpu", blocks_for_forward=blocks_for_forward)


def streamed(model, resident: int, depth: int = 2):
    kinds = dit_block_kinds(CONFIG)
    schedule = plan_schedule(kinds, [block_bytes(CONFIG, "bf16", kind=k).total for k in kinds], resident=resident,
                             prefetch_depth=depth)
    streamer = BlockStreamer(model.all_blocks(), schedule, "cpu", trace=True)
    return streamer, forward_blocks(streamer, STEPS, forwards_per_step=2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HunyuanVideo15DiT(CONFIG).eval()


@pytest.mark.parametrize("resident", [0, 1])
def test_cfg_streamed_equals_resident(model, resident):
    expected = run(model)
    streamer, blocks = streamed(model, resident)
    assert torch.equal(run(model, blocks), expected)
    stats = streamer.step_stats()
    assert len(stats) == 2 * STEPS  # a "step" of the streamer is one forward: two per denoising step
    assert all(s.blocks_copied == CONFIG.double_blocks - resident for s in stats)
    assert streamer.forwards == 2 * STEPS and streamer._next_issue == 2 * STEPS * (CONFIG.double_blocks - resident)  # no copy past the last forward


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_quantized_cache_streams_exactly_and_stays_close(model, tmp_path, scheme):
    source = tmp_path / "weights.pt"
    torch.save(model.state_dict(), source)
    quantize_dit_to_cache([source], model.state_dict(), CONFIG, scheme, "blocks", tmp_path, torch.float32)
    quantized = load_cached_dit(tmp_path, CONFIG, scheme, "blocks", [source], torch.float32)
    resident = run(quantized)
    _, blocks = streamed(quantized, resident=1, depth=1)
    assert torch.equal(run(quantized, blocks), resident)
    reference = run(model)
    error = (resident - reference).norm() / reference.norm()
    assert error < 0.05, error  # 8-bit weights (fp8: 2.65 % RMS per weight, quant/policy.py) over 2 CFG steps
