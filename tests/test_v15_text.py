"""HunyuanVideo-1.5 prompt and image encoding against diffusers' HunyuanVideo15Pipeline and
HunyuanVideo15ImageToVideoPipeline on tiny random weights (tests/tiny_v15_text.py), fp32: the
embeddings, both folder layouts, and end to end from (prompt[, image file]) to the final latents."""

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("diffusers")  # the oracle: `pytest -m cuda` collects without it (tests/test_cuda_collection.py)
from diffusers import (
    AutoencoderKLHunyuanVideo15, ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, HunyuanVideo15ImageToVideoPipeline,
    HunyuanVideo15Pipeline, HunyuanVideo15Transformer3DModel,
)
from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor
from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts

from hyvideo.errors import HyVideoError
from hyvideo.image import bucket_sizes, closest_bucket, open_image
from hyvideo.v15_config import V15_DIT_CONFIGS, V15_VAE_CONFIGS
from hyvideo.v15_dit import HunyuanVideo15DiT
from hyvideo.v15_image import V15ImageEncoder, encode_image, resize_crop, v15_bucket
from hyvideo.v15_keys import ours_to_diffusers, vae_ours_to_diffusers
from hyvideo.v15_pipeline import denoise
from hyvideo.v15_text import DIFFUSERS_CROP_START, V15TextEncoder, find_v15_text_files, glyph_text
from hyvideo.v15_vae import HunyuanVideo15VAE
from tests.helpers import randomize_
from tests.test_v15_pipeline import same_schedule
from tests.tiny_v15_text import write_diffusers_encoders, write_official_encoders

TINY = V15_DIT_CONFIGS["tiny"]
# The same transformers modules run on the same tokens in both: embeddings agree to float32 rounding
# (observed 0); end to end as tests/test_v15_pipeline.py (CFG amplifies ~3e-7 per forward, observed
# below 2e-6). A crop off by one token or another glyph text moves the states by O(1).
EMBED_TOL = 1e-6
TOL = 1e-5
PROMPT = 'A shop window with a neon sign that reads "OPEN LATE", and a “Café” board, realistic'
NEGATIVE = "blurry, low quality"


