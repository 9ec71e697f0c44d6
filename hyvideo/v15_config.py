"""HunyuanVideo-1.5 (8.3B) sizes and per-checkpoint sampling defaults.

Facts from Tencent-Hunyuan/HunyuanVideo-1.5 (`hyvideo/commons/__init__.py` PIPELINE_CONFIGS, README
table) and diffusers 0.42 (`HunyuanVideo15Transformer3DModel`, `AutoencoderKLHunyuanVideo15`).
Plain dataclasses, as `config.py` for the 13B model.
"""

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class V15DiTConfig:
    """HunyuanVideo-1.5 DiT: 54 double-stream blocks, no single-stream blocks, patch 1x1x1.

    The image input is [noisy latents (32) ; condition latents (32) ; condition mask (1)] = 65
    channels; the text stream is [SigLIP image tokens (I2V only) ; byT5 glyph tokens ; Qwen2.5-VL
    tokens], each kind tagged by `cond_type_embedding`.
    """

    hidden_size: int = 2048
    heads: int = 16
    double_blocks: int = 54
    refiner_blocks: int = 2
    mlp_ratio: float = 4.0
    patch_size: tuple[int, int, int] = (1, 1, 1)  # (t, h, w)
    latent_channels: int = 32
    text_states_dim: int = 3584  # Qwen2.5-VL-7B hidden size
    byt5_states_dim: int = 1472  # byT5-small (Glyph-SDXL-v2) hidden size
    byt5_hidden: int = 2048  # byt5_in's inner width (fixed officially)
    vision_states_dim: int = 1152  # SigLIP so400m hidden size
    rope_axes_dim: tuple[int, int, int] = (16, 56, 56)  # (t, y, x), sums to head_dim
    rope_theta: float = 256.0
    use_meanflow: bool = False  # the super-resolution checkpoints add time_r_in

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

    @property
    def single_blocks(self) -> int:
        """No single-stream blocks (official mm_single_blocks_depth = 0); the engine's block lists
        read this as for the 13B config."""
        return 0

    @property
    def in_channels(self) -> int:
        """Noisy latents, condition latents and the one-channel condition mask."""
        return 2 * self.latent_channels + 1

    @property
    def out_channels(self) -> int:
        return self.latent_channels

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_official(cls, values: dict) -> "V15DiTConfig":
        """From Tencent's `transformer/<variant>/config.json` (HunyuanVideo_1_5_DiffusionTransformer);
        a variant this model does not implement raises ValueError naming the field."""
        expected = {"concat_condition": True, "glyph_byT5_v2": True, "use_cond_type_embedding": True,
                    "vision_projection": "linear", "text_projection": "single_refiner", "guidance_embed": False,
                    "mm_single_blocks_depth": 0, "mlp_act_type": "gelu_tanh", "qk_norm": True, "qk_norm_type": "rms",
                    "qkv_bias": True, "is_reshape_temporal_channels": False, "text_pool_type": None}
        for key, value in expected.items():
            if key in values and values[key] != value:
                raise ValueError(f"HunyuanVideo-1.5 transformer with {key}={values[key]!r} is not supported (expected {value!r})")
        return cls(
            hidden_size=values["hidden_size"], heads=values["heads_num"], double_blocks=values["mm_double_blocks_depth"],
            mlp_ratio=float(values.get("mlp_width_ratio", 4.0)), patch_size=tuple(values["patch_size"]),
            latent_channels=values["in_channels"], text_states_dim=values["text_states_dim"],
            vision_states_dim=values["vision_states_dim"], rope_axes_dim=tuple(values["rope_dim_list"]),
            rope_theta=float(values["rope_theta"]), use_meanflow=bool(values.get("use_meanflow", False)),
        )

    @classmethod
    def from_diffusers(cls, values: dict) -> "V15DiTConfig":
        """From diffusers' `transformer/config.json` (HunyuanVideo15Transformer3DModel)."""
        if values["in_channels"] != 2 * values["out_channels"] + 1:
            raise ValueError(f"in_channels {values['in_channels']} is not 2 * out_channels + 1")
        return cls(
            hidden_size=values["num_attention_heads"] * values["attention_head_dim"], heads=values["num_attention_heads"],
            double_blocks=values["num_layers"], refiner_blocks=values["num_refiner_layers"],
            mlp_ratio=values["mlp_ratio"], patch_size=(values["patch_size_t"], values["patch_size"], values["patch_size"]),
            latent_channels=values["out_channels"], text_states_dim=values["text_embed_dim"],
            byt5_states_dim=values["text_embed_2_dim"], vision_states_dim=values["image_embed_dim"],
            rope_axes_dim=tuple(values["rope_axes_dim"]), rope_theta=values["rope_theta"],
            use_meanflow=values.get("use_meanflow", False),
        )

    def to_diffusers(self) -> dict:
        """The `transformer/config.json` fields of diffusers' HunyuanVideo15Transformer3DModel
        (`target_size` and `task_type` only steer diffusers' pipeline; 640 = 480p)."""
        if self.patch_size[1] != self.patch_size[2]:
            raise ValueError("diffusers takes one spatial patch size")
        return {
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "num_attention_heads": self.heads, "attention_head_dim": self.head_dim,
            "num_layers": self.double_blocks, "num_refiner_layers": self.refiner_blocks,
            "mlp_ratio": self.mlp_ratio, "patch_size": self.patch_size[1], "patch_size_t": self.patch_size[0],
            "qk_norm": "rms_norm", "text_embed_dim": self.text_states_dim, "text_embed_2_dim": self.byt5_states_dim,
            "image_embed_dim": self.vision_states_dim, "rope_theta": self.rope_theta,
            "rope_axes_dim": list(self.rope_axes_dim), "use_meanflow": self.use_meanflow,
        }


