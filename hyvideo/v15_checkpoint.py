"""Find and load HunyuanVideo-1.5 weights in Tencent's or the diffusers layout.

Tencent (HF `tencent/HunyuanVideo-1.5`, downloaded to ckpts/; `checkpoints-download.md`):
  transformer/<variant>/{config.json, diffusion_pytorch_model.safetensors}   one folder per released
      transformer (480p_t2v, 720p_i2v_distilled, 480p_i2v_step_distilled, ...: `V15_SAMPLING`), float32
  vae/{config.json, diffusion_pytorch_model.safetensors}, scheduler/
  text_encoder/llm/ (Qwen2.5-VL-7B-Instruct), text_encoder/byt5-small/ (config, tokenizer) with the
  glyph weights in text_encoder/Glyph-SDXL-v2/checkpoints/byt5_model.pt, and for image-to-video
  vision_encoder/siglip/ (FLUX.1-Redux-dev: image_encoder/ SigLIP, feature_extractor/)
diffusers (HF `hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-<variant>`, one variant a folder):
  transformer/ (HunyuanVideo15Transformer3DModel: config with target_size, task_type, use_meanflow),
  vae/, scheduler/, guider/ (guidance_scale), text_encoder/ (Qwen2_5_VLTextModel), tokenizer/,
  text_encoder_2/ (byT5 T5EncoderModel), tokenizer_2/, and for image-to-video image_encoder/
  (SiglipVisionModel) and feature_extractor/.

A Tencent folder holds several transformers: the task (text or image to video) narrows them, and
when more than one is left the user names one (`--model 1.5-720p_t2v`). A diffusers folder holds one;
its variant name follows from its configs (resolution from target_size, task, MeanFlow = step
distilled, guidance 1 = CFG distilled), so both layouts get the same sampling defaults (`V15_SAMPLING`).

Weights are read as for the 13B model: memory-mapped, read-only, and converted to our key names
(`v15_keys`) by a lazy view that converts one block at a time, so quantizing the 8.3B DiT holds one
block's fused tensors at most, whichever layout it comes from.
"""

import dataclasses
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import HyVideoError
from .v15_config import V15_SAMPLING, V15DiTConfig, V15Sampling, V15VAEConfig
from .v15_keys import diffusers_to_ours, official_to_ours, vae_diffusers_to_ours
from .weight_io import read_safetensors

FAMILY = "hunyuanvideo-1.5"
MODEL_PREFIX = "1.5-"  # `--model 1.5-<variant>` picks a 1.5 transformer
DIFFUSERS_DIT_CLASS = "HunyuanVideo15Transformer3DModel"
DOWNLOAD_HINT = "see the README's HunyuanVideo-1.5 section for the download"

# Text-stage sizes of the released encoders (their config.json fields), for planning without the
# folder (`lowvram plan --model 1.5-...`) and for synthetic folders. Qwen2.5-VL-7B-Instruct's
# language model; byT5-small (google/byt5-small, the encoder Glyph-SDXL-v2 fine-tunes); SigLIP
# so400m-patch14-384 (FLUX.1-Redux-dev's image_encoder).
QWEN25_VL_7B_TEXT = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                     "num_key_value_heads": 4, "vocab_size": 152064, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                     "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}  # M-RoPE (t, h, w) of head_dim / 2
BYT5_SMALL = {"d_model": 1472, "d_ff": 3584, "num_layers": 12, "num_decoder_layers": 4, "num_heads": 6, "d_kv": 64,
              "vocab_size": 384, "feed_forward_proj": "gated-gelu"}
SIGLIP_SO400M_384 = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                     "image_size": 384, "patch_size": 14}
# Token lengths (diffusers' HunyuanVideo15Pipeline: tokenizer_max_length, its template's crop_start,
# tokenizer_2_max_length; the official pipeline's text_len and byt5_max_length agree).
QWEN_MAX_TOKENS = 1000
QWEN_TEMPLATE_TOKENS = 108
BYT5_MAX_TOKENS = 256


