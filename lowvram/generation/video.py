"""Write a generated clip: H.264 mp4 (PyAV, yuv420p, 24 fps) and a PNG of its first frame; a
one-frame run is just the PNG.

Frames come as uint8 [F, H, W, 3] (what `hyvideo.pipeline.latents_to_frames` returns). Both files
are written atomically (`hyvideo.files.write_atomic`): a reader never sees half a video and an
interrupted write leaves the previous file (if any) alone.

The PNG writer is the 20 lines the format needs (signature, IHDR, one zlib IDAT, IEND), so there is
no image library dependency.
"""

import struct
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np

from hyvideo.files import write_atomic

FPS = 24  # the official saver's frame rate (facts §3.7)
CRF = 17  # x264 quality: visually lossless for 8-bit video; the default 23 smears fine detail


def _as_numpy(frames) -> np.ndarray:
    array = frames.cpu().numpy() if hasattr(frames, "cpu") else np.asarray(frames)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {array.dtype} {array.shape}")
    return array


def even_frames(array: np.ndarray) -> np.ndarray:
    """yuv420p needs even width and height: repeat the last row / column when one is odd."""
    _, height, width, _ = array.shape
    pad = ((0, 0), (0, height % 2), (0, width % 2), (0, 0))
    return np.pad(array, pad, mode="edge") if height % 2 or width % 2 else array


def write_mp4(frames, path: str | Path, fps: int = FPS, crf: int = CRF) -> Path:
    """H.264 (libx264), yuv420p, `fps` frames per second."""
    array = even_frames(_as_numpy(frames))
    _, height, width, _ = array.shape

    def write(f):
        import av

        with av.open(f, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": str(crf)}
            for image in array:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            container.mux(stream.encode())  # flush the encoder

    return write_atomic(Path(path), write, "the video")


def png_bytes(image: np.ndarray) -> bytes:
    """8-bit RGB PNG of a uint8 [H, W, 3] image."""
    height, width, _ = image.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # Each scanline starts with filter type 0 (none).
    raw = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, width * 3)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, colour type 2 (RGB)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b"")


def write_png(image, path: str | Path, what: str = "the image") -> Path:
    array = image.cpu().numpy() if hasattr(image, "cpu") else np.asarray(image)
    data = png_bytes(np.ascontiguousarray(array, dtype=np.uint8))
    return write_atomic(Path(path), data, what)


def write_outputs(frames, video_path: str | Path, png_path: str | Path, fps: int = FPS) -> tuple[Path, Path]:
    array = _as_numpy(frames)
    return write_mp4(array, video_path, fps), write_png(array[0], png_path, "the first frame")
