"""Model configurations: the official 13B DiTs (text-to-video and the two image-to-video releases),
the official VAE, and small configs of the same architecture for tests and the demo.

Sizes are plain dataclasses (as in gpt-fast); `DIT_CONFIGS` / `VAE_CONFIGS` map names to them.
"""

from dataclasses import asdict, dataclass, replace

# How an image-to-video DiT takes its image (Tencent's `--i2v-condition-type`, diffusers'
# `image_condition_type`); None is text-to-video.
#   latent_concat: the first I2V release; input = noisy latents | image latent (first frame, zeros
#     after) | mask (1 on the first frame), so in_channels = 2 * latent channels + 1.
#   token_replace: the current release (Mar 7 2025); the first latent frame is the clean image
#     latent, its tokens are modulated from the timestep embedding at t = 0.
IMAGE_CONDITION_TYPES = ("latent_concat", "token_replace")


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
    image_condition_type: str | None = None  # None (text-to-video) or one of IMAGE_CONDITION_TYPES

    def __post_init__(self):
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads {self.heads}")
        if sum(self.rope_axes_dim) != self.head_dim:
            raise ValueError(f"rope_axes_dim {self.rope_axes_dim} must sum to head_dim {self.head_dim}")
        if self.image_condition_type not in (None, *IMAGE_CONDITION_TYPES):
            raise ValueError(f"image_condition_type {self.image_condition_type!r} is not one of {IMAGE_CONDITION_TYPES}")
        if self.in_channels != self.expected_in_channels:
            raise ValueError(f"image_condition_type {self.image_condition_type} needs in_channels "
                             f"{self.expected_in_channels}, got {self.in_channels}")

    @property
    def expected_in_channels(self) -> int:
        """latent_concat feeds noisy latents | image latents | mask; the others the latents alone."""
        if self.image_condition_type == "latent_concat":
            return 2 * self.out_channels + 1
        return self.out_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_diffusers(self) -> dict:
        """The `transformer/config.json` fields of diffusers' HunyuanVideoTransformer3DModel."""
        return {
            "_class_name": "HunyuanVideoTransformer3DModel",
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "num_attention_heads": self.heads, "attention_head_dim": self.head_dim,
            "num_layers": self.double_blocks, "num_single_layers": self.single_blocks,
            "num_refiner_layers": self.refiner_blocks, "mlp_ratio": self.mlp_ratio,
            "patch_size": self.patch_size[1], "patch_size_t": self.patch_size[0], "qk_norm": "rms_norm",
            "guidance_embeds": self.guidance_embed, "text_embed_dim": self.text_states_dim,
            "pooled_projection_dim": self.text_states_dim_2, "rope_theta": self.rope_theta,
            "rope_axes_dim": list(self.rope_axes_dim), "image_condition_type": self.image_condition_type,
        }

    @classmethod
    def from_diffusers(cls, values: dict) -> "DiTConfig":
        return cls(
            hidden_size=values["num_attention_heads"] * values["attention_head_dim"], heads=values["num_attention_heads"],
            double_blocks=values["num_layers"], single_blocks=values["num_single_layers"],
            refiner_blocks=values["num_refiner_layers"], mlp_ratio=values["mlp_ratio"],
            patch_size=(values["patch_size_t"], values["patch_size"], values["patch_size"]),
            in_channels=values["in_channels"], out_channels=values["out_channels"],
            text_states_dim=values["text_embed_dim"], text_states_dim_2=values["pooled_projection_dim"],
            rope_axes_dim=tuple(values["rope_axes_dim"]), rope_theta=values["rope_theta"],
            guidance_embed=values["guidance_embeds"], image_condition_type=values.get("image_condition_type"),
        )

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
        """From our dict, the official `vae/config.json` or diffusers' (which says `temporal_`)."""
        values = dict(values)
        if "temporal_compression_ratio" in values:
            values.setdefault("time_compression_ratio", values["temporal_compression_ratio"])
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        if "block_out_channels" in known:
            known["block_out_channels"] = tuple(known["block_out_channels"])
        return cls(**known)


DIT_CONFIGS: dict[str, DiTConfig] = {
    "HYVideo-T/2-cfgdistill": DiTConfig(),
    # The image-to-video DiTs (names as in diffusers' converter): the current release replaces the
    # first frame's tokens and keeps embedded guidance; the first release concatenates the image
    # latent and was trained without guidance_in (Tencent's scripts pass no --embedded-cfg-scale).
    "HYVideo-T/2-I2V-16ch": DiTConfig(image_condition_type="token_replace"),
    "HYVideo-T/2-I2V-33ch": DiTConfig(in_channels=33, guidance_embed=False, image_condition_type="latent_concat"),
    # Same architecture, small enough for CPU tests: 2 heads of 32; rope axes follow the 13B rule
    # (t = head_dim/8, y = x = the rest halved), so a config can be inferred from weights alone.
    "tiny": DiTConfig(
        hidden_size=64, heads=2, double_blocks=2, single_blocks=2, refiner_blocks=2,
        text_states_dim=48, text_states_dim_2=40, rope_axes_dim=(4, 14, 14),
    ),
}
DIT_CONFIGS["tiny-i2v-16ch"] = replace(DIT_CONFIGS["tiny"], image_condition_type="token_replace")
DIT_CONFIGS["tiny-i2v-33ch"] = replace(DIT_CONFIGS["tiny"], in_channels=33, guidance_embed=False, image_condition_type="latent_concat")

VAE_CONFIGS: dict[str, VAEConfig] = {
    "884-16c-hy": VAEConfig(),
    # Same block structure (4 levels, 4x time, 8x space), narrow channels for CPU tests.
    "tiny": VAEConfig(block_out_channels=(8, 16, 32, 32), norm_num_groups=4),
}
