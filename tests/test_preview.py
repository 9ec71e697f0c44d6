"""The live preview: the latent-to-RGB projection (hyvideo/preview.py) on fixtures with known
factors, the predicted clean latents it shows, and `generate --preview` writing preview.webp that
`runs`, --json and the progress name."""


import numpy as np
import pytest
import torch
from PIL import Image  # a test dependency through diffusers; the product writes WebP with PyAV

from hyvideo.preview import HUNYUAN_LATENT_RGB_BIAS, HUNYUAN_LATENT_RGB_FACTORS, fit_latent_rgb, latent_rgb
from hyvideo.sampler import flow_sigmas, predicted_clean
from lowvram.generation.preview import PREVIEW_FPS, write_webp
from tests.helpers import TINY_ARGS, as_json, invoke


def test_projection_with_known_factors():
    """Factors that copy channel 0 to red, channel 1 to green, minus channel 2 to blue, bias
    (0.5, 0, 0): each value hand-mapped by clamp((v + 1) / 2, 0, 1) * 255, truncated."""
    factors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]]
    latents = torch.tensor([[-1.0, 0.0], [0.5, 2.0], [0.25, -0.6]]).reshape(1, 3, 1, 1, 2)  # [1, C=3, T=1, h=1, w=2]
    rgb = latent_rgb(latents, factors, (0.5, 0.0, 0.0))
    assert rgb.dtype == torch.uint8 and rgb.shape == (1, 1, 2, 3)
    # pixel 0: r = -1 + 0.5 -> 63.75 -> 63; g = 0.5 -> 191.25 -> 191; b = -0.25 -> 95.6 -> 95
    # pixel 1: r = 0.5 -> 191; g = 2 clamps to 255; b = 0.6 -> 204
    assert rgb[0, 0].tolist() == [[63, 191, 95], [191, 255, 204]]


def test_published_hunyuan_factors():
    """ComfyUI's HunyuanVideo numbers, 16 x 3 plus bias; a latent pixel that is 1 in channel 12
    (the factors' largest row, -0.2315 -0.1920 -0.1355) and 0 elsewhere: rgb = row + bias =
    (-0.2056, -0.2112, -0.2116) -> (101.29, 100.57, 100.52) -> (101, 100, 100); all zeros: the
    bias alone, (0.0259, -0.0192, -0.0761) -> (130.80, 125.05, 117.80) -> (130, 125, 117)."""
    assert len(HUNYUAN_LATENT_RGB_FACTORS) == 16 and all(len(row) == 3 for row in HUNYUAN_LATENT_RGB_FACTORS)
    latents = torch.zeros(1, 16, 1, 1, 2)
    latents[0, 12, 0, 0, 0] = 1.0
    assert latent_rgb(latents)[0, 0].tolist() == [[101, 100, 100], [130, 125, 117]]
    assert HUNYUAN_LATENT_RGB_BIAS == (0.0259, -0.0192, -0.0761)


def test_the_fit_inverts_a_linear_encoder():
    """fit_latent_rgb on an encoder whose latent pixel is a known affine map of the mean colour of
    its 16 x 16 pixels (5 channels, as a VAE has more channels than colours): the fitted projection
    gives every colour back, for images it never saw, to float32 rounding (so within one uint8 level
    of the exact mapping, which truncates). A transposed or shifted fit is off by tens of levels."""
    generator = torch.Generator().manual_seed(3)
    mix, offset = torch.randn(5, 3, generator=generator), torch.randn(5, generator=generator)

    def encode(pixels):  # [N, 3, 1, H, W] -> [N, 5, 1, H/16, W/16]
        pooled = torch.nn.functional.avg_pool3d(pixels, (1, 16, 16))
        return torch.einsum("ck,nkthw->ncthw", mix, pooled) + offset[:, None, None, None]

    factors, bias = fit_latent_rgb(encode, 16)
    assert len(factors) == 5 and all(len(row) == 3 for row in factors) and len(bias) == 3
    colours = torch.rand(1, 3, 2, 3, 4, generator=generator) * 2 - 1  # [1, 3, T=2, h=3, w=4]
    expected = ((colours[0].permute(1, 2, 3, 0) + 1) / 2 * 255).to(torch.uint8)  # [T, h, w, 3]
    pixels = colours.repeat_interleave(16, dim=-2).repeat_interleave(16, dim=-1)
    latents = torch.cat([encode(pixels[:, :, t : t + 1]) for t in range(2)], dim=2)
    assert (latent_rgb(latents, factors, bias).int() - expected.int()).abs().max() <= 1
    assert fit_latent_rgb(encode, 16) == (factors, bias)  # deterministic


def test_predicted_clean_is_x0_for_flow_matching():
    """x_t = (1 - sigma) x0 + sigma n and v = n - x0 (the velocity the Euler step integrates):
    x_t - sigma v gives x0 back (float32 rounding: 1e-6 relative)."""
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 3, 4, 4, generator=generator)
    for sigma in flow_sigmas(10)[:-1]:
        x_t = (1 - sigma) * x0 + sigma * noise
        torch.testing.assert_close(predicted_clean(x_t, noise - x0, sigma), x0, atol=1e-5, rtol=1e-6)


def test_webp_is_an_animated_looping_clip(tmp_path):
    """Frames [T, h, w, 3] in, the same frames out (lossless), looping, at 6 fps."""
    frames = torch.randint(0, 256, (5, 8, 12, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    write_webp(frames, tmp_path / "p.webp")
    with Image.open(tmp_path / "p.webp") as image:
        assert image.n_frames == 5 and image.size == (12, 8) and image.info["loop"] == 0
        for t in range(5):
            image.seek(t)
            assert np.array_equal(np.asarray(image.convert("RGB")), frames[t].numpy())
            assert image.info["duration"] == pytest.approx(1000 / PREVIEW_FPS, abs=1)  # ms, rounded per frame
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically: no temp file left


@pytest.mark.slow
def test_generate_with_preview(tiny_official, tmp_path):
    """The preview is the last step's prediction (at sigma 0 that is the final latents), the run's
    result is unchanged by it, --json and `runs` name it, and the progress prints its path once."""
    runs = tmp_path / "runs"
    plain = as_json(invoke("generate", "a fox", "--model-dir", tiny_official, "--runs-dir", tmp_path / "plain", "--json", *TINY_ARGS))
    shown = invoke("generate", "a fox", "--model-dir", tiny_official, "--runs-dir", runs, "--preview", *TINY_ARGS)
    assert shown.exit_code == 0, shown.output
    [folder] = runs.iterdir()
    preview = folder / "preview.webp"
    assert shown.stderr.count(str(preview)) == 1
    listed = as_json(invoke("runs", "--runs-dir", runs, "--json"))["runs"]
    assert listed[0]["preview"] == str(preview)
    resumed = as_json(invoke("resume", folder.name, "--runs-dir", runs, "--json"))
    assert resumed["preview"] == str(preview) and resumed["settings"]["preview"] is True

    from safetensors.torch import load_file

    final = load_file(resumed["final_latents"])["latents"]
    assert torch.equal(final, load_file(plain["final_latents"])["latents"])
    expected = latent_rgb(final).numpy()  # [T=3, h=6, w=8, 3]
    with Image.open(preview) as image:
        assert image.n_frames == 3 and image.size == (8, 6)
        for t in range(3):
            image.seek(t)
            assert np.array_equal(np.asarray(image.convert("RGB")), expected[t])
