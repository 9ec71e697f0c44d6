"""The live preview of a run (`generate --preview`): after every denoising step, `preview.webp` in the
run folder shows the clip as the model now predicts it, so a prompt that goes wrong can be stopped
(Ctrl-C) minutes before the run would end.

What it shows: the step's prediction of the clean latents (hyvideo/sampler.predicted_clean),
projected to RGB per latent pixel (hyvideo/preview.latent_rgb, no VAE) at 1/8 of the video's
width and height (the 13B model's latent resolution; HunyuanVideo-1.5's 1/16 latents shown 2x);
one picture per latent frame, i.e. every 4th video frame, played at 24/4 = 6 fps.

Why an animated WebP: it holds the whole clip in one small file that browsers, VS Code's image
preview and the common desktop viewers play, and viewers that watch the file (VS Code, eog) show the
new one on their own when it is replaced; it is written with PyAV (already a dependency, the mp4
writer), lossless at libwebp's fastest setting, atomically (a viewer never reads half a file). Its cost is in
bench/bench_preview.py's results (well under 1 % of a step).
"""

from pathlib import Path

import torch

from hyvideo.files import write_atomic
from hyvideo.preview import latent_rgb

PREVIEW_FPS = 6  # a latent frame stands for 4 video frames at 24 fps


def write_webp(frames: torch.Tensor, path: Path, fps: int = PREVIEW_FPS) -> Path:
    """uint8 frames [F, H, W, 3] -> an animated WebP at `fps`, looping, written atomically."""
    array = frames.cpu().numpy()
    _, height, width, _ = array.shape

    def encode(file) -> None:
        import av  # here, not at import: the runner imports this module for every run

        with av.open(file, "w", format="webp", options={"loop": "0"}) as container:  # loop 0: forever
            # lossless: at 1/8 size, 4:2:0 chroma would halve the colours' resolution again; level 0: fastest
            stream = container.add_stream("libwebp_anim", rate=fps, options={"lossless": "1", "compression_level": "0"})
            stream.width, stream.height, stream.pix_fmt = width, height, "bgra"
            for frame in array:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())

    return write_atomic(path, encode, "the preview")


def write_preview(clean: torch.Tensor, path: Path, projection: tuple[tuple, tuple], upscale: int = 1) -> Path:
    """Predicted clean latents [1, C, T, h, w] -> the preview file (projected where they are, so
    only the uint8 picture leaves the GPU). projection: (factors, bias) of the model's latents
    (Stages.preview_projection); upscale: each latent pixel as upscale x upscale pixels, so that a
    16x VAE's preview is 1/8 of the video's size as the 13B model's is."""
    frames = latent_rgb(clean, *projection)  # [T, h, w, 3]
    return write_webp(frames.repeat_interleave(upscale, dim=1).repeat_interleave(upscale, dim=2), path)
