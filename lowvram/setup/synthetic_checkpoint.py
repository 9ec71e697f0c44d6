"""Random-weight HunyuanVideo model folders, full size or tiny, in the official or the diffusers
layout, so the real loading code runs without downloading anything.

- "full": the real release's shapes: the 13B DiT (856 tensors, 12,821,012,544 parameters, 25.6 GB
  in bf16), the 884-16c-hy VAE, a Llama-3-8B text encoder (LlamaForCausalLM, fp16) and CLIP-L's
  text model. For problems that only show at full size (memory maps, zip64, RAM while loading).
- "tiny": the same architecture, small enough for CPU tests and `lowvram demo`.

Both layouts as downloaded (facts §1.13):
  official:  hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt ({"module": state dict}),
             hunyuan-video-t2v-720p/vae/{config.json, pytorch_model.pt}, text_encoder/ and
             text_encoder_2/ (transformers folders, tokenizer included)
  diffusers: transformer/ (config.json, safetensors shards + index, diffusers key names), vae/,
             text_encoder/ (a LlamaModel: no LM head), tokenizer/, text_encoder_2/, tokenizer_2/
Text encoder folders are what `save_pretrained` writes: config.json and model.safetensors, or shards
of at most `shard_bytes` plus model.safetensors.index.json. The tokenizers are the tiny ones at both
sizes (`tiny_tokenizers`): their ids stay far below the real vocabulary sizes.

Every tensor is drawn by its own generator, seeded from (seed, component, tensor name), so any
tensor can be regenerated alone, both layouts hold the same weights (the diffusers DiT tensors are
cut from the official ones), and a folder is written one tensor at a time: memory holds the largest
tensor (Llama's 1 GB embedding at full size), never a model. Init keeps activations O(1) as the
models' own init does: a layer's weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's
nn.Linear / nn.Conv default) in the DiT and VAE, uniform with std 0.02 (transformers'
initializer_range) in the text encoders; norm weights 1 + U(-0.1, 0.1) and norm biases U(-0.1, 0.1)
rather than exactly 1 and 0, so that a norm loaded into the wrong place shows in a test.

Measured here once by hand (2 cores shared with other jobs, 24 GiB RAM, no swap), the full official
folder (42.9 GB): the DiT .pt (25.64 GB) in 175 s, 147 MB/s, writer peak RSS 610 MiB; the VAE,
Llama-3-8B and CLIP-L (17.3 GB) in 76 s, 227 MB/s, peak RSS 1.42 GiB (the 1.05 GB embedding table).
Drawing alone runs at ~340 MB/s and writing alone at ~700 MB/s; together, and with the disk's
write-back, ~150-230 MB/s. Read back in a fresh process (`weight_io.read_torch_file`, meta model +
assign), the 13B DiT is ready in 1.6 s and every tensor touched in 35 s with RssAnon at 147 MiB
(the file's pages, up to 21 GiB RssFile, are page cache the kernel drops as needed).
"""

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaForCausalLM

from hyvideo.checkpoint import OFFICIAL_DIT, OFFICIAL_DIT_FP8, OFFICIAL_DIT_FP8_MAP, OFFICIAL_VAE
from hyvideo.config import DIT_CONFIGS, VAE_CONFIGS, DiTConfig, VAEConfig
from hyvideo.diffusers_keys import diffusers_parts, official_to_diffusers_tensors
from hyvideo.dit import HunyuanVideoDiT
from hyvideo.vae import CausalVAE
from hyvideo.weight_io import Layout, write_safetensors_stream, write_torch_stream

from .tiny_tokenizers import build_tiny_clip_tokenizer, build_tiny_llama3_tokenizer

LAYOUTS = ("official", "diffusers", "official-fp8")  # official-fp8: Tencent's FP8 DiT pair instead of the bf16 .pt
FP8_MAX = 448.0  # largest float8_e4m3fn value

