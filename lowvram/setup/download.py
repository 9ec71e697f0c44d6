"""Get the weights into a model folder (whether a folder is complete: `model_folder.py`).

Two layouts (hyvideo/checkpoint.py reads both):
- "diffusers" (default): everything from one repo, `hunyuanvideo-community/HunyuanVideo`
  (transformer/, vae/, text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/; ~41 GB).
- "official": Tencent's `tencent/HunyuanVideo` DiT and VAE (hunyuan-video-t2v-720p/), optionally
  its FP8 DiT pair (--fp8), plus the text encoders from the community repo moved into the official
  folders (the official text_encoder/ is otherwise made by a preprocessing script, facts §4.1).

Three models (`--model`, as `lowvram plan --model` names them): t2v (HunyuanVideo), i2v
(HunyuanVideo-I2V, token_replace: Tencent's current release) and i2v-33ch (its first release,
latent_concat). Image-to-video in the diffusers layout is one repo as above, plus image_processor/;
in the official layout it is what Tencent's ckpts/README.md (HunyuanVideo-I2V) says to download:
`tencent/HunyuanVideo-I2V`'s DiT and VAE (hunyuan-video-i2v-720p/; its example LoRAs are left out),
the whole LLaVA into text_encoder_i2v/ (no extraction: I2V encodes the image with it) and CLIP-L into
text_encoder_2/. i2v-33ch is in the diffusers layout only: Tencent's repo now holds the token_replace
DiT under the same name.

HunyuanVideo-1.5 (`--model 1.5-<variant>`, one transformer a download): in the diffusers layout the
variant's `hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-<variant>` repo; in the official layout
what Tencent's checkpoints-download.md says, with only the chosen transformer/<variant>/ of
`tencent/HunyuanVideo-1.5`: Qwen2.5-VL-7B-Instruct into text_encoder/llm/, byt5-small and
Glyph-SDXL-v2 (from ModelScope whatever the source: the doc names no other copy) into text_encoder/,
and for image-to-video FLUX.1-Redux-dev's SigLIP into vision_encoder/siglip/ (constants below).

Two sources:
- "huggingface" (default): huggingface_hub's `snapshot_download` (resumable, skips files already
  there); `plan_download` is the same call with `dry_run=True` (file names, sizes, what is there).
- "modelscope" (`pip install "hyvideo-lowvram[modelscope]"`, for where huggingface.co is slow or
  blocked): ModelScope's copies of the three repos the official ckpts/README.md names, in the
  official layout: AI-ModelScope/HunyuanVideo (DiT, VAE), AI-ModelScope/clip-vit-large-patch14
  (text_encoder_2/) and AI-ModelScope/llava-llama-3-8b-v1_1-transformers, whose language model is
  then extracted into text_encoder/ as the official preprocessing script does (`llava.py`). A part
  whose files are all there already is not asked for again, so after a download by hand the same
  command only extracts, offline. For i2v: AI-ModelScope/HunyuanVideo-I2V, the same CLIP, and the
  same LLaVA whole into text_encoder_i2v/. A dry run lists the repos and patterns; ModelScope is not
  asked for sizes.
Any failure (offline, no network, gated repo, package missing) becomes a HyVideoError that prints
the `hf download` / `modelscope download` commands to run by hand.
"""

import shutil
from dataclasses import dataclass
from pathlib import Path

from hyvideo.checkpoint import (
    OFFICIAL_DIT,
    OFFICIAL_DIT_FP8,
    OFFICIAL_DIT_FP8_MAP,
    OFFICIAL_I2V_DIT,
    OFFICIAL_I2V_TEXT_ENCODER,
    OFFICIAL_I2V_VAE,
    OFFICIAL_VAE,
    detect_layout,
)
from hyvideo.errors import HyVideoError, one_line
from hyvideo.v15_checkpoint import (
    diffusers_variant,
    is_v15_folder,
    official_variants,
)
from hyvideo.v15_text import GLYPH_CHECKPOINT, GLYPH_COLOR_FILE, GLYPH_FONT_FILE
from lowvram.families import RELEASED_DITS, RELEASED_V15

from .model_folder import BYT5_TOKENIZER, check_file, transformers_folder

