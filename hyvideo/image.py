"""The conditioning image of image-to-video: read it, pick its size bucket, resize and center-crop
it to the bucket, as Tencent's HunyuanVideo-I2V sampler does (`hyvideo/inference.py::predict`).

Official rule, for a resolution tier (720p / 540p / 360p -> bucket base size 960 / 720 / 480):
  buckets  = `generate_crop_size_list(base, 32)`: every (h, w), multiples of 32, with
             (h/32)(w/32) <= (base/32)^2 and aspect at most 4:1, tallest first.
  bucket   = `get_closest_ratio`: among buckets no taller than the image (image aspect h/w >= 1)
             or strictly taller than it (aspect < 1), the one whose h/w is closest.
  pixels   = torchvision Resize(min(bucket)) (shorter side to min(bucket), bilinear, antialiased),
             CenterCrop(bucket) (zero-padded if the resized image is smaller), then / 255 * 2 - 1.
The generated video has the bucket's size; the same RGB image (uncropped) also goes to LLaVA's
CLIP image processor (see text_encoder.py).

Pure functions of PIL images and sizes, no model: a bad file fails here, before anything loads.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import HyVideoError

FORMATS = ("PNG", "JPEG", "WEBP")
BUCKET_BASE_SIZE = {"720p": 960, "540p": 720, "360p": 480}  # official `--i2v-resolution`
BUCKET_STEP = 32


def open_image(path: str | Path) -> Image.Image:
    """An RGB image from a PNG, JPEG or WebP file. Alpha is dropped and grayscale or palette images
    become RGB, as the official `Image.open(path).convert("RGB")`. A large image is decoded whole
    here on the host (PIL refuses above ~179 megapixels: a one-line error) and only its bucket-sized
    crop goes further, so its size never reaches the GPU."""
    path = Path(path)
    if not path.is_file():
        raise HyVideoError(f"image not found: {path}")
    try:
        image = Image.open(path)
        if image.format not in FORMATS:
            raise HyVideoError(f"{path} is a {image.format} image; use PNG, JPEG or WebP")
        return image.convert("RGB")
    except Image.DecompressionBombError as error:
        raise HyVideoError(f"{path} is too large to decode safely ({error}); downscale it first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise HyVideoError(f"cannot read the image {path}: {reason} (a PNG, JPEG or WebP file is needed)") from None


def bucket_sizes(base_size: int, step: int = BUCKET_STEP, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """The official `generate_crop_size_list`: (h, w) pairs, tallest first."""
    patches = round((base_size / step) ** 2)
    sizes = []
    tall, wide = patches, 1  # patches along h and w; h starts largest (official wp, hp)
    while tall > 0:
        if max(tall, wide) / min(tall, wide) <= max_ratio:
            sizes.append((tall * step, wide * step))
        if (wide + 1) * tall <= patches:
            wide += 1
        else:
            tall -= 1
    return sizes


def closest_bucket(height: int, width: int, buckets: list[tuple[int, int]], wide_may_equal: bool = False) -> tuple[int, int]:
    """The official `get_closest_ratio`: buckets compared by h/w rounded to 5 decimals; an image at
    least as tall as wide takes the closest bucket no taller than it, a wider one the closest
    strictly taller bucket (the first such bucket on ties). `wide_may_equal`: a wider image may also
    take a bucket of its own aspect (diffusers' HunyuanVideo-1.5 copy of the rule)."""
    aspect = height / width
    ratios = [round(h / w, 5) for h, w in buckets]
    candidates = [i for i, r in enumerate(ratios)
                  if (r - aspect <= 0 if aspect >= 1 else (r - aspect >= 0 if wide_may_equal else r - aspect > 0))]
    return buckets[min(candidates, key=lambda i: abs(ratios[i] - aspect))]


def i2v_bucket(image_size: tuple[int, int], resolution: str = "720p") -> tuple[int, int]:
    """(height, width) of the video for an image of PIL size (width, height) at a resolution tier."""
    if resolution not in BUCKET_BASE_SIZE:
        raise HyVideoError(f"image-to-video resolution must be one of {', '.join(BUCKET_BASE_SIZE)}; got {resolution}")
    width, height = image_size
    return closest_bucket(height, width, bucket_sizes(BUCKET_BASE_SIZE[resolution]))


def resize_center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """torchvision's Resize(min(size)) then CenterCrop(size) on a PIL image, size = (h, w)."""
    crop_h, crop_w = size
    short = min(size)
    w, h = image.size
    new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    if crop_w > new_w or crop_h > new_h:  # CenterCrop pads with black, left/top getting the smaller half
        left, top = max(crop_w - new_w, 0) // 2, max(crop_h - new_h, 0) // 2
        padded = Image.new(image.mode, (max(crop_w, new_w), max(crop_h, new_h)))
        padded.paste(image, (left, top))
        image, (new_w, new_h) = padded, padded.size
    top, left = round((new_h - crop_h) / 2.0), round((new_w - crop_w) / 2.0)  # Python round: half to even
    return image.crop((left, top, left + crop_w, top + crop_h))


def image_to_pixels(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [1, 3, 1, H, W] in [-1, 1] (ToTensor, Normalize(0.5, 0.5)): a
    one-frame video for the VAE encoder."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # [H, W, 3]
    pixels = torch.from_numpy(array).permute(2, 0, 1) * 2.0 - 1.0  # [3, H, W]
    return pixels[None, :, None]
