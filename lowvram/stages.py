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
    llm, clip = stages.text_encoders()           # image-to-video: LLaVA and CLIP
    condition = stages.encode_image(stages.vae(), image, height, width)  # image-to-video, in the text stage
    model, streamer = stages.dit(sequence_parallel)  # configured (configure_dit) and placed per the plan
    cache = stages.step_cache(model, request, state)  # None unless the profile caches steps
    latents = stages.denoise(model, streamer, embeddings, latents, request, start_step=k, on_step=..., cache=cache)
    stages.forward_stats(streamer, first)  # blocks/bytes streamed per forward since forward `first`
    stages.release_dit(model, streamer)
    frames = stages.decode(stages.vae(), latents, on_progress)
    stages.stats                          # what was streamed and tiled (recorded in the run)

HunyuanVideo-1.5 (`files.family == "hunyuanvideo-1.5"`) goes through the same `dit`, `vae`, `decode`
and `release_dit`; its text and denoising calls are its own:
    prompt, negative = stages.v15_text_encoder().encode(text)   # V15Prompt each (Qwen2.5-VL + byT5)
    image, (height, width) = stages.encode_v15_image(stages.vae(), stages.v15_image_encoder(), pil)  # I2V, Qwen freed first
    latents = stages.denoise_v15(model, streamer, prompt, negative, latents, files.sampling, start_step=k, on_step=..., image=image)

