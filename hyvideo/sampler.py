"""Flow-matching Euler sampler (facts §5.2) and the conditioning values it feeds the DiT.

sigma_i = shift*s / (1 + (shift-1)*s) over s = linspace(1, 0, steps+1), decreasing from noise (1)
to data (0); the DiT gets t_i = sigma_i * 1000; x_{i+1} = x_i + v * (sigma_{i+1} - sigma_i) in
float32. Steps are a pure function of (latents, step index), which is what makes resuming a run
from a saved latent bit-exact.
"""

import torch


def flow_sigmas(steps: int, shift: float = 7.0) -> torch.Tensor:
    """[steps + 1] float32 sigmas from 1 to 0 (SD3-style shift, the `--flow-reverse` order)."""
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * s / (1 + (shift - 1) * s)).to(torch.float32)


def flow_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """[steps] timesteps fed to the DiT: sigma * 1000 for every sigma but the final 0."""
    return sigmas[:-1] * 1000.0


def embedded_guidance(scale: float, batch: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """[B] guidance input built as the official pipeline does: the scale in the DiT dtype, then
    x1000 in that dtype (so 6.0 becomes 6016 in bf16)."""
    return torch.full((batch,), scale, dtype=dtype, device=device) * 1000.0


def initial_noise(shape: tuple[int, ...], seed: int, device=None) -> torch.Tensor:
    """Project convention (facts §5.4): float32 noise from a CPU generator seeded with `seed`,
    then moved to the device, so a seed gives the same video on any machine."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigmas: torch.Tensor, index: int) -> torch.Tensor:
    """One Euler step in float32: x + v * (sigma_{i+1} - sigma_i)."""
    return latents + velocity.float() * (sigmas[index + 1] - sigmas[index])


def predicted_clean(latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The step's prediction of the clean latents, x0 = x - sigma * v in float32: with x = (1 - sigma)
    x0 + sigma * noise and v = noise - x0 (what the Euler step above integrates), x - sigma v = x0."""
    return latents - velocity.float() * sigma
