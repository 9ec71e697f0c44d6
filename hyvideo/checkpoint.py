"""Find and load HunyuanVideo weights in the official (Tencent) or the diffusers layout.

Official (HF `tencent/HunyuanVideo` in ckpts/):
  hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt   (dict, weights under "module")
  hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states_fp8.pt + ..._fp8_map.pt (optional)
  hunyuan-video-t2v-720p/vae/{config.json, pytorch_model.pt}
  text_encoder/ (Llama + tokenizer), text_encoder_2/ (CLIP + tokenizer)
Official image-to-video (HF `tencent/HunyuanVideo-I2V` in ckpts/, beside the above or alone):
  hunyuan-video-i2v-720p/transformers/mp_rank_00_model_states.pt, hunyuan-video-i2v-720p/vae/,
  text_encoder_i2v/ (the whole LLaVA: model, tokenizer, preprocessor_config.json), text_encoder_2/
diffusers (HF `hunyuanvideo-community/HunyuanVideo`):
  transformer/{config.json, *.safetensors [+ index]}, vae/{config.json, *.safetensors},
  text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/
diffusers image-to-video (`hunyuanvideo-community/HunyuanVideo-I2V`): the same folders, text_encoder/
  a LlavaForConditionalGeneration, and image_processor/ (LLaVA's CLIP image processor); the
  transformer config names its image_condition_type.

Models are built on the meta device and filled with `load_state_dict(assign=True)` from
read-only memory-mapped files (`weight_io.read_torch_file` / `read_safetensors`), so the 13B DiT is
never held twice in RAM, nor charged to memory as a private copy of the file. The diffusers layout
stores q/k/v (and a single block's MLP input) as separate tensors: its state dict is a lazy
official-layout view (`diffusers_keys.DiffusersAsOfficial`) that fuses a tensor when it is read.
Quantizing reads one at a time; building the bf16 model materializes the fused ones (about 7.6 GB
of the 25.6 GB in bf16), the rest stays mapped.
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import DiTConfig, VAEConfig
from .diffusers_keys import diffusers_to_official
from .dit import HunyuanVideoDiT
from .errors import HyVideoError
from .vae import CausalVAE
from .weight_io import read_safetensors, read_torch_file

OFFICIAL_DIT = "hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt"
OFFICIAL_DIT_FP8 = "hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states_fp8.pt"
OFFICIAL_DIT_FP8_MAP = "hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states_fp8_map.pt"
OFFICIAL_VAE = "hunyuan-video-t2v-720p/vae"
OFFICIAL_I2V_DIT = "hunyuan-video-i2v-720p/transformers/mp_rank_00_model_states.pt"
OFFICIAL_I2V_VAE = "hunyuan-video-i2v-720p/vae"
OFFICIAL_I2V_TEXT_ENCODER = "text_encoder_i2v"
DOWNLOAD_HINT = "run `lowvram download --model-dir {root}` (or see the README's quick start)"


@dataclass
class ModelFiles:
    """Where each component of one model folder lives."""

    family = "hunyuanvideo"  # the 13B model (v15_checkpoint.V15ModelFiles: "hunyuanvideo-1.5")

    layout: str  # "official" | "diffusers"
    root: Path
    dit_weights: list[Path]  # one .pt, or safetensors shards
    dit_config: Path | None  # diffusers only; official configs are inferred from the weights
    vae_weights: Path
    vae_config: Path
    llm: Path
    llm_tokenizer: Path
    clip: Path
    clip_tokenizer: Path
    dit_fp8: Path | None = None  # Tencent's pre-quantized FP8 DiT
    dit_fp8_map: Path | None = None
    image_processor: Path | None = None  # image-to-video only: the folder of LLaVA's preprocessor_config.json
    notes: list[str] = field(default_factory=list)

    @property
    def image_to_video(self) -> bool:
        """HunyuanVideo-I2V weights (a LLaVA text encoder with its image processor)."""
        return self.image_processor is not None

    def all_files(self) -> list[Path]:
        files = [*self.dit_weights, self.vae_weights, self.vae_config]
        files += [self.image_processor / "preprocessor_config.json"] if self.image_processor else []
        return files + ([self.dit_config] if self.dit_config else [])


def detect_layout(root: Path) -> str | None:
    """The 13B model's layout. Tencent's folders first: a ckpts/ may also hold HunyuanVideo-1.5's
    official `transformer/` folder, which is not the diffusers layout of the 13B model."""
    root = Path(root)
    if (root / "hunyuan-video-t2v-720p").is_dir() or (root / "hunyuan-video-i2v-720p").is_dir():
        return "official"
    if (root / "transformer").is_dir():
        return "diffusers"
    return None


MODEL_13B = "hunyuanvideo"  # `--model` value for the 13B model when a folder holds 1.5 weights too
MODEL_13B_I2V = "i2v"  # its image-to-video release, where a ckpts/ holds both (as `--image` picks it)


def find_model_files(root: Path, image_to_video: bool = False, model: str | None = None):
    """Detect the model and layout of `root` and check that every needed file is there. An official
    ckpts/ folder may hold both 13B releases: `image_to_video` picks the I2V one there (each alone is
    taken whatever is asked; the caller says when it is the wrong one).

    model: None detects the model from the folder; "hunyuanvideo" takes the 13B model ("i2v" its
    image-to-video release, as `image_to_video` does), "1.5" or "1.5-<variant>" (e.g.
    "1.5-720p_t2v") a HunyuanVideo-1.5 transformer (`v15_checkpoint`, whose `V15ModelFiles` is
    returned then). A folder holding both models needs one of them."""
    from .v15_checkpoint import MODEL_PREFIX, find_v15_files, is_v15_folder

    root = Path(root)
    if not root.is_dir():
        raise HyVideoError(f"model folder {root} does not exist; {DOWNLOAD_HINT.format(root=root)}")
    if model == MODEL_13B_I2V:
        model, image_to_video = MODEL_13B, True
    if model is not None and model != MODEL_13B and model != "1.5" and not model.startswith(MODEL_PREFIX):
        raise HyVideoError(f"--model must be {MODEL_13B}, {MODEL_13B_I2V}, 1.5 or 1.5-<variant> (e.g. 1.5-720p_t2v), not {model!r}")
    if model is None and is_v15_folder(root):
        if _holds_13b(root):
            raise HyVideoError(f"{root} holds HunyuanVideo (13B) and HunyuanVideo-1.5 weights: say which with "
                               f"--model {MODEL_13B} or --model 1.5")
        model = "1.5"
    if model is not None and model != MODEL_13B:
        return find_v15_files(root, image_to_video, model.removeprefix(MODEL_PREFIX) if model != "1.5" else None)
    layout = detect_layout(root)
    if layout == "diffusers":
        files = _diffusers_files(root)
    elif layout == "official":
        has_i2v = (root / "hunyuan-video-i2v-720p").is_dir()
        files = _official_files(root, has_i2v and (image_to_video or not (root / "hunyuan-video-t2v-720p").is_dir()))
    else:
        raise HyVideoError(
            f"{root} holds neither the official layout (hunyuan-video-t2v-720p/ or hunyuan-video-i2v-720p/) nor the diffusers layout "
            f"(transformer/); {DOWNLOAD_HINT.format(root=root)}"
        )
    missing = [p for p in files.all_files() if not p.is_file()]
    for folder in (files.llm, files.clip):
        if not (folder / "config.json").is_file():
            missing.append(folder / "config.json")
    if missing:
        shown = ", ".join(str(p.relative_to(root)) for p in missing[:3])
        raise HyVideoError(
            f"{len(missing)} file(s) missing in {root} ({layout} layout): {shown}"
            f"{' ...' if len(missing) > 3 else ''}; {DOWNLOAD_HINT.format(root=root)}"
        )
    return files


def releases_in(root: Path) -> list[ModelFiles]:
    """Where each release a folder holds keeps its files (an official ckpts/ may hold both), whether
    the files are there or not; [] for a folder of neither layout."""
    root = Path(root)
    layout = detect_layout(root)
    if layout == "diffusers":
        return [_diffusers_files(root)]
    if layout == "official":
        return [_official_files(root, i2v) for i2v, folder in ((False, "hunyuan-video-t2v-720p"), (True, "hunyuan-video-i2v-720p"))
                if (root / folder).is_dir()]
    return []


def _holds_13b(root: Path) -> bool:
    """Whether a folder with 1.5 weights also holds the 13B model's (Tencent's 13B folders; a
    diffusers folder is one model)."""
    return (root / "hunyuan-video-t2v-720p").is_dir() or (root / "hunyuan-video-i2v-720p").is_dir()


def _official_files(root: Path, image_to_video: bool) -> ModelFiles:
    if image_to_video:  # no FP8 file in the I2V release
        return ModelFiles(
            layout="official", root=root, dit_weights=[root / OFFICIAL_I2V_DIT], dit_config=None,
            vae_weights=root / OFFICIAL_I2V_VAE / "pytorch_model.pt", vae_config=root / OFFICIAL_I2V_VAE / "config.json",
            llm=root / OFFICIAL_I2V_TEXT_ENCODER, llm_tokenizer=root / OFFICIAL_I2V_TEXT_ENCODER,
            clip=root / "text_encoder_2", clip_tokenizer=root / "text_encoder_2", image_processor=root / OFFICIAL_I2V_TEXT_ENCODER,
        )
    fp8, fp8_map = root / OFFICIAL_DIT_FP8, root / OFFICIAL_DIT_FP8_MAP
    has_fp8 = fp8.is_file() and fp8_map.is_file()
    dit = root / OFFICIAL_DIT
    return ModelFiles(
        layout="official", root=root,
        dit_weights=[dit] if dit.is_file() or not has_fp8 else [],
        dit_config=None,
        vae_weights=root / OFFICIAL_VAE / "pytorch_model.pt", vae_config=root / OFFICIAL_VAE / "config.json",
        llm=root / "text_encoder", llm_tokenizer=root / "text_encoder",
        clip=root / "text_encoder_2", clip_tokenizer=root / "text_encoder_2",
        dit_fp8=fp8 if has_fp8 else None, dit_fp8_map=fp8_map if has_fp8 else None,
    )


def _diffusers_files(root: Path) -> ModelFiles:
    return ModelFiles(
        layout="diffusers", root=root,
        dit_weights=_safetensors_files(root / "transformer"), dit_config=root / "transformer" / "config.json",
        vae_weights=_safetensors_files(root / "vae")[0], vae_config=root / "vae" / "config.json",
        llm=root / "text_encoder", llm_tokenizer=root / "tokenizer",
        clip=root / "text_encoder_2", clip_tokenizer=root / "tokenizer_2",
        image_processor=root / "image_processor" if (root / "image_processor").is_dir() else None,
    )


def _safetensors_files(folder: Path) -> list[Path]:
    """Shards named by the index file if there is one (so a missing shard is noticed), else the
    folder's single safetensors file."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = _read_json(indexes[0])["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    found = sorted(folder.glob("*.safetensors"))
    return found or [folder / "diffusion_pytorch_model.safetensors"]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise HyVideoError(f"cannot read {path}: {err}; the file is incomplete or corrupt, download it again") from None


