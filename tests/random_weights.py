"""Seeded random weights for tests (no checkpoint needed)."""

import torch


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, 1/fan_in), norm weights 1 + N(0, 0.1^2), biases N(0, 0.1^2): every parameter
    influences the output and activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(noise / p[0].numel() ** 0.5 if p.ndim >= 2 else (1 + 0.1 * noise if "norm" in name else 0.1 * noise))
