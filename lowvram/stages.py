"""How each stage gets its models onto the device, for a run's profile and plan.

One `Stages` type for every profile: the text encoders (LLM in NF4 or unquantized, CLIP), the DiT
(unquantized, Tencent's FP8 file, or the quantize-once cache) placed by the block streamer per the
plan's schedule, and the VAE decoded through the tiled decoder. Profile "plain" goes through the
same code with all blocks resident, one token chunk and one tile.

Unquantized weights run in the device's compute dtype: bfloat16 (DiT, LLM) and float16 (VAE, CLIP)
on the GPU, as the official code; float32 on the CPU, where only the tiny model runs and
half-precision matmuls are slow. Quantized DiT caches keep their non-quantized tensors in that
same dtype.

    stages = Stages(files, plan, device, attention, reporter, cache_dir)   # plan.profile is the profile
    llm, clip = stages.text_encoders()
    model, streamer = stages.dit()        # blocks via streamer.blocks_for_step(...)
    cache = stages.step_cache(model, steps, state)   # None unless the profile caches steps
    stages.forward_stats(streamer, first)  # blocks/bytes streamed per forward since forward `first`
    stages.release_dit(model, streamer)
    frames = stages.decode(stages.vae(), latents, on_progress)
    stages.stats                          # what was streamed and tiled (recorded in the run)
"""

import json
from pathlib import Path

import torch

from hyvideo.checkpoint import ModelFiles, infer_dit_config, load_dit, load_dit_state_dict, load_vae
from hyvideo.config import DiTConfig, VAEConfig
from hyvideo.errors import HyVideoError
from hyvideo.lora import LoraSpec, apply_loras
from hyvideo.pipeline import decode
from hyvideo.step_cache import CacheState, TeaCache
from hyvideo.text_encoder import ClipTextEncoder, LlamaTextEncoder
from hyvideo.weight_io import read_torch_file

from quant.bytes import TextEncoderParams, llm_param_counts
from quant.fp8 import choose_fp8_matmul, set_scaled_mm

from .compile import compile_blocks, dynamo_graphs
from .planner import Plan
from .progress import Reporter
from .streaming import BlockStreamer, place_dit, release_dit
from .tiled_vae import TiledVAE


def dit_config_for(files: ModelFiles) -> DiTConfig:
    """The DiT's config without loading its weights: diffusers' config.json, or the official
    checkpoint's tensor shapes (memory-mapped, so nothing is read but the shapes)."""
    if files.layout == "diffusers":
        try:
            return DiTConfig.from_diffusers(json.loads(files.dit_config.read_text()))
        except (OSError, ValueError, KeyError) as error:
            raise HyVideoError(f"{files.dit_config} is not a HunyuanVideo transformer config ({error}); download it again") from None
    source = files.dit_weights[0] if files.dit_weights else files.dit_fp8
    return infer_dit_config(read_torch_file(source))


def vae_config_for(files: ModelFiles) -> VAEConfig:
    try:
        return VAEConfig.from_dict(json.loads(files.vae_config.read_text()))
    except (OSError, ValueError, TypeError) as error:
        raise HyVideoError(f"{files.vae_config} is not a VAE config ({error}); download it again") from None


def text_encoder_params(files: ModelFiles) -> TextEncoderParams:
    """The text encoders' parameter counts from their config.json (meta device, no weights read)."""
    from transformers import AutoConfig, CLIPTextModel

    try:
        llm_config = AutoConfig.from_pretrained(files.llm, local_files_only=True)
        clip_config = AutoConfig.from_pretrained(files.clip, local_files_only=True)
    except (OSError, ValueError) as error:
        raise HyVideoError(f"cannot read the text encoders' config.json in {files.root} ({error}); download them again") from None
    llm_linear, llm_other = llm_param_counts(llm_config)
    with torch.device("meta"):
        clip = sum(p.numel() for p in CLIPTextModel(getattr(clip_config, "text_config", clip_config)).parameters())
    return TextEncoderParams(llm_linear, llm_other, clip)