COMMUNITY_REPO = "hunyuanvideo-community/HunyuanVideo"
OFFICIAL_REPO = "tencent/HunyuanVideo"
MODELS = (*RELEASED_DITS, *RELEASED_V15)  # t2v, i2v, i2v-33ch, 1.5-<variant>: the names `lowvram plan --model` takes
# The diffusers I2V repos, as diffusers 0.42's HunyuanVideoImageToVideoPipeline docstring lists them
COMMUNITY_I2V_REPOS = {"i2v": "hunyuanvideo-community/HunyuanVideo-I2V", "i2v-33ch": "hunyuanvideo-community/HunyuanVideo-I2V-33ch"}
# Tencent's HunyuanVideo-I2V ckpts/README.md: the DiT and VAE (main holds the token_replace DiT, the
# default --i2v-condition-type, since the 2025-03-07 weights), the whole LLaVA into text_encoder_i2v/
# and CLIP-L into text_encoder_2/
OFFICIAL_I2V_REPO = "tencent/HunyuanVideo-I2V"
LLAVA_REPO = "xtuner/llava-llama-3-8b-v1_1-transformers"
CLIP_REPO = "openai/clip-vit-large-patch14"
# ModelScope's copies of tencent/HunyuanVideo, openai/clip-vit-large-patch14 and
# xtuner/llava-llama-3-8b-v1_1-transformers (ids as DiffSynth-Studio's and ms-swift's model tables use them)
MS_OFFICIAL_REPO = "AI-ModelScope/HunyuanVideo"
MS_CLIP_REPO = "AI-ModelScope/clip-vit-large-patch14"
MS_LLAVA_REPO = "AI-ModelScope/llava-llama-3-8b-v1_1-transformers"
MS_I2V_REPO = "AI-ModelScope/HunyuanVideo-I2V"  # ModelScope's copy of tencent/HunyuanVideo-I2V (DiffSynth-Studio's HunyuanVideoI2V entry)
LLAVA_FOLDER = "llava-llama-3-8b-v1_1-transformers"  # where the official README puts it, under ckpts/
# HunyuanVideo-1.5, Tencent's layout, as its checkpoints-download.md (Tencent-Hunyuan/HunyuanVideo-1.5) says:
# tencent/HunyuanVideo-1.5's DiT and VAE (here only the chosen transformer/<variant>/ and vae/),
# Qwen/Qwen2.5-VL-7B-Instruct into text_encoder/llm, google/byt5-small into text_encoder/byt5-small,
# Glyph-SDXL-v2 from ModelScope (the doc names no Hugging Face copy) into text_encoder/Glyph-SDXL-v2,
# and for image-to-video black-forest-labs/FLUX.1-Redux-dev (gated: accept its licence) into vision_encoder/siglip.
V15_REPO = "tencent/HunyuanVideo-1.5"
QWEN_REPO = "Qwen/Qwen2.5-VL-7B-Instruct"
BYT5_REPO = "google/byt5-small"
GLYPH_REPO = "AI-ModelScope/Glyph-SDXL-v2"  # on ModelScope only, whatever --source says
SIGLIP_REPO = "black-forest-labs/FLUX.1-Redux-dev"
# ModelScope's copies: Tencent-Hunyuan/HunyuanVideo-1.5, and Qwen's and Google's repos under their own
# names (as third-party download tables that fetch these from ModelScope name them); FLUX.1-Redux-dev
# under its own name too (DiffSynth-Studio's ModelScope model ids).
MS_V15_REPO = "Tencent-Hunyuan/HunyuanVideo-1.5"
MS_QWEN_REPO = "Qwen/Qwen2.5-VL-7B-Instruct"
MS_BYT5_REPO = "google/byt5-small"
MS_SIGLIP_REPO = "black-forest-labs/FLUX.1-Redux-dev"
# The diffusers conversions, one repo a transformer (hunyuanvideo-community's HunyuanVideo-1.5 collection,
# which Tencent's README links; the variants that community runners load from it). None is known for the
# others (the sparse-attention ones, and the 720p T2V distilled one Tencent has not released).
COMMUNITY_V15_REPOS = {variant: f"hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-{variant}" for variant in (
    "480p_t2v", "480p_t2v_distilled", "720p_t2v", "480p_i2v", "480p_i2v_distilled", "480p_i2v_step_distilled",
    "720p_i2v", "720p_i2v_distilled")}
