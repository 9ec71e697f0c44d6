"""Model configurations: the official 13B DiT, the official VAE, and small configs of the same
architecture for tests and the demo.

Sizes are plain dataclasses (as in gpt-fast); `DIT_CONFIGS` / `VAE_CONFIGS` map names to them.
"""

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class DiTConfig:
    """HunyuanVideo diffusion transformer sizes (facts §1.1)."""

    hidden_size: int = 3072
    heads: int = 24
    double_blocks: int = 20
    single_blocks: int = 40
    refiner_blocks: int = 2
    mlp_ratio: float = 4.0
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w)
    in_channels: int = 16
    out_channels: int = 16
    text_states_dim: int = 4096  # LLM hidden size
    text_states_dim_2: int = 768  # CLIP pooled size
    rope_axes_dim: tuple[int, int, int] = (16, 56, 56)  # (t, y, x), sums to head_dim
    rope_theta: float = 256.0
    guidance_embed: bool = True

    def __post_init__(self):
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads {self.heads}")
        if sum(self.rope_axes_dim) != self.head_dim:
            raise ValueError(f"rope_axes_dim {self.rope_axes_dim} must sum to head_dim {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DiTConfig":
        values = dict(values)
        for key in ("patch_size", "rope_axes_dim"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


@dataclass(frozen=True)
class VAEConfig:
    """Causal 3D VAE "884-16c-hy" sizes (facts §3.1)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # encoder resnets per block; the decoder uses one more
    norm_num_groups: int = 32
    time_compression_ratio: int = 4
    spatial_compression_ratio: int = 8
    mid_block_add_attention: bool = True
    scaling_factor: float = 0.476986

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "VAEConfig":
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        if "block_out_channels" in known:
            known["block_out_channels"] = tuple(known["block_out_channels"])
        return cls(**known)


DIT_CONFIGS: dict[str, DiTConfig] = {
    "HYVideo-T/2-cfgdistill": DiTConfig(),
    # Same architecture, small enough for CPU tests: 2 heads of 32 (rope axes 8/12/12).
    "tiny": DiTConfig(
        hidden_size=64, heads=2, double_blocks=2, single_blocks=2, refiner_blocks=2,
        text_states_dim=48, text_states_dim_2=40, rope_axes_dim=(8, 12, 12),
    ),
}

VAE_CONFIGS: dict[str, VAEConfig] = {
    "884-16c-hy": VAEConfig(),
    # Same block structure (4 levels, 4x time, 8x space), narrow channels for CPU tests.
    "tiny": VAEConfig(block_out_channels=(8, 16, 32, 32), norm_num_groups=4),
}
