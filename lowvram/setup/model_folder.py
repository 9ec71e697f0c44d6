"""Check that a model folder is complete without the network: `check_model_folder` lists every
file the folder's model(s) need (`expected_files`: the 13B model in either layout, both 13B
releases in one ckpts/, a HunyuanVideo-1.5 folder), checks each alone (`check_file`: present,
non-empty, and readable the way the loader reads it, `hyvideo.weight_io.check_weight_file`:
mapped as the loader maps it, the zip directory or safetensors header parsed and every tensor
inside the file, the pickle read by the weights-only unpickler; no tensor data is read, so a 25 GB
file takes milliseconds), then what each place's weights hold against what the place needs
(`hyvideo.weight_contents`: an I2V DiT where the text-to-video one belongs, a LoRA, a whole LLaVA
where the bare Llama belongs, ...). A problem is reported with the loader's own message, or names
what the file is and what belongs there. `lowvram doctor` and `lowvram download` use it.
"""

import json
from dataclasses import dataclass
from functools import partial
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
    releases_in,
)
from hyvideo.errors import HyVideoError
from hyvideo.v15_checkpoint import (
    diffusers_variant,
    find_v15_files,
    is_diffusers_v15,
    is_v15_folder,
    official_variants,
)
from hyvideo.v15_text import GLYPH_CHECKPOINT, GLYPH_COLOR_FILE, GLYPH_FONT_FILE
from hyvideo.weight_contents import (
    check_dit,
    check_fp8_dit,
    check_text_encoder,
    check_v15_dit,
    check_v15_vae,
    check_vae,
)
from hyvideo.weight_io import check_weight_file

BYT5_TOKENIZER = ("tokenizer_config.json",)  # ByT5Tokenizer reads bytes: no vocabulary file
SIGLIP_PROCESSOR = ("preprocessor_config.json",)
TOKENIZER_NAMES = ("tokenizer.json", "tokenizer.model", "vocab.json")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass
class FileCheck:
    path: Path
    size: int | None  # None: missing
    problem: str | None  # None: looks complete

    @property
    def ok(self) -> bool:
        return self.problem is None


def check_file(path: Path) -> FileCheck:
    path = Path(path)
    if not path.is_file():
        return FileCheck(path, None, "missing")
    size = path.stat().st_size
    if size == 0:
        return FileCheck(path, 0, "empty")
    return FileCheck(path, size, _format_problem(path))


