"""MMLLMProcessor: tokenizer + image processor + chat template, one call from prompts and images to model inputs.

Each `<image>` in the text becomes exactly `image_seq_length` placeholder tokens (what the input projector emits),
and `mm_token_type_ids` marks every token's modality (0 text, 1 image). Bad input is a `ValueError` that says
what is wrong and how to fix it; nothing is inserted or dropped silently.
"""

from PIL import Image
from transformers.image_transforms import to_pil_image
from transformers.image_utils import is_valid_image
from transformers.processing_utils import ProcessorMixin

from .configuration_mmllm import import_library_module


def _flatten(images) -> list:
    """Images given as one item, a list, or a list of lists per sample, as one flat list."""
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    return [image for item in images for image in _flatten(item)]


class MMLLMProcessor(ProcessorMixin):
    r"""
    Processor of the mmllm model family.

    Args:
        image_processor ([`BaseImageProcessor`], *optional*):
            Image processor of the vision encoder (resize, crop, normalise).
        tokenizer ([`PreTrainedTokenizerBase`], *optional*):
            Tokenizer with the `<image>` special token (`tokenizer.image_token`).
        chat_template (`str`, *optional*):
            Jinja chat template (the package's template carries `{% generation %}` markers for assistant-only loss).
        image_seq_length (`int`, *optional*, defaults to 1):
            Placeholder tokens per image; must equal the model config's `image_seq_length`.
        pad_to_square (`bool`, *optional*, defaults to `False`):
            Pad each image to a square with the normalisation mean colour before resizing, so nothing is cropped
            away (mPLUG-Owl2's and LLaVA-1.5's preprocessing).
    """

    return_mm_token_type_ids = True

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_seq_length: int = 1,
        pad_to_square: bool = False,
        **kwargs,
    ):
        if getattr(tokenizer, "image_token", None) is None:
            raise ValueError(
                "The tokenizer has no image token: add one with "
                "`tokenizer.add_special_tokens({'additional_special_tokens': ['<image>']})` and pass "
                "`extra_special_tokens={'image_token': '<image>'}` (MMLLMForConditionalGeneration.from_components "
                "does this for you)."
            )
        self.image_token = tokenizer.image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.image_seq_length = image_seq_length
        self.pad_to_square = pad_to_square
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_preset(cls, name: str) -> "MMLLMProcessor":
        """The processor of a tiny preset: an offline byte-level BPE tokenizer and the matching image processor.

        Deterministic and built locally (no download), so tests and the quickstart need no network.
        """
        return import_library_module("presets").load_processor_preset(cls, name)

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """Refuse objects that are not images (or paths/URLs of images) before transformers tries to load them."""
        for index, image in enumerate(_flatten(images)):
            if not (isinstance(image, str) or is_valid_image(image)):
                raise ValueError(
                    f"Image {index} is a {type(image).__name__}, not an image: pass PIL images, numpy arrays, "
                    "torch tensors, or paths/URLs of image files."
                )
        return super().prepare_inputs_layout(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """Check prompts against images before any work: empty prompts, placeholder/image counts."""
        samples = [text] if isinstance(text, str) else text
        if samples is not None and any(isinstance(sample, str) and not sample.strip() for sample in samples):
            raise ValueError("Empty prompt: every text must contain at least one non-space character.")
        if images is not None and samples is not None:
            n_placeholders = sum(sample.count(self.image_token) for sample in samples)
            n_images = len(_flatten(images))
            if n_placeholders != n_images:
                raise ValueError(
                    f"Got {n_images} image(s) but {n_placeholders} {self.image_token} placeholder(s) in the text: "
                    f"put one {self.image_token} where each image belongs (chat messages with {{'type': 'image'}} "
                    "parts do this through the chat template). Nothing is inserted silently."
                )
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def _process_images(self, images, **kwargs):
        if self.pad_to_square:
            images = [self._expand_to_square(image) for image in _flatten(images)]
        return super()._process_images(images, **kwargs)

    def _expand_to_square(self, image) -> Image.Image:
        """Centre the image on a square canvas of the mean colour (what the encoder sees as 'zero')."""
        image = image if isinstance(image, Image.Image) else to_pil_image(image)
        image = image.convert("RGB")
        width, height = image.size
        if width == height:
            return image
        side = max(width, height)
        background = tuple(int(round(channel * 255)) for channel in self.image_processor.image_mean)
        canvas = Image.new("RGB", (side, side), background)
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        return canvas

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.image_seq_length


MMLLMProcessor.register_for_auto_class()

__all__ = ["MMLLMProcessor"]
