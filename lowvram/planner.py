"""Memory plan: predicted peak VRAM and host RAM of each stage for a profile and a video size,
and the choice of profile for a run.

    profile, p = resolve(settle_profile("auto", overrides), 1280, 720, 129, vram_bytes=free_vram, ram_bytes=available_ram)
    p = plan(load_profile("16gb"), width=1280, height=720, frames=129, host_ram_bytes=...)
    p.fits, p.peak_vram_gb, p.to_dict(), p.table_rows(), str(p.schedule)

The planner only plans: the candidate profiles come settled (`lowvram.profiles.settle_profile`:
the profile with the user's overrides). `resolve` is the one place a run's profile is chosen among
them and planned (`lowvram plan`, `generate`, `resume`, "auto"); the Plan it returns is what the
stages are built from.

Stages run one after another, each with only its own weights on the GPU (lowvram/stages.py):
- text: the LLM (nf4 or bf16) and CLIP, loaded together; peak = both encoders + the LLM's activations.
        Image-to-video adds LLaVA's vision tower and the VAE that encodes the conditioning image in
        the profile's spatial tiles (lowvram/tiled_vae.py; the largest activations at 720p untiled).
- dit:  trunk (embedders, refiner, final layer; bf16) + resident blocks + the streaming ring +
        activations of one forward at the profile's token chunk (lowvram/activations.py) + the
        transient bf16 copy of the largest quantized linear being run + latents; with a step cache,
        block 0's image modulation (the probe). The cache's own tensors (two image-token states
        while deciding, or one plus the residual on a reused step) exist only between forwards,
        when no block's activations do, and are smaller than those: they add no peak.
- vae:  decoder weights (fp16) + one tile's activations + the assembled temporal tile and the tails
        kept for blending (lowvram/tiled_vae.py). The decoded video goes to host memory.

`peak_vram_*` is what torch.cuda.max_memory_allocated would report. Fitting also needs a reserve
(`RESERVE_BYTES`: CUDA context, cuBLAS/cuDNN workspaces, allocator fragmentation) on top.
Host RAM per stage, the process's own (anonymous) memory, which must fit in RAM: a baseline for the
process (Python, torch, the CUDA runtime, tokenizers: 2 GiB, an allowance, not a measurement of
every machine), the streamed DiT blocks' pinned copies (up to the profile's cap), the decoded video
(float32), and what building a quantize-once cache costs the first time (`first use`: the DiT
quantized one tensor at a time, whose float32 temporaries peak at the largest linear; the LLM's
largest tensor while NF4 quantizes it on the GPU). Weights are otherwise loaded straight to their
device, shard by shard, from read-only mapped files: those pages are page cache, listed apart
(`page_cache`), which the kernel drops under pressure (a streamed block whose pages were dropped
is read from disk again: slower, never an out-of-memory).

"auto" resident blocks: the most blocks (spread evenly) that fit the budget left after the
reserve, trunk, ring and activations. Host RAM with a step cache adds its residual (one image-token
state, bf16: 0.73 GB at 720p x 129) and that residual's serialized copy while a checkpoint is written;
HunyuanVideo-1.5's DeepCache its last block's input per forward (image and text tokens) likewise,
and keeps that block resident (its cached steps run it alone).

Weight bytes come from quant/bytes.py, the accounting the quantized modules really use.

Several GPUs (`layout`, lowvram/parallel.py: one process per GPU, the clip's image tokens split
across them): VRAM is per GPU. Each rank's DiT stage is the profile's placement for N / world image
tokens plus all the text, with the cross-rank attention's buffers as their own part; the text
encoders and the VAE run on rank 0's GPU alone. Host RAM is per machine: each of the `local_ranks`
processes on it holds its own DiT-stage RAM (its own pinned copy of the streamed blocks; a quantized
cache is built once, by rank 0, before the others load), while rank 0 encodes the others wait
holding their process baseline, and after denoising they exit, so rank 0 decodes alone. The weight
files' page cache is shared by the processes. `Plan.communication`: the bytes each rank sends per forward.
"""