One process and every rank of a multi-GPU run go through the same `dit` and `denoise` calls.
"""

import copy
import json
from pathlib import Path

import torch

from hyvideo.attention import check_backend
from hyvideo.checkpoint import ModelFiles, load_dit, load_dit_state_dict, load_vae, official_dit_config
from hyvideo.config import DiTConfig, VAEConfig
from hyvideo.errors import HyVideoError
from hyvideo.files import file_fingerprint, write_atomic
from hyvideo.lora import LoraSpec, apply_loras
from hyvideo.models import dit_class
from hyvideo.v15_checkpoint import FAMILY as V15_FAMILY
from hyvideo.v15_checkpoint import load_v15_dit, load_v15_dit_state_dict, load_v15_vae, v15_dit_config, v15_vae_config
from hyvideo.v15_config import V15Sampling
from hyvideo.v15_pipeline import denoise as v15_denoise
from hyvideo.v15_pipeline import forwards_per_step
from hyvideo.v15_step_cache import DEEPCACHE, DeepCache
from hyvideo.image import image_to_pixels, resize_center_crop
from hyvideo.preview import HUNYUAN_LATENT_RGB_BIAS, HUNYUAN_LATENT_RGB_FACTORS, fit_latent_rgb
from hyvideo.pipeline import LATENT_CONCAT_DROPPED_FRAMES, GenerationRequest, ImageCondition, decode, denoise, encode_image
from hyvideo.step_cache import PRESETS as STEP_CACHE_PRESETS
from hyvideo.step_cache import CacheState, TeaCache
from hyvideo.text_encoder import ClipTextEncoder, LlamaTextEncoder, LlavaTextEncoder, TextEmbeddings
from hyvideo.weight_io import read_torch_file
from quant.bytes import TextEncoderSize, llm_param_counts
from quant.fp8 import set_scaled_mm
from quant.schemes import QUANT_SCHEMES

from .compile import compile_blocks, dynamo_graphs
from .families import hunyuan_i2v_text_encoders, hunyuan_text_encoders, i2v_text_tokens, v15_model_sizes
from .planner import I2V_IMAGE_SIZE, Plan
from .progress import Reporter
from .streaming import BlockStreamer, empty_cache, forward_blocks, place_dit, release_dit
from .tiled_vae import TiledVAE, spatial_tile_for

PREVIEW_RGB_FILE = "preview-rgb.json"  # HunyuanVideo-1.5's fitted latent-to-RGB projection, in the cache folder
CPU_MAX_DIT_PARAMS = 1_000_000_000  # the real DiT has 12.8 B; tiny test/demo models a few hundred k


def dit_config_for(files: ModelFiles) -> DiTConfig:
    """The DiT's config without loading its weights: diffusers' config.json, or the official
    checkpoint's tensor shapes (memory-mapped, so nothing is read but the shapes); a 1.5 folder's
    from its config.json."""
    if files.family == V15_FAMILY:
        return v15_dit_config(files)
    if files.layout == "diffusers":
        try:
            return DiTConfig.from_diffusers(json.loads(files.dit_config.read_text()))
        except (OSError, ValueError, KeyError) as error:
            raise HyVideoError(f"{files.dit_config} is not a HunyuanVideo transformer config ({error}); download it again") from None
    source = files.dit_weights[0] if files.dit_weights else files.dit_fp8
    return official_dit_config(files, read_torch_file(source))


def vae_config_for(files: ModelFiles) -> VAEConfig:
    if files.family == V15_FAMILY:
        return v15_vae_config(files)
    try:
        return VAEConfig.from_dict(json.loads(files.vae_config.read_text()))
    except (OSError, ValueError, TypeError) as error:
        raise HyVideoError(f"{files.vae_config} is not a VAE config ({error}); download it again") from None


def text_encoder_sizes(files: ModelFiles) -> tuple[TextEncoderSize, ...]:
    """The text encoders' sizes from their config.json (meta device, no weights read); for
    image-to-video LLaVA's language model and vision tower."""
    from transformers import AutoConfig, CLIPTextModel, CLIPVisionModel

    try:
        llm_config = AutoConfig.from_pretrained(files.llm, local_files_only=True)
        clip_config = AutoConfig.from_pretrained(files.clip, local_files_only=True)
    except (OSError, ValueError) as error:
        raise HyVideoError(f"cannot read the text encoders' config.json in {files.root} ({error}); download them again") from None
    llm_linear, llm_other = llm_param_counts(llm_config.get_text_config())
    with torch.device("meta"):
        clip = sum(p.numel() for p in CLIPTextModel(getattr(clip_config, "text_config", clip_config)).parameters())
    if not files.image_to_video:
        return hunyuan_text_encoders(llm_linear, llm_other, clip)
    vision_config = llm_config.vision_config
    with torch.device("meta"):
        vision = sum(p.numel() for p in CLIPVisionModel(vision_config).parameters())
    text_hidden, vision_hidden = llm_config.get_text_config().hidden_size, vision_config.hidden_size
    projector = vision_hidden * text_hidden + text_hidden + text_hidden * text_hidden + text_hidden  # 2 linears with biases
    return hunyuan_i2v_text_encoders(llm_linear, llm_other, vision + projector, clip, image_tokens(vision_config),
                                     vision_config.num_hidden_layers, vision_hidden, vision_config.intermediate_size)