def official_dit_config(files: ModelFiles, state_dict: Mapping) -> DiTConfig:
    """An official folder's DiT config: from the tensor shapes, and from the folder for an I2V DiT."""
    return infer_dit_config(state_dict, token_replace=files.image_to_video)


def infer_dit_config(state_dict: dict, token_replace: bool = False) -> DiTConfig:
    """The official checkpoint has no config: sizes follow from tensor shapes. RoPE axes follow
    the 13B rule (t gets head_dim/8 channels, y and x split the rest), which gives 16/56/56.
    2C + 1 input channels mean the latent_concat I2V DiT; a token_replace I2V DiT has the text-to-
    video DiT's names and shapes, so only its folder tells (`token_replace=True`)."""
    try:
        hidden, in_channels, pt, ph, pw = state_dict["img_in.proj.weight"].shape
        head_dim = state_dict["double_blocks.0.img_attn_q_norm.weight"].shape[0]
    except KeyError as err:
        raise HyVideoError(f"not a HunyuanVideo transformer checkpoint: key {err} is missing") from None

    def count(prefix):  # distinct block indices under prefix ("double_blocks." -> field 1)
        return len({k.split(".")[prefix.count(".")] for k in state_dict if k.startswith(prefix)})

    rope_t = head_dim // 8
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // (pt * ph * pw)
    image_condition_type = "token_replace" if token_replace else None
    if in_channels == 2 * out_channels + 1:
        image_condition_type = "latent_concat"
    return DiTConfig(
        hidden_size=hidden, heads=hidden // head_dim,
        double_blocks=count("double_blocks."), single_blocks=count("single_blocks."),
        refiner_blocks=count("txt_in.individual_token_refiner.blocks."),
        mlp_ratio=state_dict["double_blocks.0.img_mlp.fc1.weight"].shape[0] / hidden,
        patch_size=(pt, ph, pw), in_channels=in_channels,
        out_channels=out_channels,
        text_states_dim=state_dict["txt_in.input_embedder.weight"].shape[1],
        text_states_dim_2=state_dict["vector_in.in_layer.weight"].shape[1],
        rope_axes_dim=(rope_t, (head_dim - rope_t) // 2, (head_dim - rope_t) // 2),
        guidance_embed="guidance_in.mlp.0.weight" in state_dict, image_condition_type=image_condition_type,
    )


def load_dit_state_dict(files: ModelFiles, index: bool = False) -> tuple[Mapping[str, torch.Tensor], DiTConfig]:
    """The DiT's weights in official key names (memory-mapped; for the diffusers layout a lazy view
    whose key names were checked here), plus its config. `index=True`: meta tensors, no data read."""
    if files.layout == "official":
        if not files.dit_weights:
            raise HyVideoError(f"only the FP8 transformer is in {files.root}: load it with an fp8 profile")
        state_dict = read_torch_file(files.dit_weights[0], index=index)
        return state_dict, official_dit_config(files, state_dict)
    try:
        config = DiTConfig.from_diffusers(_read_json(files.dit_config))
    except (KeyError, ValueError) as err:
        raise HyVideoError(f"{files.dit_config} is not a HunyuanVideo transformer config: {err}") from None
    with torch.device("meta"):
        official_keys = list(HunyuanVideoDiT(config).state_dict())
    state_dict, missing, unused = diffusers_to_official(read_safetensors(files.dit_weights, index=index), official_keys)
    _raise_key_problems(files.dit_weights[0].parent, missing, unused, {})
    return state_dict, config


def _raise_key_problems(where, missing, unexpected, misshaped: dict) -> None:
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", list(misshaped))):
        if keys:
            first = ", ".join(
                f"{k} {tuple(misshaped[k][0])} != expected {tuple(misshaped[k][1])}" if label == "mis-shaped" else k
                for k in keys[:3]
            )
            raise HyVideoError(
                f"{where}: {len(keys)} {label} tensor(s), first: {first}. Wrong or partial checkpoint? "
                f"Download it again (`lowvram download`)"
            )


def check_state_dict(model: torch.nn.Module, state_dict: Mapping, where) -> None:
    """Missing, unexpected or mis-shaped keys -> one HyVideoError naming the file and first keys.
    Reads shapes only (a lazy diffusers view answers them without fusing anything)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if hasattr(state_dict, "shapes"):  # a lazy view (DiffusersAsOfficial, v15_checkpoint.ConvertedByGroup)
        shapes = state_dict.shapes()
    else:
        shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    misshaped = {k: (shapes[k], expected[k]) for k in expected if k in shapes and shapes[k] != expected[k]}
    _raise_key_problems(where, missing, unexpected, misshaped)


def build_on_meta_and_assign(make_model, state_dict: Mapping, dtype: torch.dtype, where) -> torch.nn.Module:
    """Construct without allocating (meta device), then adopt the loaded tensors as parameters.
    Tensors already in `dtype` are used as they are (memory-mapped pages, no copy); a lazy view's
    fused tensors are made here, once each."""
    with torch.device("meta"):
        model = make_model()
    check_state_dict(model, state_dict, where)
    state_dict = {k: v if v.dtype == dtype else v.to(dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_dit(files: ModelFiles, dtype: torch.dtype = torch.bfloat16) -> HunyuanVideoDiT:
    state_dict, config = load_dit_state_dict(files)
    return build_on_meta_and_assign(lambda: HunyuanVideoDiT(config), state_dict, dtype, files.dit_weights[0])


def load_vae_state_dict(files: ModelFiles, index: bool = False) -> tuple[dict[str, torch.Tensor], VAEConfig]:
    """The VAE's weights (memory-mapped; `index=True`: meta tensors, no data read) and config."""
    config = VAEConfig.from_dict(_read_json(files.vae_config))
    if files.vae_weights.suffix == ".safetensors":
        state_dict = read_safetensors([files.vae_weights], index=index)
    else:
        state_dict = read_torch_file(files.vae_weights, index=index)
        if any(k.startswith("vae.") for k in state_dict):  # official loader keeps only "vae."-prefixed keys
            state_dict = {k[4:]: v for k, v in state_dict.items() if k.startswith("vae.")}
    return state_dict, config


def load_vae(files: ModelFiles, dtype: torch.dtype = torch.float16) -> CausalVAE:
    state_dict, config = load_vae_state_dict(files)
    return build_on_meta_and_assign(lambda: CausalVAE(config), state_dict, dtype, files.vae_weights)