import dataclasses
import math
from dataclasses import dataclass

from hyvideo.config import DIT_CONFIGS, VAE_CONFIGS, DiTConfig, VAEConfig
from hyvideo.dit import token_grid
from hyvideo.errors import HyVideoError
from hyvideo.lora import LoraBytes
from hyvideo.text_encoder import (
    TEXT_LEN,
)
from hyvideo.v15_config import (
    V15DiTConfig,
    V15VAEConfig,
)
from hyvideo.v15_step_cache import DEEPCACHE
from hyvideo.vae import latent_shape
from quant.bytes import (
    TextEncoderSize,
    block_bytes,
    dequantized_weight_bytes,
    dit_block_kinds,
    modulation_probe_bytes,
    trunk_bytes,
    vae_decoder_bytes,
    vae_parameters,
)

from .activations import (
    dit_activation_bytes,
    v15_vae_decode_tile_bytes,
    v15_vae_encode_frame_bytes,
    vae_decode_tile_bytes,
    vae_encode_frame_bytes,
    vae_tile_pixels,
)
from .communication import PCIE4_X8_GBS, Communication, communication
from .families import hunyuan_text_encoders
from .parallel import Layout, check_parallel, split_axis
from .profiles import Profile
from .schedule import BlockSchedule, plan_schedule
from .sizes import SIZE_BUCKETS, V15_SIZE_BUCKETS, align_up
from .tiled_vae import decode_tiling, encode_tiling, spatial_tile_for
from .units import GIB

RESERVE_BYTES = int(0.75 * GIB)  # CUDA context (~0.4 GiB) + library workspaces + fragmentation
HOST_BASELINE_BYTES = 2 * GIB  # Python, torch and CUDA runtime on the host side, tokenizers (an allowance)
F32 = 4
STAGES = ("text", "dit", "vae")
# The conditioning image is encoded at the video's size, a bucket of the tier (hyvideo/image.py):
# at 720p (base 960) at most 30 x 30 patches of 32 px, 960 x 960 the largest.
I2V_IMAGE_SIZE = (960, 960)


@dataclass
class StagePlan:
    vram_bytes: int
    parts: dict[str, int]  # what the VRAM figure is made of, in bytes
    ram_parts: dict[str, int]  # the host's anonymous memory (pinned included), in bytes
    page_cache_bytes: int = 0  # weight files read through the page cache (droppable)

    @property
    def ram_bytes(self) -> int:
        return sum(self.ram_parts.values())

    @property
    def pinned_bytes(self) -> int:
        return self.ram_parts.get("pinned blocks", 0)

    def to_dict(self) -> dict:
        return {"vram_gb": self.vram_bytes / GIB, "ram_gb": self.ram_bytes / GIB, "pinned_gb": self.pinned_bytes / GIB,
                "page_cache_gb": self.page_cache_bytes / GIB, "parts_gb": {k: v / GIB for k, v in self.parts.items()},
                "ram_parts_gb": {k: v / GIB for k, v in self.ram_parts.items()}}