@dataclass(frozen=True)
class V15VAEConfig:
    """The 1.5 causal 3D VAE: 32 latent channels, 16x space, 4x time (diffusers'
    AutoencoderKLHunyuanVideo15 defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 32
    block_out_channels: tuple[int, ...] = (128, 256, 512, 1024, 1024)
    layers_per_block: int = 2  # resnets per encoder level; the decoder uses one more
    spatial_compression_ratio: int = 16
    time_compression_ratio: int = 4  # diffusers: temporal_compression_ratio
    downsample_match_channel: bool = True
    upsample_match_channel: bool = True
    scaling_factor: float = 1.03682

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "V15VAEConfig":
        """From Tencent's `vae/config.json` (AutoencoderKLConv3D: ffactor_*) or diffusers'."""
        values = dict(values)
        if values.get("shift_factor"):
            raise ValueError("a HunyuanVideo-1.5 VAE with a shift_factor is not supported")
        renames = {"ffactor_spatial": "spatial_compression_ratio", "ffactor_temporal": "time_compression_ratio",
                   "temporal_compression_ratio": "time_compression_ratio"}
        for old, new in renames.items():
            if old in values:
                values[new] = values.pop(old)
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        if "block_out_channels" in known:
            known["block_out_channels"] = tuple(known["block_out_channels"])
        return cls(**known)

    def to_diffusers(self) -> dict:
        values = {**self.to_dict(), "block_out_channels": list(self.block_out_channels)}
        values["temporal_compression_ratio"] = values.pop("time_compression_ratio")
        return values


V15_DIT_CONFIGS: dict[str, V15DiTConfig] = {
    "hunyuanvideo-1.5": V15DiTConfig(),
    # Same architecture for CPU tests: 2 heads of 32, rope axes (4, 14, 14) by the 13B rule; byt5_in
    # keeps its fixed 2048 inner width (diffusers hard-codes it).
    "tiny": V15DiTConfig(
        hidden_size=64, heads=2, double_blocks=2, latent_channels=4, text_states_dim=48, byt5_states_dim=24,
        vision_states_dim=36, rope_axes_dim=(4, 14, 14),
    ),
}

V15_VAE_CONFIGS: dict[str, V15VAEConfig] = {
    "hunyuanvideo-1.5": V15VAEConfig(),
    # Five levels as the real VAE (16x space, 4x time), narrow channels for CPU tests.
    "tiny": V15VAEConfig(latent_channels=4, block_out_channels=(8, 16, 16, 32, 32), layers_per_block=1),
}


@dataclass(frozen=True)
class V15Sampling:
    """Official defaults of one released transformer (README table, PIPELINE_CONFIGS)."""

    steps: int
    guidance_scale: float  # real CFG; 1.0 = one forward per step (CFG-distilled)
    flow_shift: float


# Keys are the folder names under `transformer/` in tencent/HunyuanVideo-1.5.
V15_TRAINED_FRAMES = 121  # HunyuanVideo-1.5's trained clip length and Tencent's default (31 latent frames)

V15_SAMPLING: dict[str, V15Sampling] = {
    "480p_t2v": V15Sampling(50, 6.0, 5.0),
    "480p_i2v": V15Sampling(50, 6.0, 5.0),
    "720p_t2v": V15Sampling(50, 6.0, 9.0),
    "720p_i2v": V15Sampling(50, 6.0, 7.0),
    "480p_t2v_distilled": V15Sampling(50, 1.0, 5.0),
    "480p_i2v_distilled": V15Sampling(50, 1.0, 5.0),
    "720p_t2v_distilled": V15Sampling(50, 1.0, 9.0),
    "720p_i2v_distilled": V15Sampling(50, 1.0, 7.0),
    "720p_t2v_distilled_sparse": V15Sampling(50, 1.0, 9.0),
    "720p_i2v_distilled_sparse": V15Sampling(50, 1.0, 7.0),
    "480p_i2v_step_distilled": V15Sampling(12, 1.0, 7.0),  # 8 or 12 recommended
}