V15_UNRELEASED = ("720p_t2v_distilled", "720p_t2v_distilled_sparse")  # Tencent's README model table: "Coming soon"
V15_DIFFUSERS_PARTS = ("model_index.json", "transformer/*", "vae/*", "scheduler/*", "guider/*", "text_encoder/*", "tokenizer/*",
                       "text_encoder_2/*", "tokenizer_2/*")
V15_DIFFUSERS_I2V_PARTS = ("image_encoder/*", "feature_extractor/*")
DEFAULT_MODEL_DIR = Path("ckpts")
LAYOUTS = ("diffusers", "official")
SOURCES = ("huggingface", "modelscope")
TEXT_PARTS = ["text_encoder/*", "tokenizer/*", "text_encoder_2/*", "tokenizer_2/*"]


@dataclass(frozen=True)
class RepoPart:
    """One snapshot_download: which files of which repo, into which subfolder of the model folder
    ("": the folder itself), and folders to rename afterwards (repo folder -> layout folder; files
    are moved into it)."""

    repo: str
    patterns: tuple[str, ...]
    moves: tuple[tuple[str, str], ...] = ()
    into: str = ""
    hub: str | None = None  # "modelscope": from there whatever the source (Glyph-SDXL-v2)
    needs: tuple[str, ...] = ()  # files under `into` that make the part complete (default: see `_part_present`)


@dataclass
class PlannedFile:
    repo: str
    file: str
    size: int | None
    present: bool  # already downloaded (same revision)


def check_source(source: str, layout: str | None) -> str:
    """The layout a download makes: ModelScope has the official layout only (its copy of the
    community diffusers repo is not known)."""
    if source not in SOURCES:
        raise HyVideoError(f"unknown source {source!r}: choose huggingface or modelscope")
    if source == "modelscope":
        if layout not in (None, "official"):
            raise HyVideoError("--source modelscope downloads the official layout only; drop --layout or pass --layout official")
        return "official"
    return layout or "diffusers"