# LlamaConfig / CLIPTextConfig fields other than the hidden size (the DiT's text_states_dim /
# text_states_dim_2) and the token ids (the tokenizer's); without a vocab_size, the tokenizer's length.
LLAMA3_8B = {"vocab_size": 128256, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5}
CLIP_L = {"vocab_size": 49408, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
# 1024 positions cover text_len + crop_start (the video template's prefix is 115 tiny tokens).
TINY_LLM = {"intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 1024}
TINY_CLIP = {"intermediate_size": 80, "num_hidden_layers": 2, "num_attention_heads": 4}


@dataclass(frozen=True)
class SyntheticSize:
    """Sizes and storage dtypes of every part of a synthetic model folder."""

    dit: DiTConfig
    vae: VAEConfig
    llm: dict  # LlamaConfig fields (see LLAMA3_8B)
    clip: dict  # CLIPTextConfig fields (see CLIP_L)
    dit_dtype: torch.dtype
    vae_dtype: torch.dtype
    text_dtype: torch.dtype
    shard_bytes: int  # safetensors shards (diffusers DiT, text encoders) hold at most this many bytes


SIZES = {
    "full": SyntheticSize(DIT_CONFIGS["HYVideo-T/2-cfgdistill"], VAE_CONFIGS["884-16c-hy"], LLAMA3_8B, CLIP_L,
                          torch.bfloat16, torch.float32, torch.float16, shard_bytes=5 * 10**9),  # HF's "5GB"
    # float32 for CPU tests; 2 MB shards split the tiny transformer (2.5 MB) in two, as the real one is split.
    "tiny": SyntheticSize(DIT_CONFIGS["tiny"], VAE_CONFIGS["tiny"], TINY_LLM, TINY_CLIP,
                          torch.float32, torch.float32, torch.float32, shard_bytes=2_000_000),
}


# --- random tensors --------------------------------------------------------------------------------


@dataclass
class RandomWeights:
    """The tensors of one model, each regenerable alone from (seed, component, name)."""

    component: str  # "dit", "vae", "llm", "clip"
    layout: Layout
    seed: int
    std: float | None = None  # layers drawn with this std (transformers' initializer_range) instead of PyTorch's range
    device: str = "cpu"  # where tensors are drawn: "cuda" draws a 30 GB folder in seconds (other values than the CPU's)

    def __post_init__(self):
        shapes = {name: shape for name, _, shape in self.layout}
        self.ranges = {}
        for name, _, shape in self.layout:
            module, _, leaf = name.rpartition(".")
            weight = shapes.get(f"{module}.weight", ())
            if len(weight) >= 2:  # a Linear / Conv / Embedding weight or its bias
                bound = math.sqrt(3) * self.std if self.std else 1 / math.sqrt(math.prod(weight[1:]))
                self.ranges[name] = (-bound, bound)
            else:  # a norm's scale or shift
                self.ranges[name] = (0.9, 1.1) if leaf == "weight" else (-0.1, 0.1)

    def tensor(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        digest = hashlib.sha256(f"{self.seed}/{self.component}/{name}".encode()).digest()
        generator = torch.Generator(self.device).manual_seed(int.from_bytes(digest[:8], "little"))
        return torch.empty(shape, dtype=dtype, device=self.device).uniform_(*self.ranges[name], generator=generator)

    def tensors(self, layout: Layout | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name, dtype, shape in layout or self.layout:
            yield name, self.tensor(name, dtype, shape)


def meta_layout(make_model: Callable[[], torch.nn.Module], dtype: torch.dtype) -> Layout:
    """A model's state dict as (name, dtype, shape), built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        state = make_model().state_dict()
    return [(name, dtype, tuple(t.shape)) for name, t in state.items()]


# --- files -----------------------------------------------------------------------------------------


@dataclass
class WeightFile:
    """One weight file of a folder: where it goes, its tensors in file order, and how to make them."""

    path: str  # relative to the model folder; ".pt" = torch.save format, else safetensors
    layout: Layout
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    under: str | None = None  # .pt: the state dict is stored under this key

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in self.layout)


@dataclass
class FolderPlan:
    """Everything a synthetic model folder holds, known before anything is written."""

    weights: list[WeightFile]
    json_files: dict[str, dict]  # relative path -> content
    tokenizers: dict[str, object]  # relative folder -> tokenizer to save there


def sharded(folder: str, prefix: str, layout: Layout, tensors: Callable[[Layout], Iterator],
            shard_bytes: int) -> tuple[list[WeightFile], dict[str, dict]]:
    """Hugging Face sharding: tensors in order, a new shard when the next tensor would pass
    `shard_bytes`; one shard is `<prefix>.safetensors`, more are `<prefix>-0000i-of-0000n.safetensors`
    plus `<prefix>.safetensors.index.json` (returned as a JSON file)."""
    shards, size = [[]], 0
    for entry in layout:
        nbytes = math.prod(entry[2]) * entry[1].itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    if len(shards) == 1:
        return [WeightFile(f"{folder}/{prefix}.safetensors", layout, lambda: tensors(layout))], {}
    files = [WeightFile(f"{folder}/{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors", shard,
                        lambda shard=shard: tensors(shard)) for i, shard in enumerate(shards)]
    index = {"metadata": {"total_size": sum(f.nbytes for f in files)},
             "weight_map": {name: Path(f.path).name for f in files for name, _, _ in f.layout}}
    return files, {f"{folder}/{prefix}.safetensors.index.json": index}


def official_vae_config(config: VAEConfig) -> dict:
    """`vae/config.json` as Tencent ships it (diffusers-style fields, official class name)."""
    levels = len(config.block_out_channels)
    return {
        "_class_name": "AutoencoderKLCausal3D", **config.to_dict(),
        "act_fn": "silu", "sample_size": 256, "sample_tsize": 64,
        "down_block_types": ["DownEncoderBlockCausal3D"] * levels,
        "up_block_types": ["UpDecoderBlockCausal3D"] * levels,
    }


def diffusers_vae_config(config: VAEConfig) -> dict:
    levels = len(config.block_out_channels)
    values = config.to_dict()
    values["temporal_compression_ratio"] = values.pop("time_compression_ratio")
    return {
        "_class_name": "AutoencoderKLHunyuanVideo", **values, "act_fn": "silu",
        "down_block_types": ["HunyuanVideoDownBlock3D"] * levels,
        "up_block_types": ["HunyuanVideoUpBlock3D"] * levels,
    }


def dit_files(layout: str, size: SyntheticSize, seed: int, device: str = "cpu") -> tuple[list[WeightFile], dict[str, dict]]:
    """The DiT: one .pt of official tensors, or diffusers' shards of the same tensors cut and renamed."""
    weights = RandomWeights("dit", meta_layout(lambda: HunyuanVideoDiT(size.dit), size.dit_dtype), seed, device=device)
    if layout == "official":
        return [WeightFile(OFFICIAL_DIT, weights.layout, weights.tensors, under="module")], {}
    if layout == "official-fp8":
        return tencent_fp8_files(weights), {}
    hidden = size.dit.hidden_size
    diffusers_layout = [(name, dtype, tuple(piece.shape)) for key, dtype, shape in weights.layout
                        for name, piece in official_to_diffusers_tensors(key, torch.empty(shape, device="meta"), hidden)]

    def tensors(shard: Layout) -> Iterator[tuple[str, torch.Tensor]]:
        """The shard's diffusers tensors, cut from the official tensors they belong to."""
        names = {name for name, _, _ in shard}
        for key, dtype, shape in weights.layout:
            if not names.isdisjoint(diffusers_parts(key)):
                pieces = official_to_diffusers_tensors(key, weights.tensor(key, dtype, shape), hidden)
                yield from ((name, piece) for name, piece in pieces if name in names)

    files, index = sharded("transformer", "diffusion_pytorch_model", diffusers_layout, tensors, size.shard_bytes)
    return files, {"transformer/config.json": size.dit.to_diffusers(), **index}


def tencent_fp8_files(weights: RandomWeights) -> list[WeightFile]:
    """Tencent's FP8 pair (facts §1.14): every 2-D weight inside the blocks as float8_e4m3fn with one
    float32 scale per layer in the map file (W = W_fp8 * scale), everything else as in the bf16 file.
    The fp8 values are the bf16 draw divided by its layer's range / 448, as Tencent's amax rule gives."""
    quantized = {name for name, _, shape in weights.layout
                 if name.startswith(("double_blocks.", "single_blocks.")) and name.endswith(".weight") and len(shape) == 2}
    layout = [(name, torch.float8_e4m3fn if name in quantized else dtype, shape) for name, dtype, shape in weights.layout]
    scales = {name: weights.ranges[name][1] / FP8_MAX for name in quantized}
    scale_layout = [(name.removesuffix(".weight"), torch.float32, ()) for name, _, _ in weights.layout if name in quantized]

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, dtype, shape in weights.layout:
            tensor = weights.tensor(name, dtype, shape)
            yield name, (tensor.float() / scales[name]).to(torch.float8_e4m3fn) if name in quantized else tensor

    def scale_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for module, _, _ in scale_layout:
            yield module, torch.tensor(scales[module + ".weight"], dtype=torch.float32)

    return [WeightFile(OFFICIAL_DIT_FP8, layout, tensors, under="module"), WeightFile(OFFICIAL_DIT_FP8_MAP, scale_layout, scale_tensors)]


def vae_files(layout: str, size: SyntheticSize, seed: int, device: str = "cpu") -> tuple[list[WeightFile], dict[str, dict]]:
    """The VAE is one file in both layouts (246 M parameters: under any shard limit)."""
    weights = RandomWeights("vae", meta_layout(lambda: CausalVAE(size.vae), size.vae_dtype), seed, device=device)
    if layout.startswith("official"):
        file = WeightFile(f"{OFFICIAL_VAE}/pytorch_model.pt", weights.layout, weights.tensors)
        return [file], {f"{OFFICIAL_VAE}/config.json": official_vae_config(size.vae)}
    file = WeightFile("vae/diffusion_pytorch_model.safetensors", weights.layout, weights.tensors)
    return [file], {"vae/config.json": diffusers_vae_config(size.vae)}


def llm_config(size: SyntheticSize, tokenizer, **fields) -> LlamaConfig:
    values = {"hidden_size": size.dit.text_states_dim, "vocab_size": len(tokenizer), **size.llm, **fields}
    return LlamaConfig(**values, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
                       architectures=["LlamaForCausalLM"])


def clip_config(size: SyntheticSize, tokenizer, **fields) -> CLIPTextConfig:
    """77 positions as CLIP-L; the pooled output (what HunyuanVideo uses) is taken at the first EOS."""
    values = {"hidden_size": size.dit.text_states_dim_2, "vocab_size": len(tokenizer), **size.clip, **fields}
    return CLIPTextConfig(**values, projection_dim=values["hidden_size"], max_position_embeddings=77,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, architectures=["CLIPTextModel"])


# kind: (tokenizer, config, the model class the official preprocessing saves); kind also seeds the weights
TEXT_ENCODERS = {
    "llm": (build_tiny_llama3_tokenizer, llm_config, LlamaForCausalLM),
    "clip": (build_tiny_clip_tokenizer, clip_config, CLIPTextModel),
}


def text_encoder_files(folder: str, kind: str, size: SyntheticSize, seed: int, headless: bool = False,
                       device: str = "cpu", **fields) -> tuple[list[WeightFile], dict[str, dict], object]:
    """A transformers folder as `save_pretrained` writes it: config.json and safetensors (sharded
    above `shard_bytes`), and the tokenizer to save with it. The official preprocessing saves the
    Llava language model, a LlamaForCausalLM; HunyuanVideo loads it with AutoModel, which drops the
    LM head. `headless` (the diffusers layout's LLM): a LlamaModel, i.e. the same tensors less the
    LM head and without the "model." prefix, drawn under the causal LM's names so that both layouts
    hold the same weights. `fields` override config fields."""
    make_tokenizer, make_config, model_class = TEXT_ENCODERS[kind]
    tokenizer = make_tokenizer()
    config = make_config(size, tokenizer, **fields)
    weights = RandomWeights(kind, meta_layout(lambda: model_class(config), size.text_dtype), seed, config.initializer_range, device)
    layout, tensors = weights.layout, weights.tensors
    if headless:
        config.architectures = ["LlamaModel"]
        layout = [(name.removeprefix("model."), dtype, shape) for name, dtype, shape in layout if name.startswith("model.")]

        def headless_tensors(shard: Layout) -> Iterator[tuple[str, torch.Tensor]]:
            return ((name, weights.tensor(f"model.{name}", dtype, shape)) for name, dtype, shape in shard)

        tensors = headless_tensors
    files, index = sharded(folder, "model", layout, tensors, size.shard_bytes)
    return files, {f"{folder}/config.json": json.loads(config.to_json_string()), **index}, tokenizer


def _size(size: "str | SyntheticSize") -> SyntheticSize:
    return SIZES[size] if isinstance(size, str) else size


def plan_folder(layout: str, size: "str | SyntheticSize" = "tiny", seed: int = 0, device: str = "cpu") -> FolderPlan:
    """What `write_synthetic_checkpoint` writes, computed without allocating any weights; the
    tensors are drawn on `device` when written (moved to the host one at a time)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    size = _size(size)
    plan = FolderPlan([], {}, {})
    parts = [dit_files(layout, size, seed, device), vae_files(layout, size, seed, device)]
    for kind, model_folder, tokenizer_folder in (("llm", "text_encoder", "tokenizer"), ("clip", "text_encoder_2", "tokenizer_2")):
        headless = kind == "llm" and layout == "diffusers"  # diffusers saves the LLM as a LlamaModel
        files, json_files, tokenizer = text_encoder_files(model_folder, kind, size, seed, headless, device)
        parts.append((files, json_files))
        plan.tokenizers[model_folder if layout.startswith("official") else tokenizer_folder] = tokenizer
    for files, json_files in parts:
        plan.weights += files
        plan.json_files |= json_files
    return plan


def write_plan(root: Path, plan: FolderPlan, on_progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a planned folder, one tensor at a time; `on_progress(bytes done, bytes in all)` after
    each tensor."""
    root = Path(root)
    total, done = sum(f.nbytes for f in plan.weights), 0
    for relative, values in plan.json_files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(json.dumps(values, indent=2) + "\n")
    for relative, tokenizer in plan.tokenizers.items():
        tokenizer.save_pretrained(root / relative)

    def counted(tensors):
        nonlocal done
        for name, tensor in tensors:
            yield name, tensor.cpu()  # drawn on the GPU: copied to the host one tensor at a time
            done += tensor.nbytes
            if on_progress:
                on_progress(done, total)

    for file in plan.weights:
        path = root / file.path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".pt":
            write_torch_stream(path, file.layout, counted(file.tensors()), under=file.under, what="synthetic weights")
        else:
            write_safetensors_stream(path, file.layout, counted(file.tensors()), metadata={"format": "pt"},
                                     what="synthetic weights")
    return root


def write_synthetic_checkpoint(root: Path, layout: str = "official", size: "str | SyntheticSize" = "tiny",
                               seed: int = 0, on_progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a complete random-weight model folder into `root` and return it."""
    return write_plan(root, plan_folder(layout, size, seed), on_progress)


def write_text_encoder(folder: Path, kind: str, size: "str | SyntheticSize" = "tiny", seed: int = 0, **fields) -> Path:
    """One text encoder folder alone, model and tokenizer, as the official layout's text_encoder/
    ("llm") or text_encoder_2/ ("clip"); `fields` override config fields (e.g. hidden_size)."""
    files, json_files, tokenizer = text_encoder_files(".", kind, _size(size), seed, **fields)
    return write_plan(folder, FolderPlan(files, json_files, {".": tokenizer}))