def rel_err(ours, expected) -> float:
    return ((ours.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return (write_diffusers_encoders(tmp_path_factory.mktemp("v15-diffusers")),
            write_official_encoders(tmp_path_factory.mktemp("v15-official")))


@pytest.fixture(scope="module")
def encoder(folders):
    return V15TextEncoder.from_files(find_v15_text_files(folders[0], "diffusers"), dtype=torch.float32)


def diffusers_pipe(encoder, transformer=None, guidance_scale=6.0):
    return HunyuanVideo15Pipeline(
        text_encoder=encoder.llm, tokenizer=encoder.llm_tokenizer, transformer=transformer,
        vae=AutoencoderKLHunyuanVideo15(**V15_VAE_CONFIGS["tiny"].to_diffusers()),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), text_encoder_2=encoder.byt5, tokenizer_2=encoder.byt5_tokenizer,
        guider=ClassifierFreeGuidance(guidance_scale=guidance_scale),
    )


@pytest.mark.parametrize("prompt", [PROMPT, 'x "a" y "b" z "a"', 'empty quotes "" here', "no quotes", '"unclosed', ""])
def test_glyph_text_matches_diffusers(prompt):
    assert glyph_text(prompt) == extract_glyph_texts(prompt)


def test_glyph_text_format():
    assert glyph_text('sign "A" and “B” and "A"') == 'Text "A". Text "B". '
    assert glyph_text("nothing quoted") is None


def test_crop_start_is_diffusers_constant(encoder):
    """The tiny tokenizer reproduces the real template prefix length, so diffusers' hard-coded
    crop is right for it too and the parity below checks our computed crop."""
    assert encoder.crop_start == DIFFUSERS_CROP_START == diffusers_pipe(encoder).prompt_template_encode_start_idx


@pytest.mark.parametrize("prompt", [PROMPT, "a cat walks on the grass", ""])
def test_prompt_embeddings_match_diffusers(encoder, prompt):
    ours = encoder.encode_one(prompt)
    with torch.no_grad():
        states, mask, byt5_states, byt5_mask = diffusers_pipe(encoder).encode_prompt(prompt, device="cpu", dtype=torch.float32)
    assert ours.text_states.shape == (1, 1000, TINY.text_states_dim) and ours.byt5_states.shape == (1, 256, TINY.byt5_states_dim)
    assert torch.equal(ours.text_mask, mask.long()) and torch.equal(ours.byt5_mask, byt5_mask.long())
    assert rel_err(ours.text_states, states) <= EMBED_TOL
    assert rel_err(ours.byt5_states, byt5_states) <= EMBED_TOL if byt5_mask.any() else not ours.byt5_states.any()


def test_negative_defaults_to_empty_prompt(encoder, monkeypatch):
    """encode = (encode_one(prompt), encode_one(negative or "")), as diffusers' pipeline encodes
    `negative_prompt=None` (the "" embeddings themselves: test_prompt_embeddings_match_diffusers)."""
    encoded = []
    monkeypatch.setattr(encoder, "encode_one", lambda prompt: encoded.append(prompt) or prompt)
    assert encoder.encode(PROMPT) == (PROMPT, "") and encoder.encode(PROMPT, NEGATIVE) == (PROMPT, NEGATIVE)
    assert encoded == [PROMPT, "", PROMPT, NEGATIVE]
    with pytest.raises(HyVideoError, match="empty"):
        encoder.encode("  ")


def test_truncated(encoder):
    assert encoder.truncated(PROMPT) == []
    long_quote = 'a sign reading "' + "x" * 300 + '"'
    assert encoder.truncated(long_quote) == ["byT5 glyph text (256 bytes)"]
    assert encoder.truncated("a cat " * 600) == ["Qwen2.5-VL (1000 tokens)"]


def test_wrong_crop_or_glyph_text_would_fail(encoder, monkeypatch):
    """The parity above is sensitive to both facts: one token more or less cropped, or byT5 given
    the whole prompt instead of its quoted text, moves the embeddings far beyond EMBED_TOL."""
    with torch.no_grad():
        states, _, byt5_states, _ = diffusers_pipe(encoder).encode_prompt(PROMPT, device="cpu", dtype=torch.float32)
    for crop in (DIFFUSERS_CROP_START - 1, DIFFUSERS_CROP_START + 1):
        monkeypatch.setattr(encoder, "crop_start", crop)
        assert rel_err(encoder.qwen_states(PROMPT)[0], states) > 0.1
    monkeypatch.undo()
    monkeypatch.setattr("hyvideo.v15_text.glyph_text", lambda prompt: prompt)
    assert rel_err(encoder.byt5_states(PROMPT)[0], byt5_states) > 0.1


@pytest.mark.slow  # ~5 s: loads both layouts
def test_official_layout_equals_diffusers_layout(folders, encoder):
    """Tencent's folders (whole Qwen2.5-VL, byt5-small + Glyph-SDXL-v2 checkpoint with the added
    tokens, FLUX Redux's SigLIP) give the same embeddings as diffusers' converted ones."""
    official = V15TextEncoder.from_files(find_v15_text_files(folders[1], "official"), dtype=torch.float32)
    prompt = PROMPT + ' with "<color-1>" in it'  # an added glyph token: one id in both tokenizers
    for ours, theirs in zip(official.encode(prompt, NEGATIVE), encoder.encode(prompt, NEGATIVE)):
        for name in ("text_states", "text_mask", "byt5_states", "byt5_mask"):
            assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    image = PIL.Image.new("RGB", (40, 30), (200, 30, 90))
    vision = [V15ImageEncoder.from_files(find_v15_text_files(root, layout), dtype=torch.float32).vision_states(image)
              for root, layout in zip(folders, ("diffusers", "official"))]
    assert torch.equal(*vision)


def test_glyph_checkpoint_must_fit(folders, tmp_path):
    """A Glyph-SDXL-v2 checkpoint without one of the encoder's weights (here the embedding with the
    added tokens) is refused, not filled with random weights; a bare state dict loads as the wrapped one."""
    import shutil

    from hyvideo.v15_text import GLYPH_CHECKPOINT, GLYPH_CHECKPOINT_PREFIX, load_byt5

    root = tmp_path / "ckpts"
    shutil.copytree(folders[1] / "text_encoder", root / "text_encoder")
    checkpoint = root / "text_encoder" / "Glyph-SDXL-v2" / GLYPH_CHECKPOINT
    state = {k.removeprefix(GLYPH_CHECKPOINT_PREFIX): v for k, v in torch.load(checkpoint)["state_dict"].items()}
    torch.save(state, checkpoint)
    files = find_v15_text_files(root, "official")
    expected = load_byt5(find_v15_text_files(folders[0], "diffusers"))[0].state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in load_byt5(files)[0].state_dict().items())
    del state["embed_tokens.weight"]
    torch.save(state, checkpoint)
    with pytest.raises(HyVideoError, match="embed_tokens"):
        load_byt5(files)


def test_missing_folders_are_named(tmp_path):
    with pytest.raises(HyVideoError, match="Glyph-SDXL-v2"):
        (tmp_path / "text_encoder" / "llm").mkdir(parents=True)
        find_v15_text_files(tmp_path, "official")