def download_parts(layout: str | None = None, fp8: bool = False, source: str = "huggingface", model: str = "t2v") -> list[RepoPart]:
    layout = check_source(source, layout)
    if layout not in LAYOUTS:
        raise HyVideoError(f"unknown layout {layout!r}: choose diffusers or official")
    if model not in MODELS:
        raise HyVideoError(f"--model must be one of {', '.join(MODELS)}; got {model!r}")
    if fp8 and (layout == "diffusers" or model != "t2v"):
        raise HyVideoError("--fp8 (Tencent's FP8 DiT file) needs --layout official and --model t2v (the I2V release has none)")
    if model in RELEASED_V15:
        return _v15_parts(RELEASED_V15[model], layout, source)
    if layout == "diffusers":
        if model != "t2v":
            return [RepoPart(COMMUNITY_I2V_REPOS[model], ("transformer/*", "vae/*", *TEXT_PARTS, "image_processor/*"))]
        return [RepoPart(COMMUNITY_REPO, ("transformer/*", "vae/*", *TEXT_PARTS))]
    if model == "i2v-33ch":
        raise HyVideoError("the 33-channel (latent_concat) I2V release is in the diffusers layout only, on huggingface.co "
                           f"({COMMUNITY_I2V_REPOS['i2v-33ch']}): use --layout diffusers --source huggingface")
    if model == "i2v":  # exact names for ModelScope: a part whose files are all there is not downloaded again
        dit, clip, llava = (MS_I2V_REPO, MS_CLIP_REPO, MS_LLAVA_REPO) if source == "modelscope" else (OFFICIAL_I2V_REPO, CLIP_REPO, LLAVA_REPO)
        return [
            RepoPart(dit, (OFFICIAL_I2V_DIT, f"{OFFICIAL_I2V_VAE}/config.json", f"{OFFICIAL_I2V_VAE}/pytorch_model.pt")),
            RepoPart(clip, ("*.json", "*.txt", "model.safetensors"), into="text_encoder_2"),  # not the TF/Flax/.bin copies
            RepoPart(llava, ("*.json", "*.safetensors"), into=OFFICIAL_I2V_TEXT_ENCODER),
        ]
    if source == "modelscope":  # exact names: a part whose files are all there is not downloaded again
        dit = [OFFICIAL_DIT] + ([OFFICIAL_DIT_FP8, OFFICIAL_DIT_FP8_MAP] if fp8 else [])
        return [
            RepoPart(MS_OFFICIAL_REPO, (*dit, f"{OFFICIAL_VAE}/config.json", f"{OFFICIAL_VAE}/pytorch_model.pt")),
            RepoPart(MS_CLIP_REPO, ("*.json", "*.txt", "model.safetensors"), into="text_encoder_2"),  # not the TF/Flax/.bin copies
            RepoPart(MS_LLAVA_REPO, ("*.json", "*.safetensors"), into=LLAVA_FOLDER),
        ]
    official = [OFFICIAL_DIT, f"{OFFICIAL_VAE}/*"] + ([OFFICIAL_DIT_FP8, OFFICIAL_DIT_FP8_MAP] if fp8 else [])
    return [
        RepoPart(OFFICIAL_REPO, tuple(official)),
        RepoPart(COMMUNITY_REPO, tuple(TEXT_PARTS), moves=(("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))),
    ]


def _v15_parts(variant: str, layout: str, source: str) -> list[RepoPart]:
    """HunyuanVideo-1.5: one diffusers repo per transformer, or Tencent's layout from five repos
    (see the constants above), each part complete when its `needs` (or exact names) are there."""
    if variant in V15_UNRELEASED:
        raise HyVideoError(f"Tencent has not released the HunyuanVideo-1.5 {variant} transformer (its README: coming soon); "
                           f"choose another 1.5-<variant>")
    image_to_video = "_i2v" in variant
    if layout == "diffusers":
        if variant not in COMMUNITY_V15_REPOS:
            raise HyVideoError(f"no diffusers conversion of the HunyuanVideo-1.5 {variant} transformer is known: use --layout official")
        return [RepoPart(COMMUNITY_V15_REPOS[variant], V15_DIFFUSERS_PARTS + (V15_DIFFUSERS_I2V_PARTS if image_to_video else ()))]
    modelscope = source == "modelscope"
    dit = f"transformer/{variant}"
    parts = [
        RepoPart(MS_V15_REPO if modelscope else V15_REPO, (f"{dit}/*", "vae/*"),  # only the transformer asked for
                 needs=tuple(f"{folder}/{name}" for folder in (dit, "vae") for name in ("config.json", "diffusion_pytorch_model.safetensors"))),
        RepoPart(MS_QWEN_REPO if modelscope else QWEN_REPO, ("*.json", "*.txt", "*.safetensors"), into="text_encoder/llm"),
        RepoPart(MS_BYT5_REPO if modelscope else BYT5_REPO, ("*.json", "pytorch_model.bin"), into="text_encoder/byt5-small",
                 needs=("config.json", "pytorch_model.bin", *BYT5_TOKENIZER)),  # not the TF/Flax copies
        RepoPart(GLYPH_REPO, ("assets/*", GLYPH_CHECKPOINT), into="text_encoder/Glyph-SDXL-v2", hub="modelscope",
                 needs=(GLYPH_CHECKPOINT, GLYPH_COLOR_FILE, GLYPH_FONT_FILE)),
    ]
    if image_to_video:
        parts.append(RepoPart(MS_SIGLIP_REPO if modelscope else SIGLIP_REPO, ("image_encoder/*", "feature_extractor/*"),
                              into="vision_encoder/siglip", needs=("image_encoder/config.json", "image_encoder/model.safetensors",
                                                                    "feature_extractor/preprocessor_config.json")))
    return parts


def manual_commands(model_dir: Path, layout: str | None = None, fp8: bool = False, source: str = "huggingface",
                    model: str = "t2v") -> list[str]:
    """What to run by hand (any machine with network; copy the folder over afterwards)."""
    commands = []
    for part in download_parts(layout, fp8, source, model):
        includes = " ".join(f'--include "{p}"' for p in part.patterns)
        target = f"{model_dir}/{part.into}" if part.into else f"{model_dir}"
        if source == "modelscope" or part.hub == "modelscope":
            commands.append(f"modelscope download --model {part.repo} {includes} --local_dir {target}")
        else:
            commands.append(f"hf download {part.repo} {includes} --local-dir {target}")
        for folder, into in part.moves:
            commands.append(f"mv {model_dir}/{folder}/* {model_dir}/{into}/ && rmdir {model_dir}/{folder}")
    if source == "modelscope" and model == "t2v":
        commands.append(f"lowvram download --source modelscope --model-dir {model_dir}   "
                        f"# then, offline: extracts text_encoder/ from {LLAVA_FOLDER}/")
    return commands


def _manual(model_dir: Path, layout: str | None, fp8: bool, source: str, model: str) -> str:
    commands = manual_commands(model_dir, layout, fp8, source, model)
    ms_too = "" if source == "modelscope" or not any(c.startswith("modelscope ") for c in commands) else \
        "; `pip install modelscope` gives the `modelscope` command"
    commands = "\n  ".join(commands)
    if source == "modelscope":
        return f"\nto download by hand (`pip install modelscope` gives the `modelscope` command):\n  {commands}"
    return f"\nto download by hand (huggingface_hub < 1.0 calls it `huggingface-cli download`{ms_too}):\n  {commands}"


def _modelscope_error(error: Exception, model_dir: Path, manual: str) -> HyVideoError:
    if isinstance(error, OSError) and getattr(error, "errno", None) == 28:
        return HyVideoError(f"the disk is full while downloading into {model_dir}; free space and run the same command again (it resumes)")
    return HyVideoError(f"cannot download from modelscope.cn ({one_line(error)}); offline or no network?{manual}")


def _hub_error(error: Exception, model_dir: Path, layout: str, fp8: bool, model: str) -> HyVideoError:
    from huggingface_hub import errors

    manual = _manual(model_dir, layout, fp8, "huggingface", model)
    if isinstance(error, errors.GatedRepoError):
        return HyVideoError(f"the repo needs you to accept its licence on huggingface.co and log in (`hf auth login`): {one_line(error)}{manual}")
    if isinstance(error, errors.RepositoryNotFoundError):
        return HyVideoError(f"repo not found on huggingface.co: {one_line(error)}{manual}")
    if isinstance(error, OSError) and getattr(error, "errno", None) == 28:
        return HyVideoError(f"the disk is full while downloading into {model_dir}; free space and run the same command again (it resumes)")
    if isinstance(error, errors.OfflineModeIsEnabled):
        return HyVideoError(f"huggingface_hub is in offline mode (HF_HUB_OFFLINE is set), so nothing can be downloaded{manual}")
    return HyVideoError(f"cannot download from huggingface.co ({one_line(error)}); offline or no network?{manual}")


def plan_download(model_dir: Path, layout: str | None = None, fp8: bool = False, source: str = "huggingface",
                  model: str = "t2v") -> list[PlannedFile]:
    """The files a download would fetch, with sizes (asks the hub; downloads nothing). ModelScope:
    one row per pattern, size None (not asked), present when the whole part is there."""
    model_dir = Path(model_dir)
    if source == "modelscope":
        planned = [PlannedFile(part.repo, f"{part.into}/{p}" if part.into else p, None, _part_present(model_dir, part))
                   for part in download_parts(layout, fp8, source, model) for p in part.patterns]
        if model != "t2v":  # I2V keeps the whole LLaVA: nothing to extract
            return planned
        extracted = _text_encoder_present(model_dir)
        return planned + [PlannedFile(f"{LLAVA_FOLDER}/ (extracted here)", "text_encoder/", None, extracted)]
    from huggingface_hub import snapshot_download

    planned = []
    for part in download_parts(layout, fp8, model=model):
        if part.hub == "modelscope":  # not asked for sizes, as a ModelScope dry run
            planned += [PlannedFile(part.repo, f"{part.into}/{p}", None, _part_present(model_dir, part)) for p in part.patterns]
            continue
        try:
            infos = snapshot_download(part.repo, local_dir=str(model_dir / part.into), allow_patterns=list(part.patterns), dry_run=True)
        except Exception as error:  # the hub raises many types (HTTP, offline, gated); all end here
            raise _hub_error(error, model_dir, layout, fp8, model) from None
        planned += [PlannedFile(part.repo, f"{part.into}/{info.filename}" if part.into else info.filename, info.file_size,
                                not info.will_download) for info in infos]
    return planned


def download(model_dir: Path, layout: str | None = None, fp8: bool = False, progress: bool = True,
             source: str = "huggingface", model: str = "t2v") -> Path:
    """Fetch what is missing into `model_dir` in `layout`; returns the folder."""
    if source == "modelscope":
        return _download_modelscope(Path(model_dir), layout, fp8, model)
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    (enable_progress_bars if progress else disable_progress_bars)()
    parts = download_parts(layout, fp8, model=model)
    elsewhere = [part for part in parts if part.hub == "modelscope" and not _part_present(model_dir, part)]
    _fetch_modelscope(model_dir, elsewhere, _manual(model_dir, layout, fp8, source, model))  # first: it may lack its package
    for part in parts:
        if part.hub == "modelscope":
            continue
        try:
            snapshot_download(part.repo, local_dir=str(model_dir / part.into), allow_patterns=list(part.patterns))
        except Exception as error:
            raise _hub_error(error, model_dir, layout, fp8, model) from None
        for source, target in part.moves:
            _move_into(model_dir / source, model_dir / target)
    return model_dir


def _download_modelscope(model_dir: Path, layout: str | None, fp8: bool, model: str) -> Path:
    """The three ModelScope repos (parts already complete are skipped, without the network), then
    for text-to-video text_encoder/ extracted from the LLaVA checkpoint unless it is there."""
    from .llava import extract_language_model

    extract = model == "t2v" and not _text_encoder_present(model_dir)  # else the LLaVA download may be deleted
    parts = [part for part in download_parts(layout, fp8, "modelscope", model)
             if not _part_present(model_dir, part) and not (model == "t2v" and not extract and part.repo == MS_LLAVA_REPO)]
    _fetch_modelscope(model_dir, parts, _manual(model_dir, "official", fp8, "modelscope", model))
    if extract:
        extract_language_model(model_dir / LLAVA_FOLDER, model_dir / "text_encoder")
    return model_dir


def _fetch_modelscope(model_dir: Path, parts: list[RepoPart], manual: str) -> None:
    """ModelScope's snapshot_download for each part (the package is asked for only when a part is
    to be fetched); failures become a HyVideoError ending in `manual` (the commands to run by hand)."""
    if parts:
        try:
            from modelscope import snapshot_download
        except ImportError:
            raise HyVideoError(f'downloading {parts[0].repo} from ModelScope needs the modelscope package: '
                               f'pip install "hyvideo-lowvram[modelscope]"{manual}') from None
    model_dir.mkdir(parents=True, exist_ok=True)
    for part in parts:
        try:
            snapshot_download(part.repo, local_dir=str(model_dir / part.into), allow_patterns=list(part.patterns))
        except Exception as error:  # requests, HTTP and ModelScope's own errors alike
            raise _modelscope_error(error, model_dir, manual) from None


def _part_present(model_dir: Path, part: RepoPart) -> bool:
    """Every file of a ModelScope part is there and readable: its `needs`, else its exact names and
    a complete transformers folder for a part downloaded into a subfolder."""
    if part.needs:
        paths = [model_dir / part.into / p for p in part.needs]
    else:
        paths = [model_dir / part.into / p for p in part.patterns if "*" not in p]
        paths += transformers_folder(model_dir / part.into, None) if part.into else []
    return all(check_file(p).ok for p in paths)


def _text_encoder_present(model_dir: Path) -> bool:
    return all(check_file(p).ok for p in transformers_folder(model_dir / "text_encoder", None))


def _move_into(source: Path, target: Path) -> None:
    if not source.is_dir():
        return
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        shutil.move(str(path), target / path.name)
    source.rmdir()


def download_commands(root: Path, layout: str) -> list[str]:
    """The `lowvram download` command(s) that complete a folder: for a 1.5 folder, one per transformer in it."""
    try:
        variants = (official_variants(root) or [diffusers_variant(root)]) if is_v15_folder(root) else []
    except HyVideoError:
        variants = []
    options = [f" --model 1.5-{variant}" + (" --layout official" if layout == "official" else "") for variant in variants]
    return [f"lowvram download{option} --model-dir {root}" for option in options or [""]]


def default_model_dir() -> Path:
    """./ckpts if it holds a model, else the huggingface_hub cache snapshot of one of the HF repos
    (where `hf download REPO` puts it), else ./ckpts (the error then says how to download)."""
    if DEFAULT_MODEL_DIR.is_dir() and detect_layout(DEFAULT_MODEL_DIR):
        return DEFAULT_MODEL_DIR
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return DEFAULT_MODEL_DIR
    for repo in (COMMUNITY_REPO, OFFICIAL_REPO):
        try:
            path = Path(snapshot_download(repo, local_files_only=True))
        except Exception:  # not cached (LocalEntryNotFoundError and friends)
            continue
        if detect_layout(path):
            return path
    return DEFAULT_MODEL_DIR