@dataclass
class V15ModelFiles:
    """Where each component of one HunyuanVideo-1.5 transformer's folder lives (the 13B model's
    `ModelFiles` fields where they mean the same)."""

    layout: str  # "official" | "diffusers"
    root: Path
    variant: str  # a key of V15_SAMPLING, e.g. "720p_t2v"
    dit_weights: list[Path]
    dit_config: Path
    vae_weights: Path
    vae_config: Path
    llm: Path  # Qwen2.5-VL (official: the whole model; diffusers: its language model)
    llm_tokenizer: Path
    byt5: Path  # byT5 config (and the diffusers layout's weights)
    byt5_tokenizer: Path
    byt5_weights: Path | None = None  # official: Glyph-SDXL-v2's byt5_model.pt (its loader checks it)
    vision: Path | None = None  # image-to-video: the SigLIP vision model's folder
    image_processor: Path | None = None  # image-to-video: SigLIP's preprocessor folder
    notes: list[str] = field(default_factory=list)
    dit_fp8 = None  # no pre-quantized 1.5 DiT file is read (the engine's quantize-once cache is)
    family = FAMILY

    @property
    def image_to_video(self) -> bool:
        return "_i2v" in self.variant

    @property
    def sampling(self) -> V15Sampling:
        return V15_SAMPLING[self.variant]

    def all_files(self) -> list[Path]:
        files = [*self.dit_weights, self.dit_config, self.vae_weights, self.vae_config,
                 self.llm / "config.json", self.byt5 / "config.json"]
        return files + ([self.vision / "config.json"] if self.vision else [])


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise HyVideoError(f"cannot read {path}: {err}; the file is incomplete or corrupt, download it again") from None