@dataclass
class Plan:
    profile: Profile
    width: int
    height: int
    frames: int
    latent: tuple[int, int, int]  # (T', h, w)
    tokens: int  # DiT image tokens
    schedule: BlockSchedule
    token_chunk: int
    stages: dict[str, StagePlan]
    vram_budget_bytes: int
    host_ram_bytes: int | None  # None: RAM not checked
    dit_config: DiTConfig
    vae_config: VAEConfig
    reserve_bytes: int = RESERVE_BYTES
    layout: Layout | None = None  # sequence parallelism: VRAM per GPU, RAM per machine
    local_ranks: int = 1  # processes on this machine
    text_tokens: int = TEXT_LEN  # the most text tokens the DiT reads (I2V: the image's states too): on every rank

    @property
    def world(self) -> int:
        return self.layout.world if self.layout else 1

    @property
    def rank_tokens(self) -> int:
        """Image tokens each rank holds."""
        return self.tokens // self.world

    @property
    def per_gpu(self) -> str:
        """How the VRAM figures read: " per GPU" with several GPUs."""
        return " per GPU" if self.layout else ""

    @property
    def communication(self) -> Communication | None:
        if self.layout is None:
            return None
        return communication(self.dit_config, self.rank_tokens, self.layout, self.text_tokens)

    @property
    def peak_vram_bytes(self) -> int:
        return max(s.vram_bytes for s in self.stages.values())

    @property
    def peak_ram_bytes(self) -> int:
        return max(s.ram_bytes for s in self.stages.values())

    @property
    def peak_vram_gb(self) -> float:
        return self.peak_vram_bytes / GIB

    @property
    def peak_ram_gb(self) -> float:
        return self.peak_ram_bytes / GIB

    @property
    def required_vram_gb(self) -> float:
        """Peak plus the reserve: what the GPU must have free."""
        return (self.peak_vram_bytes + self.reserve_bytes) / GIB

    @property
    def fits_vram(self) -> bool:
        return self.peak_vram_bytes + self.reserve_bytes <= self.vram_budget_bytes

    @property
    def fits_ram(self) -> bool:
        return self.host_ram_bytes is None or self.peak_ram_bytes <= self.host_ram_bytes

    @property
    def fits(self) -> bool:
        return self.fits_vram and self.fits_ram

    def to_dict(self, link_gbs: float = PCIE4_X8_GBS) -> dict:
        """link_gbs: the GPUs' link bandwidth for the communication estimate (several GPUs)."""
        return {
            "fits": self.fits,
            "fits_vram": self.fits_vram,
            "fits_ram": self.fits_ram,
            "profile": self.profile.name,
            "video": {"width": self.width, "height": self.height, "frames": self.frames},
            "latent": list(self.latent),
            "tokens": self.tokens,
            "peak_vram_gb": self.peak_vram_gb,
            "required_vram_gb": self.required_vram_gb,
            "reserve_gb": self.reserve_bytes / GIB,
            "vram_budget_gb": self.vram_budget_bytes / GIB,
            "peak_ram_gb": self.peak_ram_gb,
            "host_ram_gb": None if self.host_ram_bytes is None else self.host_ram_bytes / GIB,
            "token_chunk": self.token_chunk,
            "stages": {name: stage.to_dict() for name, stage in self.stages.items()},
            "schedule": self.schedule.to_dict(),
            "parallel": self.parallel_dict(link_gbs),
        }

    def parallel_dict(self, link_gbs: float = PCIE4_X8_GBS) -> dict | None:
        if self.layout is None:
            return None
        return {"world": self.layout.world, "ulysses": self.layout.ulysses, "ring": self.layout.ring, "layout": str(self.layout),
                "local_ranks": self.local_ranks, "image_tokens_per_rank": self.rank_tokens,
                "vram": "per GPU: each rank's DiT stage; rank 0's GPU also runs the text encoders and the VAE",
                "ram": f"per machine: {self.local_ranks} processes, each with its own DiT-stage RAM (pinned blocks "
                       "included); the text stage adds the waiting processes' baselines; the others exit before the VAE",
                "communication": self.communication.to_dict(link_gbs)}

    def table_rows(self) -> list[list[str]]:
        """Header + one row per stage + a total row, as strings (the CLI renders them)."""
        rows = [["stage", f"VRAM GiB{self.per_gpu}", "RAM GiB" + (" per machine" if self.layout else ""), "page cache GiB",
                 "made of"]]
        for name, stage in self.stages.items():
            parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in stage.parts.items() if v)
            ram = ", ".join(f"{k} {v / GIB:.2f}" for k, v in stage.ram_parts.items() if v)
            rows.append([name, f"{stage.vram_bytes / GIB:.2f}", f"{stage.ram_bytes / GIB:.2f}",
                         f"{stage.page_cache_bytes / GIB:.2f}", f"VRAM: {parts}; RAM: {ram}"])
        verdict = "fits" if self.fits else "does NOT fit"
        rows.append(["peak", f"{self.peak_vram_gb:.2f} (+{self.reserve_bytes / GIB:.2f} reserve)",
                     f"{self.peak_ram_gb:.2f}", "", f"{verdict} in {self.vram_budget_bytes / GIB:.1f} GiB VRAM{self.per_gpu}"
                     + ("" if self.host_ram_bytes is None else f", {self.host_ram_bytes / GIB:.1f} GiB RAM")])
        return rows


