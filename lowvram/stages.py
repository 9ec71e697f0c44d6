"""How each stage gets its models onto the device for a run's memory profile.

`resolve_profile` turns --profile (auto | plain | a name | a .toml file) into the profile dict
stored with the run (checking that it fits); `build_stages` turns that dict back into the object
that loads each stage: whole models ("plain": the tiny model, big GPUs) or the profile's placement
(NF4 LLM, quantized DiT with streamed blocks, tiled VAE decode). `reporter` is the runner's
progress object (only `.warn` and `.stage` are used).
"""

import json
from pathlib import Path

import torch

from hyvideo.checkpoint import ModelFiles, infer_dit_config, load_dit, load_vae
from hyvideo.config import DiTConfig, VAEConfig
from hyvideo.errors import HyVideoError
from hyvideo.pipeline import GenerationRequest, decode
from hyvideo.text_encoder import ClipTextEncoder, LlamaTextEncoder
from hyvideo.weight_io import read_torch_file

from .progress import Reporter
from .sizes import SIZE_BUCKETS

CPU_MAX_DIT_PARAMS = 1_000_000_000  # the real DiT has 12.8 B; tiny test/demo models a few hundred k


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


def parameter_count(config: DiTConfig) -> int:
    from hyvideo.dit import HunyuanVideoDiT

    with torch.device("meta"):
        return sum(p.numel() for p in HunyuanVideoDiT(config).parameters())


# A run's profile is stored in its settings as a plain dict (what `Profile.to_dict()` gives, or
# PLAIN below). `resolve_profile` turns --profile into that dict (checking that it fits), and
# `build_stages` turns the dict back into the objects that load each stage's models.

PLAIN = "plain"  # every model whole on the device, unquantized; the tiny model and big GPUs


def plain_profile(device: torch.device) -> dict:
    dtype = "float32" if device.type == "cpu" else "bfloat16"
    return {"name": PLAIN, "description": "whole models on the device, unquantized", "dtype": dtype}


def gpu_memory() -> tuple[int, int]:
    """(free VRAM, available host RAM) in bytes, for choosing a profile."""
    from .doctor import host_ram

    free, _ = torch.cuda.mem_get_info()
    total, available = host_ram()
    return free, available or total or 0


def suggest_fit(width: int, height: int, frames: int, vram_bytes: int, ram_bytes: int | None,
                dit_config: DiTConfig | None = None, vae_config: VAEConfig | None = None) -> str | None:
    """What would fit this memory: `--profile NAME` (same video), else a smaller video."""
    from .profiles import choose_profile

    kwargs = {"dit_config": dit_config, "vae_config": vae_config}
    try:
        return f"--profile {choose_profile(vram_bytes, ram_bytes or 0, width, height, frames, **kwargs).name}"
    except HyVideoError:
        pass
    aspect = next((a for buckets in SIZE_BUCKETS.values() for a, wh in buckets.items() if wh == (width, height)), "16:9")
    shorter = [f for f in (65, 33) if f < frames]
    smaller = [(f"--frames {f}", (width, height, f)) for f in shorter]
    if SIZE_BUCKETS["540p"][aspect] != (width, height):
        small = SIZE_BUCKETS["540p"][aspect]
        smaller[1:1] = [(f"--resolution 540p --aspect {aspect}", (*small, frames))]
        smaller += [(f"--resolution 540p --aspect {aspect} --frames {f}", (*small, f)) for f in shorter]
    for hint, (w, h, f) in smaller:
        try:
            name = choose_profile(vram_bytes, ram_bytes or 0, w, h, f, **kwargs).name
            return f"{hint} --profile {name}"
        except HyVideoError:
            continue
    return None


