"""The I2V conditioning image: reading, size bucket, resize + center crop, pixels (hyvideo/image.py)."""

import numpy as np
import pytest
import torch
from PIL import Image

from hyvideo.errors import HyVideoError
from hyvideo.image import (
    bucket_sizes,
    closest_bucket,
    i2v_bucket,
    image_to_pixels,
    open_image,
    resize_center_crop,
)


def test_bucket_lists_follow_the_official_rule():
    # generate_crop_size_list(960 | 720 | 480, 32): checked once against the official function on
    # 20,000 random image sizes per tier; these values pin it down here.
    assert len(bucket_sizes(960)) == 91 and bucket_sizes(960)[:2] == [(1920, 480), (1888, 480)]
    assert len(bucket_sizes(720)) == 67 and len(bucket_sizes(480)) == 43
    for base in (960, 720, 480):
        sizes = bucket_sizes(base)
        assert all(h % 32 == 0 and w % 32 == 0 and (h // 32) * (w // 32) <= round((base / 32) ** 2) for h, w in sizes)
        assert all(max(h, w) / min(h, w) <= 4 for h, w in sizes)


@pytest.mark.parametrize("size,resolution,bucket", [
    ((1280, 720), "720p", (704, 1248)),  # 16:9 landscape: a 720p run is 704x1248, not 720x1280
    ((720, 1280), "720p", (1248, 704)),
    ((1000, 1000), "720p", (960, 960)),
    ((1280, 720), "540p", (544, 928)),
    ((1000, 1000), "540p", (704, 704)),
    ((1280, 720), "360p", (352, 608)),
])
def test_i2v_bucket(size, resolution, bucket):
    assert i2v_bucket(size, resolution) == bucket


def test_closest_bucket_sides():
    buckets = [(64, 128), (96, 96), (128, 64)]
    assert closest_bucket(100, 100, buckets) == (96, 96)  # aspect 1: buckets with h/w <= 1
    assert closest_bucket(100, 101, buckets) == (96, 96)  # wider than square: strictly taller buckets only
    assert closest_bucket(100, 300, buckets) == (64, 128)
    assert closest_bucket(300, 100, buckets) == (128, 64)
    with pytest.raises(HyVideoError, match="720p"):
        i2v_bucket((100, 100), "1080p")


def gradient(width, height):
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1).astype(np.uint8))


def test_resize_center_crop():
    image = gradient(64, 48)
    assert np.array_equal(np.asarray(resize_center_crop(image, (48, 64))), np.asarray(image))  # bucket size: unchanged
    # Same aspect, twice the bucket: PIL bilinear (antialiased) resize, nothing cropped.
    big = gradient(128, 96)
    assert np.array_equal(np.asarray(resize_center_crop(big, (48, 64))), np.asarray(big.resize((64, 48), Image.BILINEAR)))
    # Wider than the bucket: shorter side to min(bucket) = 32, then the centre 32x32;
    # left = round((45 - 32) / 2) = round(6.5) = 6 (Python's round, as torchvision).
    wide = gradient(90, 64)
    resized = wide.resize((45, 32), Image.BILINEAR)  # int(32 * 90 / 64) = 45
    assert np.array_equal(np.asarray(resize_center_crop(wide, (32, 32))), np.asarray(resized)[:, 6:38])


def test_center_crop_pads_with_black_when_the_image_is_smaller():
    """A square image into a 48x64 bucket: shorter side to 48 -> 48x48, then padded to 64 wide,
    8 black columns each side (torchvision CenterCrop pads, left/top take the smaller half)."""
    image = Image.new("RGB", (10, 10), (200, 100, 50))
    out = np.asarray(resize_center_crop(image, (48, 64)))
    assert out.shape == (48, 64, 3)
    assert (out[:, :8] == 0).all() and (out[:, -8:] == 0).all() and (out[:, 8:56] == (200, 100, 50)).all()
    odd = np.asarray(resize_center_crop(Image.new("RGB", (10, 10), (255, 255, 255)), (10, 13)))
    assert (odd[:, :1] == 0).all() and (odd[:, 1:11] == 255).all() and (odd[:, 11:] == 0).all()  # 1 left, 2 right


def test_pixels_are_a_one_frame_video_in_minus_one_to_one():
    image = Image.fromarray(np.array([[[0, 255, 51]]], dtype=np.uint8))
    pixels = image_to_pixels(image)
    assert pixels.shape == (1, 3, 1, 1, 1) and pixels.dtype == torch.float32
    assert pixels.flatten().tolist() == [-1.0, 1.0, pytest.approx(51 / 255 * 2 - 1)]


@pytest.mark.parametrize("mode,fmt,suffix", [("RGBA", "PNG", ".png"), ("L", "PNG", ".png"), ("P", "PNG", ".png"),
                                             ("RGB", "JPEG", ".jpg"), ("RGBA", "WEBP", ".webp"), ("LA", "PNG", ".png")])
def test_open_image_gives_rgb(tmp_path, mode, fmt, suffix):
    path = tmp_path / f"image{suffix}"
    source = gradient(20, 12).convert(mode)
    source.save(path, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    image = open_image(path)
    assert image.mode == "RGB" and image.size == (20, 12)
    if mode in ("RGBA", "L", "P", "LA") and fmt != "JPEG":  # lossless: the colour channels are kept as they are
        assert np.array_equal(np.asarray(image), np.asarray(source.convert("RGB")))


def test_alpha_is_dropped_not_composited(tmp_path):
    """Official `.convert("RGB")`: a fully transparent red pixel stays red."""
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert (np.asarray(open_image(tmp_path / "clear.png")) == (255, 0, 0)).all()


def test_bad_images_are_one_line_errors(tmp_path):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    (tmp_path / "text.jpg").write_text("not an image")
    Image.new("RGB", (4, 4)).save(tmp_path / "image.bmp")
    Image.new("RGB", (4, 4)).save(tmp_path / "truncated.png")
    data = (tmp_path / "truncated.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    cases = {"missing.png": "not found", "corrupt.png": "cannot read", "text.jpg": "cannot read",
             "image.bmp": "BMP image; use PNG, JPEG or WebP", "truncated.png": "cannot read"}
    for name, message in cases.items():
        with pytest.raises(HyVideoError, match=message) as error:
            open_image(tmp_path / name)
        assert "\n" not in str(error.value)


def test_large_image_is_resized_on_the_host(tmp_path):
    """24 megapixels: read and cropped to its 720p bucket on the CPU (no tensor of its full size)."""
    Image.new("RGB", (6000, 4000), (10, 20, 30)).save(tmp_path / "large.png")
    image = open_image(tmp_path / "large.png")
    bucket = i2v_bucket(image.size, "720p")
    pixels = image_to_pixels(resize_center_crop(image, bucket))
    assert bucket == (768, 1152) and pixels.shape == (1, 3, 1, 768, 1152)