def _format_problem(path: Path) -> str | None:
    """The loader's own message if it could not read the file (weights: `check_weight_file`, which
    maps the file as the loader does and checks its zip directory or safetensors header against the
    file size, reading no tensor data), else None."""
    try:
        if path.suffix in WEIGHT_SUFFIXES:
            check_weight_file(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
    except HyVideoError as error:
        return str(error)
    except (OSError, ValueError) as error:
        return f"unreadable or truncated ({type(error).__name__})"
    return None


def transformers_folder(folder: Path, tokenizer_folder: Path | None, tokenizer_names: tuple[str, ...] = TOKENIZER_NAMES) -> list[Path]:
    """config.json, the weights (shards named by the index, else *.safetensors / *.bin) and the
    tokenizer file(s) of a save_pretrained folder (or a processor's: `tokenizer_names`)."""
    paths = [folder / "config.json"]
    indexes = sorted(folder.glob("*.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
            paths += [indexes[0]] + [folder / name for name in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError):
            paths.append(indexes[0])
    else:
        weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        paths += weights or [folder / "model.safetensors"]
    tokenizer_folder = tokenizer_folder or folder
    names = [tokenizer_folder / n for n in tokenizer_names if (tokenizer_folder / n).exists()]
    return paths + (names or [tokenizer_folder / tokenizer_names[0]])


def _v15_expected_files(root: Path) -> tuple[str, list[Path]]:
    """A HunyuanVideo-1.5 folder's files: each transformer there (Tencent's folder may hold several),
    the VAE, Qwen2.5-VL, byT5 (Tencent: byt5-small and Glyph-SDXL-v2) and, for image-to-video, SigLIP."""
    def dit_and_vae(dit: Path) -> list[Path]:
        paths = []
        for folder in (dit, root / "vae"):
            index = folder / "diffusion_pytorch_model.safetensors.index.json"
            weights = transformers_folder(folder, folder)[1:-1] if index.exists() else \
                sorted(folder.glob("*.safetensors")) or [folder / "diffusion_pytorch_model.safetensors"]
            paths += [folder / "config.json", *weights]
        return paths

    if is_diffusers_v15(root):
        paths = dit_and_vae(root / "transformer") + [root / "guider" / "guider_config.json"]
        paths += transformers_folder(root / "text_encoder", root / "tokenizer")
        paths += transformers_folder(root / "text_encoder_2", root / "tokenizer_2", BYT5_TOKENIZER)
        if (root / "image_encoder").is_dir() or json.loads((root / "transformer" / "config.json").read_text()).get("task_type") == "i2v":
            paths += transformers_folder(root / "image_encoder", root / "feature_extractor", SIGLIP_PROCESSOR)
        return "diffusers", paths
    variants = official_variants(root)
    paths = [p for variant in variants for p in dit_and_vae(root / "transformer" / variant)]
    text = root / "text_encoder"
    paths += transformers_folder(text / "llm", None) + transformers_folder(text / "byt5-small", None, BYT5_TOKENIZER)
    paths += [text / "Glyph-SDXL-v2" / name for name in (GLYPH_CHECKPOINT, GLYPH_COLOR_FILE, GLYPH_FONT_FILE)]
    if any("_i2v" in variant for variant in variants):
        siglip = root / "vision_encoder" / "siglip"
        paths += transformers_folder(siglip / "image_encoder", siglip / "feature_extractor", SIGLIP_PROCESSOR)
    return "official", paths


def expected_files(root: Path) -> tuple[str | None, list[Path]]:
    """(layout, every file a model folder must hold) — without raising on missing ones."""
    root = Path(root)
    try:
        if root.is_dir() and is_v15_folder(root):
            return _v15_expected_files(root)
    except HyVideoError:  # an unreadable transformer/config.json: reported as that file's problem below
        pass
    layout = detect_layout(root) if root.is_dir() else None
    if layout is None:
        return None, []
    if layout == "official":  # each release that is there (ckpts/ may hold both)
        paths = []
        if (root / OFFICIAL_DIT).parent.parent.is_dir() or not (root / OFFICIAL_I2V_DIT).parent.parent.is_dir():
            dit = [root / OFFICIAL_DIT]
            if not dit[0].exists() and (root / OFFICIAL_DIT_FP8).exists():
                dit = [root / OFFICIAL_DIT_FP8, root / OFFICIAL_DIT_FP8_MAP]
            paths += dit + [root / OFFICIAL_VAE / "config.json", root / OFFICIAL_VAE / "pytorch_model.pt"]
            paths += transformers_folder(root / "text_encoder", None)
        if (root / OFFICIAL_I2V_DIT).parent.parent.is_dir():
            paths += [root / OFFICIAL_I2V_DIT, root / OFFICIAL_I2V_VAE / "config.json", root / OFFICIAL_I2V_VAE / "pytorch_model.pt"]
            paths += transformers_folder(root / OFFICIAL_I2V_TEXT_ENCODER, None)
            paths += [root / OFFICIAL_I2V_TEXT_ENCODER / "preprocessor_config.json"]
        return layout, paths + transformers_folder(root / "text_encoder_2", None)
    paths = []
    for part in ("transformer", "vae"):
        paths += [root / part / "config.json"]
        index = root / part / "diffusion_pytorch_model.safetensors.index.json"
        if index.exists():
            paths += transformers_folder(root / part, root / part)[1:-1]
        else:
            paths += sorted((root / part).glob("*.safetensors")) or [root / part / "diffusion_pytorch_model.safetensors"]
    paths += transformers_folder(root / "text_encoder", root / "tokenizer")
    paths += transformers_folder(root / "text_encoder_2", root / "tokenizer_2")
    if (root / "image_processor").is_dir():  # HunyuanVideo-I2V
        paths += [root / "image_processor" / "preprocessor_config.json"]
    return layout, paths


def check_model_folder(root: Path) -> tuple[str | None, list[FileCheck]]:
    """Every file a model folder must hold, checked alone (`check_file`) and then for what it holds
    (`_content_problems`)."""
    layout, paths = expected_files(root)
    checks = {p: check_file(p) for p in dict.fromkeys(paths)}
    for path, problem in _content_problems(Path(root), checks).items():
        checks[path] = FileCheck(path, checks[path].size, problem)
    return layout, list(checks.values())


def _content_problems(root: Path, checks: dict[Path, FileCheck]) -> dict[Path, str]:
    """What each place's weights hold against what the place needs (`hyvideo.weight_contents`),
    reported on the place's first weight file. A place with a missing or unreadable file is left
    to that file's own problem."""
    places, problems = [], {}
    try:
        if is_v15_folder(root):  # a folder with 1.5 weights is a 1.5 folder
            releases, problems = _v15_releases(root)
        else:
            releases = releases_in(root)
    except HyVideoError:  # a broken shard index: reported as that file's problem
        return {}
    for files in releases:
        if files.family == "hunyuanvideo-1.5":
            for paths, check in _v15_places(files):
                if not any(paths[0] == seen[0] for seen, _ in places):  # one VAE and text stage for all transformers
                    places.append((paths, check))
            continue
        if files.dit_weights:
            places.append(([*files.dit_weights, *([files.dit_config] if files.dit_config else [])], partial(check_dit, files)))
        if files.dit_fp8:
            places.append(([files.dit_fp8], partial(check_fp8_dit, files)))
        places.append(([files.vae_weights, files.vae_config], partial(check_vae, files)))
        for folder, tokenizer, kind in ((files.llm, files.llm_tokenizer, "llava" if files.image_to_video else "llm"),
                                        (files.clip, files.clip_tokenizer, "clip")):
            paths = transformers_folder(folder, tokenizer)
            weights = [p for p in paths if p.suffix in WEIGHT_SUFFIXES]
            places.append((weights + paths, partial(check_text_encoder, weights, kind)))
    for paths, check in places:
        if paths[0] in problems or not all(p in checks and checks[p].ok for p in paths):
            continue
        try:
            check()
        except HyVideoError as error:
            problems[paths[0]] = str(error)
        except (ValueError, KeyError) as error:  # a config.json that builds no model of these shapes
            problems[paths[0]] = f"does not fit its config ({type(error).__name__}: {error})"
    return problems


def _v15_places(files) -> list[tuple[list[Path], partial]]:
    """(the files, the check) of each place one 1.5 transformer reads: DiT, VAE, Qwen2.5-VL, byT5."""
    places = [([*files.dit_weights, files.dit_config], partial(check_v15_dit, files)),
              ([files.vae_weights, files.vae_config], partial(check_v15_vae, files))]
    for paths, kind in ((transformers_folder(files.llm, files.llm_tokenizer), "qwen"),
                        (transformers_folder(files.byt5, files.byt5_tokenizer, BYT5_TOKENIZER), "byt5")):
        weights = [p for p in paths if p.suffix in WEIGHT_SUFFIXES]
        places.append(([*weights, *paths], partial(check_text_encoder, weights, kind)))
    return places


def _v15_releases(root: Path) -> tuple[list, dict[Path, str]]:
    """(`V15ModelFiles` of each 1.5 transformer in the folder whose files are all there, problems):
    one with a missing file is left to that file's own problem; a diffusers folder whose configs
    name no released transformer is a problem of its transformer/config.json."""
    if not official_variants(root):
        try:
            diffusers_variant(root)
        except HyVideoError as error:
            return [], {root / "transformer" / "config.json": str(error)}
    releases = []
    for variant in official_variants(root) or [None]:  # None: the diffusers folder's one
        try:
            releases.append(find_v15_files(root, variant is not None and "_i2v" in variant, variant))
        except HyVideoError:
            continue
    return releases, {}