def test_bucket_matches_diffusers():
    """Over a grid of image sizes at 480p (each size rebuilds the bucket list: 720p's is 4x longer,
    checked on the exact 16:9 sizes only), with exact 16:9 ones where the 13B rule (a strictly
    taller bucket for a wide image) would pick another bucket."""
    processor = HunyuanVideo15ImageProcessor()
    sixteen_nine = [(1280, 720), (1920, 1080), (720, 1280), (512, 512)]
    grid = [(w, h) for w in range(40, 2000, 211) for h in range(40, 2000, 197)]
    for target, sizes in ((640, sixteen_nine + grid), (960, sixteen_nine)):
        for width, height in sizes:
            assert v15_bucket((width, height), target) == tuple(processor.calculate_default_height_width(height, width, target))
    assert v15_bucket((1280, 720), 960) == (720, 1280) != closest_bucket(720, 1280, bucket_sizes(960, 16))


@pytest.mark.parametrize("size,bucket", [((70, 45), (48, 64)), ((45, 70), (64, 48)), ((33, 33), (48, 48)), ((300, 97), (32, 96))])
def test_resize_crop_matches_diffusers(size, bucket):
    image = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    expected = HunyuanVideo15ImageProcessor(do_resize=False).resize(image, height=bucket[0], width=bucket[1], resize_mode="crop")
    assert np.array_equal(np.asarray(resize_crop(image, bucket)), np.asarray(expected))


def tiny_dit_and_transformer(seed: int, target_size: int | None = None):
    dit = HunyuanVideo15DiT(TINY).eval()
    randomize_(dit, seed=seed)
    extra = {} if target_size is None else {"target_size": target_size}
    transformer = HunyuanVideo15Transformer3DModel(**TINY.to_diffusers(), **extra).eval()
    transformer.load_state_dict(ours_to_diffusers(dit.state_dict()), strict=True)
    return dit, transformer


@pytest.mark.slow  # 1000 + 256 text tokens through the tiny DiT, 3 steps x 2 forwards, twice
def test_t2v_end_to_end_matches_diffusers(encoder):
    dit, transformer = tiny_dit_and_transformer(seed=11)
    positive, negative = encoder.encode(PROMPT, NEGATIVE)
    noise = torch.randn(1, TINY.latent_channels, 3, 2, 3, generator=torch.Generator().manual_seed(12))
    ours = denoise(dit, positive, negative, noise, steps=3, flow_shift=5.0, guidance_scale=6.0, device="cpu")
    with torch.no_grad():
        expected = diffusers_pipe(encoder, transformer)(
            prompt=PROMPT, negative_prompt=NEGATIVE, height=32, width=48, num_frames=9, num_inference_steps=3,
            latents=noise.clone(), output_type="latent", return_dict=False, **same_schedule(3, 5.0),
        )[0]
    assert rel_err(ours, expected) <= TOL


@pytest.mark.slow
def test_i2v_end_to_end_matches_diffusers(folders, encoder, tmp_path):
    """From an image file: bucket, crop, VAE latents and SigLIP states, then the loop."""
    target = 64  # tiny bucket base (the real ones: 640 for 480p, 960 for 720p)
    dit, transformer = tiny_dit_and_transformer(seed=13, target_size=target)
    vae = HunyuanVideo15VAE(V15_VAE_CONFIGS["tiny"]).eval()
    randomize_(vae, seed=14)
    reference_vae = AutoencoderKLHunyuanVideo15(**V15_VAE_CONFIGS["tiny"].to_diffusers()).eval()
    reference_vae.load_state_dict(vae_ours_to_diffusers(vae.state_dict()), strict=True)
    vision = V15ImageEncoder.from_files(find_v15_text_files(folders[0], "diffusers"), dtype=torch.float32)
    pixels = np.random.default_rng(15).integers(0, 256, (45, 70, 3), dtype=np.uint8)  # wider than tall, off-bucket
    path = tmp_path / "first.png"
    PIL.Image.fromarray(pixels).save(path)

    image = open_image(path)
    with torch.no_grad():
        condition, (height, width) = encode_image(image, target, vision, vae.encode, vae.config.scaling_factor)
    assert (height, width) == v15_bucket(image.size, target) and condition.latents.shape[-2:] == (height // 16, width // 16)
    positive, negative = encoder.encode(PROMPT, NEGATIVE)
    noise = torch.randn(1, TINY.latent_channels, 3, height // 16, width // 16, generator=torch.Generator().manual_seed(16))
    ours = denoise(dit, positive, negative, noise, steps=3, flow_shift=7.0, guidance_scale=6.0, device="cpu", image=condition)
    pipe = HunyuanVideo15ImageToVideoPipeline(
        text_encoder=encoder.llm, tokenizer=encoder.llm_tokenizer, transformer=transformer, vae=reference_vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), text_encoder_2=encoder.byt5, tokenizer_2=encoder.byt5_tokenizer,
        guider=ClassifierFreeGuidance(guidance_scale=6.0), image_encoder=vision.vision, feature_extractor=vision.processor,
    )
    with torch.no_grad():
        expected = pipe(
            image=PIL.Image.open(path), prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=9, num_inference_steps=3,
            latents=noise.clone(), output_type="latent", return_dict=False, **same_schedule(3, 7.0),
        )[0]
    assert rel_err(ours, expected) <= TOL