def image_tokens(vision_config) -> int:
    """The positions LLaVA fills with one image (its vision tower's patches)."""
    return (vision_config.image_size // vision_config.patch_size) ** 2


def model_sizes(files: ModelFiles, image_size: tuple[int, int] = I2V_IMAGE_SIZE) -> dict:
    """What this model contributes to each stage, as the planner counts it (no weights read):
    `plan(..., **model_sizes(files, (height, width)))`. The seam where another model (image-to-video,
    1.5) enters the planner: its DiT config, its VAE config, its text encoders, the text tokens its
    DiT reads, and for I2V the image the text stage encodes, at `image_size` (the video's; default
    the largest 720p bucket)."""
    dit_config, vae_config = dit_config_for(files), vae_config_for(files)
    if files.family == V15_FAMILY:
        return v15_model_sizes(dit_config, vae_config, files.sampling.guidance_scale, v15_text_configs(files), image_size)
    sizes = {"dit_config": dit_config, "vae_config": vae_config, "text_encoders": text_encoder_sizes(files)}
    if dit_config.image_condition_type:
        from transformers import AutoConfig

        vision_config = AutoConfig.from_pretrained(files.llm, local_files_only=True).vision_config  # read above: it loads
        sizes["text_tokens"] = i2v_text_tokens(dit_config.image_condition_type, image_tokens(vision_config))
        sizes["image_size"] = image_size
    return sizes


def v15_text_configs(files) -> tuple:
    """A 1.5 folder's encoder configs (Qwen2.5-VL's text config, byT5's, SigLIP's for image-to-video)."""
    from transformers import AutoConfig

    try:
        configs = [AutoConfig.from_pretrained(folder, local_files_only=True) for folder in (files.llm, files.byt5)]
        siglip = AutoConfig.from_pretrained(files.vision, local_files_only=True) if files.vision else None
    except (OSError, ValueError) as error:
        raise HyVideoError(f"cannot read the text encoders' config.json in {files.root} ({error}); download them again") from None
    siglip = getattr(siglip, "vision_config", siglip)  # a whole SigLIP folder holds the vision config inside
    return configs[0].get_text_config(), configs[1], siglip


def parameter_count(config: DiTConfig) -> int:
    """The DiT's parameters (the 13B model's or HunyuanVideo-1.5's), counted on the meta device."""
    with torch.device("meta"):
        return sum(p.numel() for p in dit_class(config)(config).parameters())


def default_cache_dir(files: ModelFiles) -> Path:
    """Where quantized weights are kept unless --cache-dir says otherwise: beside the model, each
    model in a folder of its own where one folder holds several (Tencent's ckpts/ may hold the
    13B text- and image-to-video DiTs, whose caches would otherwise share a name, and several
    HunyuanVideo-1.5 transformers)."""
    if files.family == V15_FAMILY:
        return Path(files.root) / "lowvram-cache" / f"1.5-{files.variant}"
    if files.image_to_video:
        return Path(files.root) / "lowvram-cache" / "i2v"
    return Path(files.root) / "lowvram-cache"


def configure_dit(model: torch.nn.Module, plan: Plan, device: torch.device, attention: str, *, scaled_mm: bool = False,
                  sequence_parallel=None) -> None:
    """Every runtime option a run sets on the DiT, in one call (as diffusers' `set_attn_processor`
    is one door): the attention kernel, the plan's token chunk, FP8 linears on `_scaled_mm` or not,
    and with several ranks this rank's share of the tokens. Called before the DiT is placed: the
    streamer's ring shells copy what the blocks carry."""
    check_backend(attention)
    model.attention_backend = attention
    model.token_chunk = plan.token_chunk or None
    model.sequence_parallel = sequence_parallel
    set_scaled_mm(model, scaled_mm, device)


def run_device_for(files: ModelFiles, config: DiTConfig) -> torch.device:
    """The device a run of this model computes on by default: the GPU if there is one; the
    full-size model never runs on the CPU (preflight refuses it), so its caches are for a GPU."""
    if torch.cuda.is_available() or parameter_count(config) >= CPU_MAX_DIT_PARAMS:
        return torch.device("cuda")
    return torch.device("cpu")


def build_dit_cache(files: ModelFiles, config: DiTConfig, scheme: str, policy: str, cache_dir: Path, dtype: torch.dtype,
                    reporter: Reporter):
    """The one rule that builds the quantize-once DiT cache (a run's first DiT stage and `lowvram
    quantize` both come here): missing, stale or corrupt -> quantized again, one tensor at a time,
    with progress per block. Returns the status found before."""
    from quant.cache import cache_status, ensure_dit_cache

    status = cache_status(cache_dir, config, scheme, policy, files.dit_weights, dtype)
    if status.state != "fresh":
        reporter.stage(status.message, total=config.double_blocks + config.single_blocks + 1)
        ensure_dit_cache(files.dit_weights, lambda: dit_state_dict(files, config), config, scheme, policy, cache_dir, dtype,
                         on_progress=lambda done, total: reporter.advance(done, total=total))
        reporter.stage("loading DiT")
    return status


def dit_state_dict(files: ModelFiles, config: DiTConfig):
    """The DiT's weights in our key names, memory-mapped (a lazy view where keys are converted)."""
    if files.family == V15_FAMILY:
        return load_v15_dit_state_dict(files)
    return load_dit_state_dict(files)[0]


def make_step_cache(model: torch.nn.Module, preset: str, steps: int, device: torch.device,
                    state: CacheState | None = None, forwards: int = 1) -> TeaCache | DeepCache | None:
    """The step cache `preset` for `model`, None when off: TeaCache (safe | fast) for the 13B
    model, whose probe (double block 0's image modulation) is copied onto the device so that
    deciding a step never waits for a streamed block; DeepCache for HunyuanVideo-1.5, `forwards`
    DiT forwards a step."""
    if preset == DEEPCACHE:
        return DeepCache(steps, forwards, state)
    threshold = STEP_CACHE_PRESETS[preset]
    if threshold is None:
        return None
    probe = copy.deepcopy(model.double_blocks[0].img_mod).to(device)
    return TeaCache(threshold, steps, probe, state)


def compute_dtypes(device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(DiT/LLM dtype, VAE/CLIP dtype) for unquantized weights on `device`."""
    if device.type == "cpu":
        return torch.float32, torch.float32
    return torch.bfloat16, torch.float16


class Stages:
    """Loads each stage's models for a run, or for runs that share them (see the module docstring)."""

    def __init__(self, files: ModelFiles, plan: Plan, device: torch.device, attention: str,
                 reporter: Reporter | None = None, cache_dir: Path | None = None, loras: list[LoraSpec] = ()):
        self.files, self.plan, self.device = files, plan, device
        self.loras = list(loras)
        self.attention, self.reporter = attention, reporter or Reporter()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(files)
        self.dtype, self.vae_dtype = compute_dtypes(device)
        self.stats: dict = {}
        self._preview_projection: tuple[tuple, tuple] | None = None

    @property
    def profile(self):
        """The run's settled profile: the plan's."""
        return self.plan.profile

    # -- text -----------------------------------------------------------------------------------

    def text_encoders(self) -> tuple[LlamaTextEncoder, ClipTextEncoder]:
        files = self.files
        if files.image_to_video:
            return self._llava(), self._clip()
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
        return llm, self._clip()

    def _clip(self) -> ClipTextEncoder:
        files = self.files
        return ClipTextEncoder.from_folder(files.clip, dtype=self.vae_dtype, device=self.device, tokenizer_folder=files.clip_tokenizer)

    def _llava(self) -> LlavaTextEncoder:
        """Image-to-video's LLaVA: its language model per the encoder scheme (NF4 from the
        quantize-once cache in the run's cache folder, quant/nf4.py, else bf16 on the CPU with the
        reason said), the vision tower and projector bf16."""
        files = self.files
        loaded = None
        if self.profile.encoder_scheme == "nf4":
            from quant.nf4 import load_llava_nf4

            loaded = load_llava_nf4(files.llm, self.device, self.cache_dir, on_status=lambda status: self.reporter.stage(status.message))
            if loaded.reason:
                self.reporter.warn(f"NF4 text encoder unavailable ({loaded.reason}); running LLaVA in bf16 on the CPU")
        return LlavaTextEncoder.from_folder(
            files.llm, self.plan.dit_config.image_condition_type, dtype=self.dtype, device=self.device,
            tokenizer_folder=None if files.llm_tokenizer == files.llm else files.llm_tokenizer,
            image_processor_folder=files.image_processor, model=loaded.model if loaded else None)

    def encode_image(self, vae, image, height: int, width: int) -> ImageCondition:
        """The conditioning image (PIL RGB), resized and center-cropped to the video's size, through
        the VAE's encoder in the profile's spatial tiles, as decode (counted in the text stage)."""
        pixels = image_to_pixels(resize_center_crop(image, (height, width)))
        on_tile = self._count_image_tiles()
        tiled = TiledVAE(vae, self.profile.vae_spatial_tile, output_device=self.device, on_tile=on_tile)
        return ImageCondition(self.plan.dit_config.image_condition_type, encode_image(vae, pixels, self.device, tiled.encode))

    def _count_image_tiles(self):
        """A tile callback recording how many tiles the image encode ran, in the run's stats."""
        self.stats["image_encode"] = {"tiles": 0}

        def on_tile(done: int, total: int) -> None:
            self.stats["image_encode"]["tiles"] = done

        return on_tile

    def v15_text_encoder(self):
        """HunyuanVideo-1.5's encoders (hyvideo/v15_text.py): Qwen2.5-VL's language model per the
        encoder scheme (NF4 quantized on load, quant/nf4.py, else bf16 on the CPU with the reason),
        byT5 in the VAE's dtype."""
        from hyvideo.v15_text import V15TextEncoder, find_v15_text_files

        text_files = find_v15_text_files(self.files.root, self.files.layout)
        llm = None
        if self.profile.encoder_scheme == "nf4":
            from quant.nf4 import load_qwen_text_nf4

            loaded = load_qwen_text_nf4(text_files.llm, self.device, self.cache_dir,
                                        on_status=lambda status: self.reporter.stage(status.message))
            if loaded.reason:
                self.reporter.warn(f"NF4 text encoder unavailable ({loaded.reason}); running Qwen2.5-VL in bf16 on the CPU")
            llm = loaded.model
        return V15TextEncoder.from_files(text_files, dtype=self.dtype, device=self.device, llm=llm)

    def v15_image_encoder(self):
        """HunyuanVideo-1.5 image-to-video's SigLIP vision tower (16-bit on the GPU, as the planner counts it)."""
        from hyvideo.v15_image import V15ImageEncoder
        from hyvideo.v15_text import find_v15_text_files

        return V15ImageEncoder.from_files(find_v15_text_files(self.files.root, self.files.layout), dtype=self.dtype,
                                          device=self.device)

    def encode_v15_image(self, vae, vision, image):
        """(V15Image, (height, width)) for a 1.5 run's image (PIL RGB): the transformer's bucket and
        crop, SigLIP's states, and the VAE's encoder in the profile's spatial tiles (the same pixels
        at 16x; one tile when the image fits one), as the decode (hyvideo/v15_image.py)."""
        from hyvideo.v15_image import encode_image, v15_target_size

        on_tile = self._count_image_tiles()
        tile = spatial_tile_for(self.profile.vae_spatial_tile, vae.config.spatial_compression_ratio)
        tiled = TiledVAE(vae, tile, output_device=self.device, on_tile=on_tile)
        with torch.no_grad():
            return encode_image(image, v15_target_size(self.files.variant), vision,
                                lambda pixels: tiled.encode(pixels.to(self.device, self.vae_dtype)), vae.config.scaling_factor)

    # -- DiT ------------------------------------------------------------------------------------

    @property
    def reads_dit_cache(self) -> bool:
        """Whether the DiT comes from the quantize-once cache (not bf16, not Tencent's FP8 file)."""
        scheme = self.profile.dit_scheme
        return scheme != "bf16" and not (scheme == "fp8" and self.files.dit_fp8 is not None)

    def _load_dit_on_host(self):
        files, scheme = self.files, self.profile.dit_scheme
        if scheme == "bf16":
            return load_v15_dit(files, self.dtype) if files.family == V15_FAMILY else load_dit(files, self.dtype)
        if not self.reads_dit_cache:
            from quant.tencent_fp8 import load_tencent_fp8

            return load_tencent_fp8(files.dit_fp8, self.plan.dit_config, files.dit_fp8_map, dtype=self.dtype)
        from quant.cache import load_cached_dit

        self.ensure_dit_cache()
        return load_cached_dit(self.cache_dir, self.plan.dit_config, scheme, self.profile.quant_policy, files.dit_weights, self.dtype)

    def ensure_dit_cache(self) -> None:
        """Build the quantize-once DiT cache if the profile reads one and it is missing or stale
        (with several ranks, rank 0 does this before the others load from it)."""
        if self.reads_dit_cache:
            build_dit_cache(self.files, self.plan.dit_config, self.profile.dit_scheme, self.profile.quant_policy,
                            self.cache_dir, self.dtype, self.reporter)

    def dit(self, sequence_parallel=None) -> tuple[torch.nn.Module, BlockStreamer]:
        """The DiT with its trunk on the device and its blocks placed per the plan; LoRAs wrap the
        loaded (possibly quantized) linears before placement, so they stream with their blocks.
        sequence_parallel: this rank's share of the tokens (lowvram/parallel.py), None for one process."""
        model = self._load_dit_on_host()
        if self.loras:
            self.stats["lora"] = apply_loras(model, self.loras)
        scheme = QUANT_SCHEMES.get(self.profile.dit_scheme)  # None for bf16
        matmul, note = scheme.choose_matmul(self.profile.fp8_matmul, self.device) if scheme else (None, None)
        if note:
            self.reporter.warn(note)
        configure_dit(model, self.plan, self.device, self.attention, scaled_mm=matmul == "scaled_mm", sequence_parallel=sequence_parallel)
        streamer = place_dit(model, self.plan, self.device)
        self.stats["dit"] = {"resident_blocks": len(self.plan.schedule.resident), "attention": self.attention,
                             "fp8_matmul": matmul,
                             "streamed_blocks": len(self.plan.schedule.streamed), "pinned_bytes": streamer.pin_report.pinned_bytes}
        if self.profile.compile:
            self._graphs_before = dynamo_graphs()
            self.stats["dit"]["compiled_modules"] = compile_blocks(streamer, self.cache_dir)
        return model, streamer

    def step_cache(self, model: torch.nn.Module, request: GenerationRequest, state: CacheState | None = None):
        """The profile's step cache for `model` and this request (None when off)."""
        forwards = forwards_per_step(request.guidance) if self.files.family == V15_FAMILY else 1
        return make_step_cache(model, self.profile.step_cache, request.steps, self.device, state, forwards)

    def denoise(self, model: torch.nn.Module, streamer: BlockStreamer, embeddings: TextEmbeddings, latents: torch.Tensor,
                request: GenerationRequest, *, start_step: int, on_step, cache: TeaCache | DeepCache | None,
                on_prediction=None, image: ImageCondition | None = None) -> torch.Tensor:
        """Euler steps start_step..N-1 on the placed DiT, its blocks from the streamer, the next
        step's first copies issued during this one's last blocks: the one denoising call that one
        process and every rank of several make. on_prediction: a live preview's (rank 0's); image:
        an I2V run's conditioning image. A HunyuanVideo-1.5 run's embeddings are (prompt, negative),
        its image a V15Image and its cache a DeepCache (`denoise_v15`)."""
        if self.files.family == V15_FAMILY:
            sampling = V15Sampling(request.steps, request.guidance, request.flow_shift)
            return self.denoise_v15(model, streamer, *embeddings, latents, sampling, start_step=start_step, on_step=on_step,
                                    image=image, on_prediction=on_prediction, cache=cache)
        steps = request.steps
        return denoise(model, embeddings, latents, request, self.device, start_step=start_step, on_step=on_step,
                       blocks_for_step=lambda i: streamer.blocks_for_step(prefetch_next_step=i + 1 < steps), step_cache=cache,
                       image=image, on_prediction=on_prediction)

    def denoise_v15(self, model: torch.nn.Module, streamer: BlockStreamer, prompt, negative, latents: torch.Tensor,
                    sampling, *, start_step: int, on_step, image=None, on_prediction=None, cache=None) -> torch.Tensor:
        """HunyuanVideo-1.5's Euler steps start_step..N-1 (`sampling`: steps, guidance_scale,
        flow_shift) on the placed DiT: under real CFG two forwards a step, one after the other, each
        streaming the streamed blocks (`forward_blocks`). image: an image-to-video run's V15Image;
        cache: a DeepCache, whose cached forwards run the last block alone (resident by the plan)."""
        forwards = forwards_per_step(sampling.guidance_scale)
        return v15_denoise(model, prompt, negative, latents, sampling.steps, sampling.flow_shift, sampling.guidance_scale,
                           self.device, image=image, start_step=start_step, on_step=on_step, on_prediction=on_prediction,
                           blocks_for_forward=forward_blocks(streamer, sampling.steps, forwards), step_cache=cache,
                           last_block=streamer.resident_block(len(model.double_blocks) - 1) if cache else None)

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

    def preview_projection(self) -> tuple[tuple, tuple]:
        """(factors, bias) projecting this model's latents to RGB for --preview (hyvideo/preview.py):
        the 13B model's published ones; HunyuanVideo-1.5 has none, so they are fitted to its VAE's
        encoder once and kept in the cache folder under the VAE file's fingerprint (the first call
        comes before the DiT is placed: the fit loads the VAE on the device)."""
        if self._preview_projection is None:
            self._preview_projection = self._load_or_fit_projection()
        return self._preview_projection

    def _load_or_fit_projection(self) -> tuple[tuple, tuple]:
        if self.files.family != V15_FAMILY:
            return HUNYUAN_LATENT_RGB_FACTORS, HUNYUAN_LATENT_RGB_BIAS
        path, vae_file = self.cache_dir / PREVIEW_RGB_FILE, file_fingerprint([self.files.vae_weights])[0]
        try:
            saved = json.loads(path.read_text())
            if saved["vae"] == vae_file:
                return tuple(map(tuple, saved["factors"])), tuple(saved["bias"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # none yet, another VAE's, or unreadable: fit again
        self.reporter.stage("fitting the preview's colours to the VAE")
        vae = self.vae()
        try:
            scale, ratio = vae.config.scaling_factor, vae.config.spatial_compression_ratio
            with torch.inference_mode():
                def encode(pixels: torch.Tensor) -> torch.Tensor:  # what the DiT sees: scaled latents, on the host
                    return vae.encode(pixels.to(self.device, self.vae_dtype)).float().cpu() * scale

                factors, bias = fit_latent_rgb(encode, ratio)
        finally:
            vae = None
            empty_cache(self.device)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"vae": vae_file, "factors": factors, "bias": bias}).encode(), "the preview's colour fit")
        return factors, bias

    def vae(self):
        load = load_v15_vae if self.files.family == V15_FAMILY else load_vae
        return load(self.files, self.vae_dtype).to(self.device)

    def decode(self, vae, latents: torch.Tensor, on_progress) -> torch.Tensor:
        """Latents -> uint8 frames through the tiled decoder (one tile when the profile says 0)."""
        self.stats["vae"] = {"tiles": 0}

        def on_tile(done: int, total: int) -> None:
            self.stats["vae"]["tiles"] = done
            on_progress(done, total)

        spatial = spatial_tile_for(self.profile.vae_spatial_tile, vae.config.spatial_compression_ratio)  # the plan's tiles
        tiled = TiledVAE(vae, spatial, self.profile.vae_temporal_tile, output_device="cpu", on_tile=on_tile)
        frames = decode(vae, latents, self.device, vae_decode=tiled.decode)
        if getattr(self.plan.dit_config, "image_condition_type", None) == "latent_concat":  # official: its video starts 4 frames in
            frames = frames[LATENT_CONCAT_DROPPED_FRAMES:]
        return frames