def first_use_quantize_bytes(config: DiTConfig) -> int:
    """Anonymous memory of building the DiT cache (quant/cache.py), one tensor at a time: the
    largest linear's fused bf16 weight plus its float32 copy, |w| and w / scale in the quantizer."""
    largest = config.mlp_hidden * config.hidden_size  # MLP fc1 / fc2
    if config.single_blocks:
        largest = max(config.hidden_size * (3 * config.hidden_size + config.mlp_hidden), largest)  # single block linear1
    return largest * (2 + 3 * F32)


def dit_schedule(profile: Profile, config: DiTConfig, fixed_bytes: int, budget_bytes: int,
                 lora: LoraBytes = LoraBytes()) -> BlockSchedule:
    """The block schedule for this profile: `fixed_bytes` (trunk, activations) are on the GPU too;
    a LoRA's tensors travel with their blocks."""
    kinds = dit_block_kinds(config)
    sizes = [block_bytes(config, profile.dit_scheme, profile.quant_policy, kind).total + lora.block(kind) for kind in kinds]
    keep = (len(kinds) - 1,) if profile.step_cache == DEEPCACHE else ()  # DeepCache's cached steps run the last block alone
    if profile.resident_blocks == "auto":
        return plan_schedule(kinds, sizes, prefetch_depth=profile.prefetch_depth,
                             budget_bytes=max(0, budget_bytes - RESERVE_BYTES - fixed_bytes), keep=keep)
    return plan_schedule(kinds, sizes, prefetch_depth=profile.prefetch_depth,
                         resident=min(int(profile.resident_blocks), len(kinds)), keep=keep)


def vae_stage(profile: Profile, config: VAEConfig, latent: tuple[int, int, int], act_bytes: int = 2) -> tuple[int, dict]:
    """VRAM of the tiled decode: weights + one tile's activations + assembly buffers."""
    frames_latent, h, w = latent
    spatial = spatial_tile_for(profile.vae_spatial_tile, config.spatial_compression_ratio)
    tile_bytes = v15_vae_decode_tile_bytes if isinstance(config, V15VAEConfig) else vae_decode_tile_bytes
    tiled_space = spatial and (h > spatial or w > spatial)
    tile_h, tile_w = (min(h, spatial), min(w, spatial)) if tiled_space else (h, w)
    tiles_t = decode_tiling(latent, spatial, profile.vae_temporal_tile)[0]
    tile_t = max(span.src_stop - span.src_start for span in tiles_t)
    out_frames, out_h, out_w = vae_tile_pixels(config, tile_t, h, w)  # one temporal tile, whole frame
    blend = max((span.blend for span in tiles_t), default=0)
    parts = {
        "weights": vae_decoder_bytes(config, act_bytes),
        "tile activations": tile_bytes(config, tile_t, tile_h, tile_w, act_bytes),
        "assembly": (out_frames + blend) * out_h * out_w * config.out_channels * act_bytes,
        "latents": config.latent_channels * frames_latent * h * w * 4,
    }
    return sum(parts.values()), parts


