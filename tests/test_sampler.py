"""Sampler schedule and conditioning values against diffusers and the facts file."""

import numpy as np
import pytest
import torch

from hyvideo.sampler import embedded_guidance, euler_step, flow_sigmas, flow_timesteps, initial_noise


def diffusers_scheduler(steps: int, shift: float):
    """Configured as diffusers' HunyuanVideoPipeline does: unshifted sigmas linspace(1, 0, steps+1)[:-1]."""
    scheduler = pytest.importorskip("diffusers").FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    return scheduler


@pytest.mark.parametrize("steps,shift", [(50, 7.0), (30, 9.0), (4, 5.0)])
def test_schedule_matches_diffusers(steps, shift):
    scheduler = diffusers_scheduler(steps, shift)
    sigmas = flow_sigmas(steps, shift)
    # diffusers shifts in float32 (numpy linspace in float64 first); we shift in float64 and round
    # once, so values agree to float32 resolution (sigma <= 1: 1e-6; timesteps <= 1000: 1e-3).
    assert torch.allclose(sigmas, scheduler.sigmas.float(), atol=1e-6, rtol=0)
    assert torch.allclose(flow_timesteps(sigmas), scheduler.timesteps.float(), atol=1e-3, rtol=0)


def test_official_values_shift7_50_steps():
    sigmas = flow_sigmas(50, 7.0)
    timesteps = flow_timesteps(sigmas)
    # facts §5.2: t = 1000, 997.09, 994.08, 990.96, 987.73, ..., 225.81, 125.0; sigma ends 0.3088, 0.2258, 0.125, 0
    assert torch.allclose(timesteps[:5], torch.tensor([1000.0, 997.09, 994.08, 990.96, 987.73]), atol=5e-3)
    assert torch.allclose(timesteps[-2:], torch.tensor([225.81, 125.0]), atol=5e-3)
    assert torch.allclose(sigmas[-4:], torch.tensor([0.3088, 0.2258, 0.125, 0.0]), atol=5e-5)
    assert len(timesteps) == 50


def test_embedded_guidance_bf16_rounding():
    # facts §1.3: 6.0 -> 6016, 1.0 -> 1000, 3.5 -> 3504, 7.0 -> 7008 in bf16.
    for scale, value in [(6.0, 6016.0), (1.0, 1000.0), (3.5, 3504.0), (7.0, 7008.0)]:
        g = embedded_guidance(scale, 2, torch.bfloat16)
        assert g.dtype == torch.bfloat16 and g.tolist() == [value, value]
    assert embedded_guidance(6.0, 1, torch.float32).item() == 6000.0


def test_noise_is_seeded_float32_and_device_independent():
    a = initial_noise((1, 16, 2, 4, 6), seed=42)
    b = initial_noise((1, 16, 2, 4, 6), seed=42)
    c = initial_noise((1, 16, 2, 4, 6), seed=43)
    assert a.dtype == torch.float32 and torch.equal(a, b) and not torch.equal(a, c)
    expected = torch.randn((1, 16, 2, 4, 6), generator=torch.Generator().manual_seed(42))
    assert torch.equal(a, expected)


def test_euler_step_matches_diffusers():
    scheduler = diffusers_scheduler(10, 7.0)
    sigmas = flow_sigmas(10, 7.0)
    x = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    v = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    for i in range(4):  # diffusers tracks the step index itself
        ref = scheduler.step(v, scheduler.timesteps[i], x).prev_sample
        ours = euler_step(x, v.to(torch.bfloat16), sigmas, i)
        assert ours.dtype == torch.float32  # a bf16 velocity still gives float32 latents
        # diffusers and we differ only in float32 rounding of sigma (1e-6) and bf16 rounding of v
        # (2^-8 relative, times |dsigma| <= 0.15 here).
        assert torch.allclose(ours, ref, atol=2e-3)
        assert torch.allclose(euler_step(x, v, sigmas, i), ref, atol=1e-5)