def _safetensors_in(folder: Path) -> list[Path]:
    """Shards named by the index file, else the folder's safetensors files."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        return [folder / name for name in sorted(set(_read_json(indexes[0])["weight_map"].values()))]
    return sorted(folder.glob("*.safetensors")) or [folder / "diffusion_pytorch_model.safetensors"]


def official_variants(root: Path) -> list[str]:
    """The released 1.5 transformers in a Tencent folder (transformer/<variant>/config.json)."""
    folder = Path(root) / "transformer"
    return sorted(v for v in V15_SAMPLING if (folder / v / "config.json").is_file())


def is_diffusers_v15(root: Path) -> bool:
    config = Path(root) / "transformer" / "config.json"
    return config.is_file() and _read_json(config).get("_class_name") == DIFFUSERS_DIT_CLASS


def is_v15_folder(root: Path) -> bool:
    return bool(official_variants(root)) or is_diffusers_v15(root)


def diffusers_variant(root: Path) -> str:
    """The released transformer a diffusers folder holds, from its transformer and guider configs."""
    config = _read_json(Path(root) / "transformer" / "config.json")
    resolution = {640: "480p", 960: "720p"}.get(config.get("target_size", 640))
    if resolution is None:
        raise HyVideoError(f"{root}/transformer/config.json: target_size {config['target_size']} is neither 480p (640) nor 720p (960)")
    variant = f"{resolution}_{config.get('task_type', 'i2v')}"
    guider = Path(root) / "guider" / "guider_config.json"
    guidance = _read_json(guider).get("guidance_scale", 6.0) if guider.is_file() else 6.0
    if config.get("use_meanflow"):
        variant += "_step_distilled"
    elif guidance == 1.0:
        variant += "_distilled"
    if variant not in V15_SAMPLING:
        raise HyVideoError(f"{root} holds a HunyuanVideo-1.5 transformer ({variant}) this runner does not know")
    return variant


def choose_official_variant(root: Path, image_to_video: bool, variant: str | None) -> str:
    """The transformer to run from a Tencent folder: `variant` if given, else the only one for the
    task; several -> a HyVideoError listing them."""
    found = official_variants(root)
    if variant is not None:
        if variant not in found:
            raise HyVideoError(f"{root} has no HunyuanVideo-1.5 transformer {variant!r}; it has: {', '.join(found)}")
        return variant
    task = "_i2v" if image_to_video else "_t2v"
    matching = [v for v in found if task in v]
    if len(matching) == 1:
        return matching[0]
    if not matching:
        raise HyVideoError(f"{root} has no HunyuanVideo-1.5 {task[1:]} transformer (it has: {', '.join(found)}); {DOWNLOAD_HINT}")
    choices = ", ".join(MODEL_PREFIX + v for v in matching)
    raise HyVideoError(f"{root} holds several HunyuanVideo-1.5 {task[1:]} transformers: say which with --model ({choices})")


def find_v15_files(root: Path, image_to_video: bool = False, variant: str | None = None) -> V15ModelFiles:
    """The files of one 1.5 transformer in `root`, checked to be there (`variant` None: see
    `choose_official_variant`; a diffusers folder's own variant must match a given one)."""
    root = Path(root)
    if is_diffusers_v15(root):
        found = diffusers_variant(root)
        if variant is not None and variant != found:
            raise HyVideoError(f"{root} holds the HunyuanVideo-1.5 {found} transformer, not {variant}")
        files = V15ModelFiles(
            layout="diffusers", root=root, variant=found,
            dit_weights=_safetensors_in(root / "transformer"), dit_config=root / "transformer" / "config.json",
            vae_weights=_safetensors_in(root / "vae")[0], vae_config=root / "vae" / "config.json",
            llm=root / "text_encoder", llm_tokenizer=root / "tokenizer", byt5=root / "text_encoder_2",
            byt5_tokenizer=root / "tokenizer_2",
        )
        if files.image_to_video:
            files.vision, files.image_processor = root / "image_encoder", root / "feature_extractor"
    else:
        chosen = choose_official_variant(root, image_to_video, variant)
        dit = root / "transformer" / chosen
        files = V15ModelFiles(
            layout="official", root=root, variant=chosen, dit_weights=_safetensors_in(dit), dit_config=dit / "config.json",
            vae_weights=_safetensors_in(root / "vae")[0], vae_config=root / "vae" / "config.json",
            llm=root / "text_encoder" / "llm", llm_tokenizer=root / "text_encoder" / "llm",
            byt5=root / "text_encoder" / "byt5-small", byt5_tokenizer=root / "text_encoder" / "byt5-small",
            byt5_weights=root / "text_encoder" / "Glyph-SDXL-v2" / "checkpoints" / "byt5_model.pt",
        )
        if files.image_to_video:
            siglip = root / "vision_encoder" / "siglip"
            files.vision, files.image_processor = siglip / "image_encoder", siglip / "feature_extractor"
    missing = [p for p in files.all_files() if not p.is_file()]
    if missing:
        shown = ", ".join(str(p.relative_to(root)) for p in missing[:3])
        raise HyVideoError(f"{len(missing)} file(s) missing in {root} (HunyuanVideo-1.5 {files.layout} layout, "
                           f"{files.variant}): {shown}{' ...' if len(missing) > 3 else ''}; {DOWNLOAD_HINT}")
    return files


# --- configs ---------------------------------------------------------------------------------------


def v15_dit_config(files: V15ModelFiles) -> V15DiTConfig:
    """From the transformer's config.json; Tencent's has no byT5 width (its code fixes 1472), which
    is read from the weights' shapes instead (memory-mapped: the header only)."""
    values = _read_json(files.dit_config)
    try:
        if files.layout == "diffusers":
            return V15DiTConfig.from_diffusers(values)
        config = V15DiTConfig.from_official(values)
    except (KeyError, ValueError, TypeError) as err:
        raise HyVideoError(f"{files.dit_config} is not a HunyuanVideo-1.5 transformer config: {err}") from None
    norm = read_safetensors(files.dit_weights).get("byt5_in.layernorm.weight")
    return config if norm is None else dataclasses.replace(config, byt5_states_dim=norm.shape[0])


def v15_vae_config(files: V15ModelFiles) -> V15VAEConfig:
    try:
        return V15VAEConfig.from_dict(_read_json(files.vae_config))
    except (ValueError, TypeError) as err:
        raise HyVideoError(f"{files.vae_config} is not a HunyuanVideo-1.5 VAE config: {err}") from None


# --- weights ---------------------------------------------------------------------------------------


class ConvertedByGroup(Mapping):
    """Read-only view of `convert(source)` that converts one group of source keys at a time (a
    block, or everything outside the blocks), keeping only the last group's result: memory holds
    one block's new tensors (fused q/k/v, swapped halves), renamed ones stay views of the source.
    Keys come in the order given (`keys`, e.g. the model's); `shapes()` reads no tensor data."""

    def __init__(self, source: Mapping, convert: Callable[[dict], dict], group_of: Callable[[str], str],
                 keys: list[str] | None = None):
        self._source, self._convert = source, convert
        self._groups: dict[str, list[str]] = {}
        for key in source:
            self._groups.setdefault(group_of(key), []).append(key)
        self._group_of, self._shapes = {}, {}
        for group, members in self._groups.items():
            meta = convert({k: torch.empty(tuple(source[k].shape), device="meta") for k in members})
            for key, value in meta.items():
                self._group_of[key], self._shapes[key] = group, tuple(value.shape)
        ordered = [k for k in keys or () if k in self._group_of]
        self._keys = ordered + [k for k in self._group_of if k not in set(ordered)]
        self._cached_group, self._cached = None, {}

    def __getitem__(self, key: str) -> torch.Tensor:
        group = self._group_of[key]
        if group != self._cached_group:
            self._cached, self._cached_group = {}, None  # free the last group's tensors first
            self._cached = self._convert({k: self._source[k] for k in self._groups[group]})
            self._cached_group = group
        return self._cached[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)


def _block_group(pattern: str) -> Callable[[str], str]:
    regex = re.compile(pattern)

    def group_of(key: str) -> str:
        match = regex.match(key)
        return match[0] if match else "trunk"

    return group_of


def load_v15_dit_state_dict(files: V15ModelFiles, keys: list[str] | None = None) -> Mapping[str, torch.Tensor]:
    """The DiT's weights under our key names, memory-mapped and converted lazily one block at a time
    (`ConvertedByGroup`), in the order of `keys` (e.g. the model's) where given. A source key that no
    rule knows raises a HyVideoError naming it."""
    source = read_safetensors(files.dit_weights)
    if files.layout == "diffusers":
        convert, group = diffusers_to_ours, _block_group(r"transformer_blocks\.\d+\.")
    else:
        convert, group = official_to_ours, _block_group(r"double_blocks\.\d+\.")
    try:
        return ConvertedByGroup(source, convert, group, keys)
    except (ValueError, KeyError) as err:
        raise HyVideoError(f"{files.dit_weights[0].parent}: not a HunyuanVideo-1.5 transformer checkpoint ({err}); "
                           "download it again") from None


def load_v15_vae_state_dict(files: V15ModelFiles) -> dict[str, torch.Tensor]:
    """The VAE's weights under our (Tencent's) key names, memory-mapped."""
    state = read_safetensors([files.vae_weights])
    return vae_diffusers_to_ours(state) if files.layout == "diffusers" else dict(state)


def load_v15_dit(files: V15ModelFiles, dtype: torch.dtype = torch.bfloat16):
    from .checkpoint import build_on_meta_and_assign
    from .v15_dit import HunyuanVideo15DiT

    config = v15_dit_config(files)
    with torch.device("meta"):
        keys = list(HunyuanVideo15DiT(config).state_dict())
    state = load_v15_dit_state_dict(files, keys)
    return build_on_meta_and_assign(lambda: HunyuanVideo15DiT(config), state, dtype, files.dit_weights[0])


def load_v15_vae(files: V15ModelFiles, dtype: torch.dtype = torch.float16):
    from .checkpoint import build_on_meta_and_assign
    from .v15_vae import HunyuanVideo15VAE

    config = v15_vae_config(files)
    return build_on_meta_and_assign(lambda: HunyuanVideo15VAE(config), load_v15_vae_state_dict(files), dtype, files.vae_weights)