def resolve_profile(spec: str, device: torch.device, dit_config: DiTConfig, vae_config: VAEConfig,
                    request: GenerationRequest, params: int, reporter: Reporter) -> dict:
    """--profile (auto | plain | a shipped name | a .toml path) -> the profile dict for the run."""
    from .profiles import choose_profile, load_profile

    if spec not in ("auto", PLAIN):
        profile = load_profile(spec)  # unknown name or malformed file -> HyVideoError
        if device.type == "cpu":  # only the tiny model gets here: run the profile's code path as is
            reporter.warn(f"profile {profile.name} on the CPU: its memory budget is not checked")
            return {**profile.to_dict(), "source": profile.source}
    if device.type == "cpu" or spec == PLAIN or (spec == "auto" and params < CPU_MAX_DIT_PARAMS):
        return plain_profile(device)
    vram, ram = gpu_memory()
    size = (request.width, request.height, request.frames)
    if spec == "auto":
        profile = choose_profile(vram, ram, *size, dit_config=dit_config, vae_config=vae_config)
    else:
        from .planner import plan, with_budget

        if vram < profile.vram_budget_bytes:  # as choose_profile does: "auto" resident blocks use what is free
            profile = with_budget(profile, vram)
        found = plan(profile, *size, host_ram_bytes=ram, dit_config=dit_config, vae_config=vae_config)
        if not found.fits:
            hint = suggest_fit(*size, vram, ram, dit_config, vae_config)
            raise HyVideoError(
                f"profile {profile.name} does not fit {request.width}x{request.height}x{request.frames} here: it needs "
                f"{found.required_vram_gb:.1f} GiB VRAM ({vram / 2**30:.1f} free) and {found.peak_ram_gb:.1f} GiB RAM "
                f"({ram / 2**30:.1f} available); " + (f"try {hint}" if hint else "try a smaller --size or fewer --frames")
            )
    return {**profile.to_dict(), "source": profile.source}


class PlainStages:
    """Each stage's model loaded whole onto the device, unquantized (profile "plain")."""

    def __init__(self, files: ModelFiles, profile: dict, device: torch.device, attention: str):
        self.files, self.device, self.attention = files, device, attention
        cpu = device.type == "cpu"
        self.dit_dtype = torch.float32 if cpu else torch.bfloat16
        self.vae_dtype = self.text_dtype = torch.float32 if cpu else torch.float16

    def text_encoders(self) -> tuple[LlamaTextEncoder, ClipTextEncoder]:
        files = self.files
        llm = LlamaTextEncoder.from_folder(files.llm, dtype=self.text_dtype, device=self.device, tokenizer_folder=files.llm_tokenizer)
        clip = ClipTextEncoder.from_folder(files.clip, dtype=self.text_dtype, device=self.device, tokenizer_folder=files.clip_tokenizer)
        return llm, clip

    def dit(self, calls: int = 1):
        dit = load_dit(self.files, self.dit_dtype).to(self.device)
        dit.attention_backend = self.attention
        return dit

    def vae(self):
        return load_vae(self.files, self.vae_dtype).to(self.device)

    def decode(self, vae, latents: torch.Tensor, on_progress) -> torch.Tensor:
        frames = decode(vae, latents, self.device)
        on_progress(1, 1)
        return frames


class StreamedDiT:
    """The DiT as the denoising loop calls it (`dit(x, t, ...)`, `.compute_dtype`), its blocks
    coming from a BlockStreamer (lowvram/streaming.py) placed per the run's memory plan."""

    def __init__(self, model, streamer, calls: int):
        self.model, self.streamer, self.calls_left = model, streamer, calls

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.model.compute_dtype

    def __call__(self, *args):
        self.calls_left -= 1
        return self.model(*args, blocks=self.streamer.blocks_for_step(prefetch_next_step=self.calls_left > 0))

    def release(self) -> None:
        from .placement import release_dit

        release_dit(self.model, self.streamer, keep_on_host=False)


def quant_cache_dir(files: ModelFiles) -> Path:
    """Where `lowvram quantize` and the fp8/int8 profiles keep the quantized DiT."""
    return Path(files.root) / "lowvram-cache"