def image_encode_bytes(profile: Profile, config: VAEConfig, image_size: tuple[int, int], act_bytes: int = 2) -> int:
    """Peak activations of encoding the conditioning image (one frame, height x width) in the
    profile's spatial tiles (the same pixels for the 1.5 VAE's 16x latents; one tile when they are
    0): one tile's encode, the whole frame's pixels, and the assembled latents with the strips kept
    for blending (each at most the latents' size)."""
    height, width = image_size
    spatial = spatial_tile_for(profile.vae_spatial_tile, config.spatial_compression_ratio)
    _, h_spans, w_spans = encode_tiling((1, height, width), spatial, config.time_compression_ratio,
                                        config.spatial_compression_ratio)
    tile_h = max(span.src_stop - span.src_start for span in h_spans)
    tile_w = max(span.src_stop - span.src_start for span in w_spans)
    pixels = config.in_channels * height * width * act_bytes
    latents = config.latent_channels * sum(s.keep for s in h_spans) * sum(s.keep for s in w_spans) * act_bytes
    frame_bytes = v15_vae_encode_frame_bytes if isinstance(config, V15VAEConfig) else vae_encode_frame_bytes
    return frame_bytes(config, tile_h, tile_w, act_bytes) + pixels + 2 * latents


def plan(
    profile: Profile, width: int, height: int, frames: int, *, host_ram_bytes: int | None = None,
    dit_config: DiTConfig | None = None, vae_config: VAEConfig | None = None,
    text_encoders: tuple[TextEncoderSize, ...] | None = None, lora_bytes: LoraBytes | None = None,
    layout: Layout | None = None, local_ranks: int | None = None, text_tokens: int = TEXT_LEN,
    image_size: tuple[int, int] | None = None, forwards_per_step: int = 1,
) -> Plan:
    """Predict each stage's peak memory for `profile` at width x height x frames (batch 1).

    width/height are rounded up to multiples of 16, as the sampler does (facts §5.4).
    What the model contributes to each stage: its DiT config (blocks and their bytes), its VAE
    config and its text encoders (`TextEncoderSize`s; () leaves out the text stage, e.g.
    embeddings computed elsewhere); all default to the released 13B model's. lora_bytes: what the
    run's LoRAs add (hyvideo.lora.lora_bytes), in the blocks and outside them.
    layout: sequence parallelism over layout.world GPUs (module docstring), `local_ranks` of them
    on this machine (default: all). text_tokens: the most text tokens the DiT reads (I2V: the
    image's states too, `i2v_text_tokens`). image_size: image-to-video's conditioning image,
    (height, width) as the VAE encodes it in the text stage (`image_encode_bytes`); None: no image.
    forwards_per_step: DiT forwards per step (2: real classifier-free guidance, run one after the
    other: the activations of one forward, two velocities, every streamed block copied twice a step).
    """
    dit_config = dit_config or DIT_CONFIGS["HYVideo-T/2-cfgdistill"]
    vae_config = vae_config or VAE_CONFIGS["884-16c-hy"]
    if width < 1 or height < 1:
        raise HyVideoError(f"video size must be positive, got {width}x{height}")
    width, height = align_up(width, 16), align_up(height, 16)
    channels, t_lat, h_lat, w_lat = latent_shape(frames, height, width, vae_config)
    grid = token_grid((t_lat, h_lat, w_lat), dit_config.patch_size)
    tokens = math.prod(grid)
    budget = profile.vram_budget_bytes
    world = layout.world if layout else 1
    if layout:
        split_axis(grid, world)  # the ranks' shares are equal, else a HyVideoError naming the fix
    local_ranks = world if local_ranks is None else local_ranks
    if not 1 <= local_ranks <= world:
        raise HyVideoError(f"local_ranks must be 1..{world} (the ranks on this machine), not {local_ranks}")
    rank_tokens = tokens // world

    latent_bytes = channels * t_lat * h_lat * w_lat * 4
    chunk = profile.token_chunk or None
    scaled_mm = profile.dit_scheme == "fp8" and profile.fp8_matmul != "dequant"  # "auto" may take it: counted
    activations = dit_activation_bytes(dit_config, rank_tokens, chunk, text_tokens, scaled_mm=scaled_mm)
    dit_parts = {
        "trunk": trunk_bytes(dit_config),
        "activations": activations,
        "dequantized weight": dequantized_weight_bytes(dit_config, profile.dit_scheme, profile.quant_policy),
        # latents, velocity, Euler update (float32); under CFG both forwards' velocities and their difference
        "latents": (3 + 2 * (forwards_per_step - 1)) * latent_bytes,
    }
    if world > 1:  # what the cross-rank attention adds to the forward's peak
        dit_parts["sequence-parallel buffers"] = dit_activation_bytes(dit_config, rank_tokens, chunk, text_tokens, layout=layout,
                                                                      scaled_mm=scaled_mm) - activations
    if profile.step_cache not in ("off", DEEPCACHE):  # TeaCache decides from block 0's image modulation
        dit_parts["step cache probe"] = modulation_probe_bytes(dit_config, profile.dit_scheme, profile.quant_policy)
    lora_bytes = lora_bytes or LoraBytes()
    if lora_bytes.trunk:
        dit_parts["lora (trunk)"] = lora_bytes.trunk
    schedule = dit_schedule(profile, dit_config, sum(dit_parts.values()), budget, lora_bytes)
    if forwards_per_step != 1:
        schedule = dataclasses.replace(schedule, forwards_per_step=forwards_per_step)
    dit_parts["resident blocks"] = schedule.resident_bytes
    dit_parts["ring"] = schedule.ring_bytes

    stages = {}
    encoders = hunyuan_text_encoders() if text_encoders is None else text_encoders
    if encoders:
        scheme = profile.encoder_scheme
        last = max(encoder.phase for encoder in encoders)
        weights = {encoder.name: (encoder.phase, encoder.weight_bytes(scheme)) for encoder in encoders}
        activations = {encoder.name: encoder.activation_bytes for encoder in encoders}
        if image_size is not None:  # the whole VAE (fp16), loaded after the (last phase's) text encoders, in the same stage
            weights["image encode"] = (last, vae_parameters(vae_config) * 2)
            activations["image encode"] = image_encode_bytes(profile, vae_config, image_size)

        def phase_parts(phase: int) -> dict[str, int]:
            names = [name for name, (p, _) in weights.items() if p == phase]
            return {**{name: weights[name][1] for name in names}, "activations": max(activations[name] for name in names)}

        # phases run one after the other, each freed before the next: the stage's peak is the largest phase's
        text_parts = max((phase_parts(p) for p in sorted({p for p, _ in weights.values()})), key=lambda parts: sum(parts.values()))
        text_files = sum(size for _, size in weights.values())
        text_ram = {"baseline": HOST_BASELINE_BYTES}
        if scheme == "nf4":  # first use: each 16-bit tensor on the host while the GPU quantizes it;
            text_ram["first use (NF4 cache)"] = sum(e.other * 2 for e in encoders if e.linear)  # the largest: the embeddings
        if local_ranks > 1:
            text_ram["waiting ranks' baselines"] = (local_ranks - 1) * HOST_BASELINE_BYTES
        stages["text"] = StagePlan(sum(text_parts.values()), text_parts, text_ram, text_files)
    pinned = schedule.pinned_bytes(profile.pinned_ram_cap_bytes) if profile.pin_memory else 0  # whole blocks, as pinned
    dit_ram = {"baseline": HOST_BASELINE_BYTES, "pinned blocks": pinned}
    if profile.step_cache == DEEPCACHE:  # the last block's input per forward (all image tokens and the text), its serialized copy
        dit_ram["step cache"] = 2 * forwards_per_step * (tokens + text_tokens) * dit_config.hidden_size * 2
    elif profile.step_cache != "off":  # the residual (all tokens, gathered on every rank), and its serialized copy at a checkpoint
        dit_ram["step cache"] = 2 * tokens * dit_config.hidden_size * 2 + latent_bytes
    if lora_bytes.total(dit_config):  # built on the host, then moved with their blocks
        dit_ram["lora"] = lora_bytes.total(dit_config)
    dit_ram = {name: local_ranks * value for name, value in dit_ram.items()}  # every rank on this machine holds its own
    if profile.dit_scheme != "bf16":  # rank 0 alone builds it, before the other ranks load the DiT
        dit_ram["first use (DiT cache)"] = first_use_quantize_bytes(dit_config)
    dit_files = trunk_bytes(dit_config) + sum(schedule.block_bytes) - (lora_bytes.total(dit_config) - lora_bytes.trunk)
    stages["dit"] = StagePlan(sum(dit_parts.values()), dit_parts, dit_ram, dit_files)
    vae_vram, vae_parts = vae_stage(profile, vae_config, (t_lat, h_lat, w_lat))
    video_bytes = vae_config.out_channels * frames * height * width * 4  # float32 on the host
    vae_ram = {"baseline": HOST_BASELINE_BYTES, "video": video_bytes}  # the other ranks have exited after denoising
    stages["vae"] = StagePlan(vae_vram, vae_parts, vae_ram, vae_decoder_bytes(vae_config))
    return Plan(profile, width, height, frames, (t_lat, h_lat, w_lat), tokens, schedule, profile.token_chunk,
                stages, budget, host_ram_bytes, dit_config, vae_config, layout=layout, local_ranks=local_ranks,
                text_tokens=text_tokens)


