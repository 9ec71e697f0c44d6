"""Video sizes: the official resolution buckets and parsing of --size / --resolution / --aspect."""

import math

from hyvideo.errors import HyVideoError

# Official size buckets as width x height (facts §5.4; the Gradio demo's labels give the aspect).
SIZE_BUCKETS = {
    "540p": {"16:9": (960, 544), "9:16": (544, 960), "4:3": (832, 624), "3:4": (624, 832), "1:1": (720, 720)},
    "720p": {"16:9": (1280, 720), "9:16": (720, 1280), "4:3": (1104, 832), "3:4": (832, 1104), "1:1": (960, 960)},
}
DEFAULT_RESOLUTION, DEFAULT_ASPECT = "720p", "16:9"
# HunyuanVideo-1.5's buckets as width x height: hyvideo.image.bucket_sizes(640 | 960, 16) (480p | 720p,
# hyvideo/v15_image.TARGET_SIZE), the one closest to each aspect (tests/test_v15_planner.py checks them).
V15_SIZE_BUCKETS = {
    "480p": {"16:9": (848, 480), "9:16": (480, 848), "4:3": (720, 544), "3:4": (544, 720), "1:1": (640, 640)},
    "720p": {"16:9": (1280, 720), "9:16": (720, 1264), "4:3": (1104, 832), "3:4": (832, 1104), "1:1": (960, 960)},
}


def parse_size(text: str) -> tuple[int, int]:
    """"1280x720" -> (1280, 720)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        width, height = (int(p) for p in parts)
    except ValueError:
        raise HyVideoError(f"--size must be WIDTHxHEIGHT, e.g. 1280x720; got {text!r}") from None
    return width, height


def resolve_size(size: str | None, resolution: str | None, aspect: str | None, image: str | None = None) -> tuple[int, int]:
    """--size WxH, or an official bucket from --resolution and --aspect (default 720p 16:9); with
    --image, the image-to-video bucket closest to the image's aspect at --resolution (720p, 540p,
    360p), as the official I2V sampler picks it."""
    if size is not None:
        if resolution is not None or aspect is not None:
            raise HyVideoError("give either --size or --resolution/--aspect, not both")
        return parse_size(size)
    if image is not None:
        from hyvideo.image import i2v_bucket, open_image

        if aspect is not None:
            raise HyVideoError("--aspect with --image: the video takes the image's aspect (or give --size WxH)")
        height, width = i2v_bucket(open_image(image).size, resolution or DEFAULT_RESOLUTION)
        return width, height
    resolution, aspect = resolution or DEFAULT_RESOLUTION, aspect or DEFAULT_ASPECT
    if resolution not in SIZE_BUCKETS:
        raise HyVideoError(f"--resolution must be one of {', '.join(SIZE_BUCKETS)}; got {resolution!r} (or use --size WxH)")
    if aspect not in SIZE_BUCKETS[resolution]:
        raise HyVideoError(f"--aspect must be one of {', '.join(SIZE_BUCKETS[resolution])}; got {aspect!r}")
    return SIZE_BUCKETS[resolution][aspect]


def align_up(value: int, multiple: int) -> int:
    """`value` rounded up to a multiple (the sampler rounds width and height up to 16)."""
    return math.ceil(value / multiple) * multiple