class ProfileStages:
    """Stages placed per a memory profile: the LLM in NF4 (or bf16), the DiT quantized (Tencent's
    FP8 file, or the quantize-once cache) with its blocks resident or streamed per the memory plan,
    the VAE decoded in tiles."""

    def __init__(self, files: ModelFiles, profile: dict, device: torch.device, attention: str, size: tuple[int, int, int],
                 reporter: Reporter):
        from .planner import plan
        from .profiles import profile_from_dict

        values = {k: v for k, v in profile.items() if k != "source"}
        self.profile = profile_from_dict(values, profile.get("source") or profile["name"])
        self.files, self.device, self.attention, self.reporter = files, device, attention, reporter
        self.dit_config, self.vae_config = dit_config_for(files), vae_config_for(files)
        self.plan = plan(self.profile, *size, dit_config=self.dit_config, vae_config=self.vae_config)

    def text_encoders(self) -> tuple[LlamaTextEncoder, ClipTextEncoder]:
        from transformers import AutoTokenizer

        files = self.files
        if self.profile.encoder_scheme == "nf4":
            from quant.nf4 import load_llm_nf4

            loaded = load_llm_nf4(files.llm, self.device)
            if loaded.reason:
                self.reporter.warn(f"NF4 text encoder unavailable ({loaded.reason}); running it in bf16 on the CPU")
            tokenizer = AutoTokenizer.from_pretrained(files.llm_tokenizer, padding_side="right", local_files_only=True)
            llm = LlamaTextEncoder(loaded.model, tokenizer)
        else:
            llm = LlamaTextEncoder.from_folder(files.llm, dtype=torch.bfloat16, device=self.device, tokenizer_folder=files.llm_tokenizer)
        clip = ClipTextEncoder.from_folder(files.clip, dtype=torch.float16 if self.device.type == "cuda" else torch.float32,
                                           device=self.device, tokenizer_folder=files.clip_tokenizer)
        return llm, clip

    def _load_dit_on_host(self):
        from hyvideo.checkpoint import load_dit_state_dict

        files, scheme = self.files, self.profile.dit_scheme
        if scheme == "bf16":
            return load_dit(files, torch.bfloat16)
        if scheme == "fp8" and files.dit_fp8 is not None:
            from quant.tencent_fp8 import load_tencent_fp8

            return load_tencent_fp8(files.dit_fp8, self.dit_config, files.dit_fp8_map, device="cpu")
        from quant.cache import cache_status, ensure_dit_cache, load_cached_dit

        policy = self.profile.quant_policy
        cache = quant_cache_dir(files)
        status = cache_status(cache, self.dit_config, scheme, policy, files.dit_weights)
        if status.state != "fresh":
            self.reporter.stage(status.message)
            ensure_dit_cache(files.dit_weights, lambda: load_dit_state_dict(files)[0], self.dit_config, scheme, policy, cache)
            self.reporter.stage("loading DiT")
        return load_cached_dit(cache, self.dit_config, scheme, policy, files.dit_weights, device="cpu")

    def dit(self, calls: int = 1):
        from .placement import prepare_dit

        model = self._load_dit_on_host()
        model.attention_backend = self.attention
        return StreamedDiT(model, prepare_dit(model, self.plan, self.device), calls)

    def vae(self):
        return load_vae(self.files, torch.float16 if self.device.type == "cuda" else torch.float32).to(self.device)

    def decode(self, vae, latents: torch.Tensor, on_progress) -> torch.Tensor:
        from .tiled_vae import TiledVAE

        tiled = TiledVAE(vae, self.profile.vae_spatial_tile, self.profile.vae_temporal_tile, output_device="cpu",
                         on_tile=on_progress)
        return decode(vae, latents, self.device, vae_decode=tiled.decode)


def build_stages(files: ModelFiles, profile: dict, device: torch.device, attention: str,
                 size: tuple[int, int, int] = (0, 0, 0), reporter: Reporter | None = None):
    """The object that loads each stage's models for `profile`: text_encoders() -> (llm, clip),
    dit(calls) -> a callable DiT (with .compute_dtype, optionally .release()), vae(),
    decode(vae, latents, on_progress) -> uint8 frames."""
    if profile["name"] == PLAIN:
        return PlainStages(files, profile, device, attention)
    return ProfileStages(files, profile, device, attention, size, reporter or Reporter())