def parallel_layout(mode: str, gpus: int, width: int, height: int, frames: int, dit_config: DiTConfig | None = None,
                    vae_config: VAEConfig | None = None) -> Layout:
    """--parallel MODE --gpus N for this video: the layout, or one HyVideoError naming the fix
    (heads that do not divide for Ulysses, a token grid that does not split, fewer than 1 GPU)."""
    dit_config = dit_config or DIT_CONFIGS["HYVideo-T/2-cfgdistill"]
    _, *latent = latent_shape(frames, align_up(height, 16), align_up(width, 16), vae_config or VAE_CONFIGS["884-16c-hy"])
    return check_parallel(mode, gpus, dit_config.heads, token_grid(latent, dit_config.patch_size))


def with_budget(profile: Profile, vram_bytes: int) -> Profile:
    """The same profile with another VRAM budget (e.g. what the GPU has free)."""
    return dataclasses.replace(profile, vram_budget_gb=vram_bytes / GIB)


def choose_profile(free_vram_bytes: int, host_ram_bytes: int, width: int, height: int, frames: int,
                   profiles: list[Profile], **plan_kwargs) -> tuple[Profile, Plan]:
    """The fastest of `profiles` whose plan fits the free VRAM and host RAM at this video size.

    Profiles are tried fastest first with their budget lowered to the free VRAM when that is less,
    so "auto" resident blocks use what this GPU really has. The returned profile carries that
    budget. No profile fits -> HyVideoError saying what the smallest one needs.
    """
    last = None
    for profile in sorted(profiles, key=lambda p: -p.vram_budget_gb):
        if free_vram_bytes < profile.vram_budget_bytes:
            profile = with_budget(profile, free_vram_bytes)
        last = plan(profile, width, height, frames, host_ram_bytes=host_ram_bytes, **plan_kwargs)
        if last.fits:
            return profile, last
    if last is None:
        raise HyVideoError("no profiles to choose from")
    raise HyVideoError(
        f"no profile fits {width}x{height}x{frames} with {free_vram_bytes / GIB:.1f} GiB free VRAM{last.per_gpu} and "
        f"{host_ram_bytes / GIB:.1f} GiB RAM: the smallest ({last.profile.name}) needs "
        f"{last.required_vram_gb:.1f} GiB VRAM{last.per_gpu} and {last.peak_ram_gb:.1f} GiB RAM; try a smaller video"
    )


