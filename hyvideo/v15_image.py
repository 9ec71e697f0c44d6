"""HunyuanVideo-1.5 image-to-video conditioning: an image -> `V15Image` (its first-frame VAE latents
and SigLIP states) and the video size, as diffusers 0.42's `HunyuanVideo15ImageToVideoPipeline`.

Rules (diffusers; where Tencent's sampler differs, said so):
  size     `image.bucket_sizes(target, 16)` with target 640 (480p) or 960 (720p) (the
           transformer config's `target_size`; Tencent `bucket_hw_base_size`), then
           `image.closest_bucket(..., wide_may_equal=True)`: an image wider than tall may take a
           bucket of its own aspect (the 13B rule needs a strictly taller one). Tencent's 1.5
           `get_closest_ratio` takes the plain closest aspect, either side.
  crop     `resize_crop`: scale so the bucket is covered (integer floor division), LANCZOS, paste
           centred on a black bucket-sized canvas (diffusers `VaeImageProcessor._resize_and_crop`);
           the 13B `image.resize_center_crop` resizes the short side bilinearly instead. Tencent's
           rounds the scaled size and crops at fractional offsets: a pixel or so apart.
  latents  the crop in [-1, 1] (`image.image_to_pixels`) -> VAE encoder mean * scaling_factor
           [1, 32, 1, h, w]; it fills the first latent frame of the DiT's condition channels.
  vision   the crop through SigLIP's image processor (resized to its 384 px, bicubic, mean/std 0.5)
           -> `SiglipVisionModel(...).last_hidden_state` [1, 729, 1152] (FLUX.1-Redux-dev's
           so400m-patch14-384 tower; diffusers `image_encoder/` + `feature_extractor/`, Tencent
           `vision_encoder/siglip/image_encoder` + `feature_extractor`).
"""

from collections.abc import Callable

import torch
from PIL import Image

from .errors import HyVideoError, one_line
from .image import bucket_sizes, closest_bucket, image_to_pixels
from .v15_pipeline import V15Image
from .v15_text import V15TextFiles, device_of

TARGET_SIZE = {"480p": 640, "720p": 960}  # bucket base size per resolution (diffusers target_size)
BUCKET_STEP = 16  # the VAE's spatial compression


def v15_target_size(variant: str) -> int:
    """The bucket base size of a released transformer ("480p_i2v", "720p_i2v_distilled", ...)."""
    return TARGET_SIZE[variant.split("_")[0]]


def v15_bucket(image_size: tuple[int, int], target_size: int) -> tuple[int, int]:
    """(height, width) of the video for an image of PIL size (width, height)."""
    width, height = image_size
    return closest_bucket(height, width, bucket_sizes(target_size, BUCKET_STEP), wide_may_equal=True)


def v15_video_size(variant: str, width: int, height: int) -> tuple[int, int]:
    """(width, height) of a text-to-video run whose size was not given: the transformer's own
    resolution (480p or 720p bucket) at the aspect of width x height (16:9 unless --aspect), as
    Tencent's sampler takes its --resolution and --aspect-ratio."""
    bucket_height, bucket_width = v15_bucket((width, height), v15_target_size(variant))
    return bucket_width, bucket_height


def resize_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """diffusers' crop resize to size = (h, w): scale the image (LANCZOS, sizes by floor division)
    so it covers the bucket, paste it centred on a black canvas of the bucket's size."""
    height, width = size
    if width / height > image.width / image.height:
        new_w, new_h = width, image.height * width // image.width
    else:
        new_w, new_h = image.width * height // image.height, height
    resized = image.resize((new_w, new_h), resample=Image.LANCZOS)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(resized, box=(width // 2 - new_w // 2, height // 2 - new_h // 2))
    return canvas


def siglip_processor_class():
    """SigLIP's image processor on PIL (transformers 5 picks a torchvision backend when torchvision
    is installed, whose resize differs slightly; transformers 4's class is the PIL one)."""
    try:
        from transformers import SiglipImageProcessorPil
    except ImportError:
        from transformers import SiglipImageProcessor as SiglipImageProcessorPil
    return SiglipImageProcessorPil


class V15ImageEncoder:
    """The SigLIP vision tower and its image processor. `vision` is called like a transformers
    SiglipVisionModel (pixel_values -> .last_hidden_state)."""

    def __init__(self, vision, processor):
        self.vision, self.processor = vision, processor

    @classmethod
    def from_files(cls, files: V15TextFiles, dtype: torch.dtype = torch.bfloat16, device="cpu") -> "V15ImageEncoder":
        from transformers import SiglipVisionModel

        if files.vision is None:
            raise HyVideoError("image-to-video needs the SigLIP vision encoder: diffusers' image_encoder/ and "
                               "feature_extractor/, or Tencent's vision_encoder/siglip/ (FLUX.1-Redux-dev)")
        try:
            processor = siglip_processor_class().from_pretrained(files.vision_processor, local_files_only=True)
            vision = SiglipVisionModel.from_pretrained(files.vision, dtype=dtype, device_map={"": torch.device(device)},
                                                       local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise HyVideoError(f"could not load the SigLIP vision encoder from {files.vision}: {one_line(error)}") from error
        return cls(vision.eval(), processor)

    def vision_states(self, image: Image.Image) -> torch.Tensor:
        """[1, tokens, D] float32 on the CPU for the (already cropped) RGB image."""
        pixels = self.processor.preprocess(images=image, do_resize=True, return_tensors="pt", do_convert_rgb=True)["pixel_values"]
        weight = next(self.vision.parameters())
        with torch.no_grad():
            states = self.vision(pixel_values=pixels.to(device_of(self.vision), weight.dtype)).last_hidden_state
        return states.float().cpu()


def encode_image(image: Image.Image, target_size: int, vision: V15ImageEncoder,
                 vae_encode: Callable[[torch.Tensor], torch.Tensor], scaling_factor: float) -> tuple[V15Image, tuple[int, int]]:
    """(V15Image, (height, width) of the video) for an RGB image (`image.open_image`).
    `vae_encode`: pixels [1, 3, 1, H, W] in [-1, 1] (float32, CPU) -> unscaled latent mean
    [1, C, 1, H/16, W/16] (the caller's VAE, tiled or not, on its device and dtype)."""
    size = v15_bucket(image.size, target_size)
    crop = resize_crop(image, size)
    latents = vae_encode(image_to_pixels(crop)).float().cpu() * scaling_factor
    return V15Image(latents, vision.vision_states(crop)), size