def model_sizes(files: ModelFiles) -> dict:
    """What the planner needs to know of this model: `plan(..., **model_sizes(files))`."""
    return {"dit_config": dit_config_for(files), "vae_config": vae_config_for(files), "text_params": text_encoder_params(files)}


def parameter_count(config: DiTConfig) -> int:
    from hyvideo.dit import HunyuanVideoDiT

    with torch.device("meta"):
        return sum(p.numel() for p in HunyuanVideoDiT(config).parameters())


def default_cache_dir(files: ModelFiles) -> Path:
    """Where quantized weights are kept unless --cache-dir says otherwise: beside the model."""
    return Path(files.root) / "lowvram-cache"


def compute_dtypes(device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(DiT/LLM dtype, VAE/CLIP dtype) for unquantized weights on `device`."""
    if device.type == "cpu":
        return torch.float32, torch.float32
    return torch.bfloat16, torch.float16


class Stages:
    """Loads each stage's models for a run, or for runs that share them (see the module docstring)."""

    def __init__(self, files: ModelFiles, plan: Plan, device: torch.device, attention: str,
                 reporter: Reporter | None = None, cache_dir: Path | None = None, loras: list[LoraSpec] = ()):
        self.files, self.profile, self.plan, self.device = files, plan.profile, plan, device
        self.loras = list(loras)
        self.attention, self.reporter = attention, reporter or Reporter()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(files)
        self.dtype, self.vae_dtype = compute_dtypes(device)
        self.stats: dict = {}

    # -- text -----------------------------------------------------------------------------------

    def text_encoders(self) -> tuple[LlamaTextEncoder, ClipTextEncoder]:
        files = self.files
        if self.profile.encoder_scheme == "nf4":
            from transformers import AutoTokenizer

            from quant.nf4 import load_llm_nf4

            loaded = load_llm_nf4(files.llm, self.device, self.cache_dir, on_status=lambda status: self.reporter.stage(status.message))
            if loaded.reason:
                self.reporter.warn(f"NF4 text encoder unavailable ({loaded.reason}); running it in bf16 on the CPU")
            tokenizer = AutoTokenizer.from_pretrained(files.llm_tokenizer, padding_side="right", local_files_only=True)
            llm = LlamaTextEncoder(loaded.model, tokenizer)
        else:
            llm = LlamaTextEncoder.from_folder(files.llm, dtype=self.dtype, device=self.device, tokenizer_folder=files.llm_tokenizer)
        clip = ClipTextEncoder.from_folder(files.clip, dtype=self.vae_dtype, device=self.device, tokenizer_folder=files.clip_tokenizer)
        return llm, clip

    # -- DiT ------------------------------------------------------------------------------------

    @property
    def reads_dit_cache(self) -> bool:
        """Whether the DiT comes from the quantize-once cache (not bf16, not Tencent's FP8 file)."""
        scheme = self.profile.dit_scheme
        return scheme != "bf16" and not (scheme == "fp8" and self.files.dit_fp8 is not None)

    def _load_dit_on_host(self):
        files, scheme = self.files, self.profile.dit_scheme
        if scheme == "bf16":
            return load_dit(files, self.dtype)
        if not self.reads_dit_cache:
            from quant.tencent_fp8 import load_tencent_fp8

            return load_tencent_fp8(files.dit_fp8, self.plan.dit_config, files.dit_fp8_map, dtype=self.dtype)
        from quant.cache import load_cached_dit

        self.ensure_dit_cache()
        return load_cached_dit(self.cache_dir, self.plan.dit_config, scheme, self.profile.quant_policy, files.dit_weights, self.dtype)

    def ensure_dit_cache(self) -> None:
        """Build the quantize-once DiT cache if the profile reads one and it is missing or stale
        (with several ranks, rank 0 does this before the others load from it)."""
        if not self.reads_dit_cache:
            return
        from quant.cache import cache_status, ensure_dit_cache

        files, scheme = self.files, self.profile.dit_scheme
        policy, config = self.profile.quant_policy, self.plan.dit_config
        status = cache_status(self.cache_dir, config, scheme, policy, files.dit_weights, self.dtype)
        if status.state != "fresh":
            self.reporter.stage(status.message, total=config.double_blocks + config.single_blocks + 1)
            ensure_dit_cache(files.dit_weights, lambda: load_dit_state_dict(files)[0], config, scheme, policy,
                             self.cache_dir, self.dtype, on_progress=lambda done, total: self.reporter.advance(done, total=total))
            self.reporter.stage("loading DiT")

    def dit(self) -> tuple[torch.nn.Module, BlockStreamer]:
        """The DiT with its trunk on the device and its blocks placed per the plan; LoRAs wrap the
        loaded (possibly quantized) linears before placement, so they stream with their blocks."""
        model = self._load_dit_on_host()
        if self.loras:
            self.stats["lora"] = apply_loras(model, self.loras)
        model.attention_backend = self.attention
        scaled_mm = False
        if self.profile.dit_scheme == "fp8":  # before placing: the ring's shells copy the flag
            scaled_mm, note = choose_fp8_matmul(self.profile.fp8_matmul, self.device)
            if note:
                self.reporter.warn(note)
            set_scaled_mm(model, scaled_mm, self.device)
        streamer = place_dit(model, self.plan, self.device)
        self.stats["dit"] = {"resident_blocks": len(self.plan.schedule.resident), "attention": self.attention,
                             "fp8_matmul": "scaled_mm" if scaled_mm else "dequant" if self.profile.dit_scheme == "fp8" else None,
                             "streamed_blocks": len(self.plan.schedule.streamed), "pinned_bytes": streamer.pin_report.pinned_bytes}
        if self.profile.compile:
            self._graphs_before = dynamo_graphs()
            self.stats["dit"]["compiled_modules"] = compile_blocks(streamer, self.cache_dir)
        return model, streamer

    def step_cache(self, model: torch.nn.Module, steps: int, state: CacheState | None = None) -> TeaCache | None:
        """The profile's step cache for `model` (None when off), its probe (double block 0's image
        modulation) copied onto the device: deciding a step never waits for a streamed block."""
        if self.profile.step_cache == "off":
            return None
        return TeaCache.for_model(model, self.profile.step_cache_threshold, steps, self.device, state)

    def forward_stats(self, streamer: BlockStreamer, first: int) -> dict:
        """What was streamed per forward from forward `first` on (one run's, when runs share the
        DiT), and with --compile the graphs compiled for this DiT so far."""
        steps = [s for s in streamer.step_stats() if s.step >= first]
        stats = {"blocks_copied_per_step": [s.blocks_copied for s in steps], "bytes_copied_per_step": [s.bytes_copied for s in steps]}
        if self.profile.compile:
            # graphs compiled for this DiT so far: one per block kind unless something recompiled
            stats["dynamo_graphs"] = dynamo_graphs() - self._graphs_before
        return stats

    def release_dit(self, model: torch.nn.Module, streamer: BlockStreamer) -> None:
        """Free the DiT's device and pinned memory."""
        release_dit(model, streamer, keep_on_host=False)

    # -- VAE ------------------------------------------------------------------------------------

    def vae(self):
        return load_vae(self.files, self.vae_dtype).to(self.device)

    def decode(self, vae, latents: torch.Tensor, on_progress) -> torch.Tensor:
        """Latents -> uint8 frames through the tiled decoder (one tile when the profile says 0)."""
        self.stats["vae"] = {"tiles": 0}

        def on_tile(done: int, total: int) -> None:
            self.stats["vae"]["tiles"] = done
            on_progress(done, total)

        tiled = TiledVAE(vae, self.profile.vae_spatial_tile, self.profile.vae_temporal_tile, output_device="cpu", on_tile=on_tile)
        return decode(vae, latents, self.device, vae_decode=tiled.decode)