def suggest_fit(width: int, height: int, frames: int, vram_bytes: int, ram_bytes: int | None, profiles: list[Profile],
                **plan_kwargs) -> str | None:
    """What would fit this memory: `--profile NAME` of `profiles` (same video), else a smaller video:
    fewer frames, the model's small tier (the 13B's 540p bucket, HunyuanVideo-1.5's 480p one as
    --size WxH) at the same aspect, or both."""
    if isinstance(plan_kwargs.get("dit_config"), V15DiTConfig):
        buckets, tier = V15_SIZE_BUCKETS, "480p"
    else:
        buckets, tier = SIZE_BUCKETS, "540p"
    aspect = next((a for tiers in buckets.values() for a, wh in tiers.items() if wh == (width, height)), "16:9")
    shorter = [f for f in (65, 33) if f < frames]
    attempts = [("", (width, height, frames))]
    attempts += [(f"--frames {f} ", (width, height, f)) for f in shorter]
    small = buckets[tier][aspect]
    if small != (width, height):
        option = f"--size {small[0]}x{small[1]} " if buckets is V15_SIZE_BUCKETS else f"--resolution {tier} --aspect {aspect} "
        attempts[2:2] = [(option, (*small, frames))]
        attempts += [(f"{option}--frames {f} ", (*small, f)) for f in shorter]
    for hint, size in attempts:
        try:
            chosen, _ = choose_profile(vram_bytes, ram_bytes or 0, *size, profiles, **plan_kwargs)
        except HyVideoError:
            continue
        return f"{hint}--profile {chosen.name}"
    return None


def resolve(candidates: list[Profile], width: int, height: int, frames: int, *, vram_bytes: int | None,
            ram_bytes: int | None, must_fit: bool = True, alternatives: list[Profile] = (), **plan_kwargs) -> tuple[Profile, Plan]:
    """The run's profile among the settled `candidates` and its plan.

    Several candidates ("auto"): the fastest that fits (else a HyVideoError saying what the smallest
    needs). One: its plan, with its budget lowered to the free VRAM when that is less, as "auto"
    does; vram_bytes None (the CPU) plans it against its own budget. must_fit: a plan that does not
    fit raises a HyVideoError naming what would, from `alternatives` (the shipped profiles with the
    same overrides); else the caller shows the plan. plan_kwargs: the model's sizes (see `plan`)."""
    if len(candidates) > 1:
        return choose_profile(vram_bytes, ram_bytes or 0, width, height, frames, candidates, **plan_kwargs)
    profile = candidates[0]
    if vram_bytes is not None and vram_bytes < profile.vram_budget_bytes:
        profile = with_budget(profile, vram_bytes)
    found = plan(profile, width, height, frames, host_ram_bytes=ram_bytes, **plan_kwargs)
    if must_fit and not found.fits:
        hint = suggest_fit(width, height, frames, found.vram_budget_bytes, ram_bytes, list(alternatives), **plan_kwargs)
        where = f"{vram_bytes / GIB:.1f} GiB free" if vram_bytes is not None else f"its {profile.vram_budget_gb:.1f} GiB budget"
        ram = f"{ram_bytes / GIB:.1f} GiB available" if ram_bytes is not None else "not checked"
        raise HyVideoError(
            f"profile {profile.name} does not fit {width}x{height}x{frames} here: it needs {found.required_vram_gb:.1f} GiB "
            f"VRAM{found.per_gpu} ({where}) and {found.peak_ram_gb:.1f} GiB RAM ({ram}); "
            + (f"try {hint}" if hint else "try a smaller --size or fewer --frames")
            + pinned_hint(found)
        )
    return profile, found


def pinned_hint(found: Plan) -> str:
    """When RAM is what is short and pinned blocks are part of it: how to pin less."""
    pinned = found.stages["dit"].pinned_bytes
    if found.fits_ram or not pinned:
        return ""
    return (f"; or pin less: the streamed blocks' pinned copies take {pinned / GIB:.1f} GiB, and a profile file "
            f"(`lowvram profiles show {found.profile.name}`) with a lower pinned_ram_cap_gb keeps the rest in the "
            "page cache (slower copies)")
