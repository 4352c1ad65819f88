"""MMLLMProcessor: tokenizer + image processor (+ audio feature extractor) + chat template, one call from prompts,
images, video clips and audio clips to model inputs.

Each `<image>` becomes exactly `image_seq_length` placeholder tokens (what the input projector emits; with AnyRes
tiling, the count of the image's grid: `anyres.num_image_tokens`), each
`<video>` the clip's `video_seq_length`, each `<audio>` the count for the clip's real length; `mm_token_type_ids`
marks every token's modality (0 text, 1 image, 2 video, 3 audio). Bad input is a `ValueError` that names the item
and says how to fix it; nothing is inserted, dropped or misread silently.
"""

import math
import re
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from transformers.image_transforms import to_pil_image
from transformers.image_utils import is_valid_image
from transformers.processing_utils import MultiModalData, ProcessorMixin

from .anyres import num_image_tokens
from .configuration_mmllm import MMLLMConfig, import_library_module
from .modality_encoder import num_audio_tokens

try:  # optional: audio files (wav, flac, ogg)
    import soundfile
except ImportError:
    soundfile = None

try:  # optional: resampling audio at another rate (what transformers' own audio loader uses)
    import soxr
except ImportError:
    soxr = None

try:  # optional: video files (gif; mp4 and others with imageio's ffmpeg or pyav plugin)
    import imageio.v3 as imageio
except ImportError:
    imageio = None


SIGNAL_TOKEN = re.compile(r"<gen_img_(\d+)>")
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # the files a frame folder's frames are read from


def _is_single_clip(item, audio: bool = False) -> bool:
    """Whether `videos=`/`audio=` got one clip rather than a list of clips."""
    if isinstance(item, (str, dict)):
        return True
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return item.ndim == (1 if audio else 4)
    if not isinstance(item, (list, tuple)) or not item:  # a frame, a number or an empty list is no clip
        return False
    return isinstance(item[0], (int, float, np.floating)) if audio else _is_frame(item[0])


def _clips(items, audio: bool = False) -> list:
    """`videos=` / `audio=` as a flat list of clips: one clip, a list of clips, or a list of per-sample lists of clips
    (what transformers' chat template passes for a batch of conversations)."""
    if _is_single_clip(items, audio):
        return [items]
    clips = []
    for item in items:
        sample = isinstance(item, (list, tuple)) and bool(item) and all(_is_single_clip(clip, audio) for clip in item)
        clips.extend(item) if sample else clips.append(item)
    return clips


def _is_empty(items, nested: bool = False) -> bool:
    """An empty list of items, e.g. `videos=[]`; with `nested`, also a list of empty per-sample lists
    (`images=[[], []]`). A video's frames are a list too, so `videos=[[]]` is one empty clip, not no clips."""
    if not isinstance(items, (list, tuple)):
        return False
    return not items or (nested and all(_is_empty(item) for item in items))


def _is_frame(item) -> bool:
    """One video frame: a PIL image or an `[H, W, 3]` / `[3, H, W]` array or tensor."""
    return isinstance(item, Image.Image) or (isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 3)


def frame_files(folder: str | Path) -> list[Path]:
    """The image files of a frame folder, in name order (`frame_0001.jpg`, ...): one video clip."""
    return sorted(path for path in Path(folder).iterdir() if path.suffix.lower() in FRAME_SUFFIXES)


def clip_frames(clip, index: int = 0) -> list:
    """A video clip as its frames: a video file, a frame folder (`frame_files`), a `[frames, H, W, 3]` array or
    tensor, or a list of frames. A `ValueError` naming video item `index` when it cannot be read or has no frames."""
    if isinstance(clip, str) and Path(clip).is_dir():
        clip = [Image.open(frame) for frame in frame_files(clip)]
    elif isinstance(clip, str):
        if imageio is None:
            raise ValueError(
                f"Video item {index} is a file ({clip}); reading video files needs imageio "
                "(`pip install imageio`), or pass the frames."
            )
        try:
            clip = imageio.imread(clip, index=None)
        except Exception as error:
            raise ValueError(f"Video item {index}: cannot read {clip} ({error}).") from None
    frames = list(clip) if isinstance(clip, (list, tuple, np.ndarray, torch.Tensor)) else None
    if not frames or not all(_is_frame(frame) for frame in frames):
        raise ValueError(
            f"Video item {index} is empty or not a clip ({type(clip).__name__}): pass a list of frames, a "
            "[frames, height, width, 3] array, a video file or a folder of frame images."
        )
    return frames


def _flatten(images) -> list:
    """Images given as one item, a list, or a list of lists per sample, as one flat list."""
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    return [image for item in images for image in _flatten(item)]


HIGH_BIT_DEPTH = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def _check_text(text) -> None:
    """Every prompt is a valid Unicode `str`; bytes, other objects and lone surrogates would otherwise fail deep in
    the tokenizer with a TypeError that names neither the prompt nor the fix."""
    samples = [text] if isinstance(text, (str, bytes)) else text
    if not isinstance(samples, (list, tuple)):
        raise ValueError(f"text is of type {type(text).__name__}: pass a string or a list of strings.")
    for index, sample in enumerate(samples):
        if isinstance(sample, (bytes, bytearray)):
            raise ValueError(f"Text {index} is bytes, not a str: decode it first (`text.decode('utf-8')`).")
        if not isinstance(sample, str):
            raise ValueError(
                f"Text {index} is of type {type(sample).__name__}, not a str: pass a str or a list of them."
            )
        try:
            sample.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"Text {index} is not valid Unicode (lone surrogate {sample[error.start]!r} at position {error.start}, "
                "e.g. from errors='surrogateescape'): decode the original bytes with their real encoding, or replace "
                "it with `text.encode('utf-8', 'replace').decode()`."
            ) from None


def _high_bit_depth_to_l(image: Image.Image, index: int) -> Image.Image:
    """A 16-bit (`I;16`, `I`: 0..65535) or float (`F`: 0..1) grayscale image as 8-bit `L`. PIL's own conversion
    clips every value above 255 to white, so a mid-grey 16-bit image would reach the encoder as white."""
    top = HIGH_BIT_DEPTH[image.mode]
    values = np.asarray(image, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if not (np.isfinite(values).all() and low >= 0 and high <= top):
        raise ValueError(
            f"Image {index} is a mode {image.mode} image with values in [{low}, {high}], outside [0, {top}]: "
            "scale it into that range or convert it to 8-bit first."
        )
    return Image.fromarray(np.round(values * (255 / top)).astype(np.uint8), mode="L")


def _pil_as_rgb(image: Image.Image, index: int) -> Image.Image:
    """A PIL image of any mode as RGB; transparency composited on white (transformers' `convert_to_rgb` rule)."""
    image = _high_bit_depth_to_l(image, index) if image.mode in HIGH_BIT_DEPTH else image
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _channels_last(pixels: np.ndarray) -> np.ndarray | None:
    """A 2-D `[H, W]` array (grayscale) or a 1-, 2- (gray+alpha) or 4-channel (RGBA) `[H, W, C]` / `[C, H, W]` one
    as `[H, W, C]`; None for 3-channel arrays (transformers infers their layout) and anything else."""
    if pixels.ndim == 2:
        return pixels[..., None]
    if pixels.ndim != 3 or 3 in (pixels.shape[0], pixels.shape[-1]):
        return None
    if pixels.shape[-1] in (1, 2, 4):
        return pixels
    return np.moveaxis(pixels, 0, -1) if pixels.shape[0] in (1, 2, 4) else None


def _composite_on_white(pixels: np.ndarray) -> np.ndarray:
    """`[H, W, C]` gray (C=1), gray+alpha (2) or RGBA (4) as `[H, W, 3]`, alpha composited on white (1.0 for floats
    in [0, 1], else 255)."""
    white = 1.0 if pixels.dtype.kind == "f" and pixels.max(initial=0) <= 1 else 255.0
    color = pixels[..., :-1] if pixels.shape[-1] in (2, 4) else pixels
    if pixels.shape[-1] in (2, 4):
        alpha = pixels[..., -1:].astype(np.float64) / white
        color = np.round(color * alpha + white * (1 - alpha)) if white == 255 else color * alpha + (1 - alpha)
    return np.ascontiguousarray(np.broadcast_to(color, (*pixels.shape[:2], 3))).astype(pixels.dtype)


def _array_as_rgb(image, rescale: bool):
    """An array or tensor image with other than 3 channels as `[H, W, 3]` (a PIL image when uint8, so its layout is
    unambiguous); with `rescale`, floats in [0, 1] as uint8 first, since the image processor would divide them by
    255 again (a black image). Other arrays are returned unchanged."""
    pixels = image.numpy(force=True) if isinstance(image, torch.Tensor) else np.asarray(image)
    scaled = rescale and pixels.dtype.kind == "f" and pixels.size and 0 <= pixels.min() and pixels.max() <= 1
    pixels = np.round(pixels * 255).astype(np.uint8) if scaled else pixels
    layout = _channels_last(pixels)
    if layout is None:
        return pixels if scaled else image
    rgb = _composite_on_white(layout)
    return Image.fromarray(rgb) if rgb.dtype == np.uint8 else rgb


def _as_rgb(image, index: int, rescale: bool):
    """One image as the encoder's 3 channels on the 0..255 scale the image processor expects (see `_pil_as_rgb`,
    `_array_as_rgb`); paths, URLs and batched arrays pass through unchanged."""
    if isinstance(image, Image.Image):
        return _pil_as_rgb(image, index)
    if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim in (2, 3):
        return _array_as_rgb(image, rescale)
    return image


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
        grid_packing (`bool`, *optional*, defaults to `False`):
            With an AnyRes image processor (one that has `image_grid_pinpoints`, e.g. `LlavaNextImageProcessorPil`):
            `True` counts tokens as LLaVA-NeXT packs a grid projector's tiles (unpadded, a newline per row),
            `False` as a fixed-count projector keeps them (`views x image_seq_length`). Video frames stay single
            views (the global view).
        pad_to_square (`bool`, *optional*, defaults to `False`):
            Pad each image to a square with the normalisation mean colour before resizing, so nothing is cropped
            away (mPLUG-Owl2's and LLaVA-1.5's preprocessing).
        video_num_frames (`int`, *optional*):
            Frames sampled uniformly from each video clip; `None` means the model takes no video.
        video_temporal_pool (`int`, *optional*, defaults to 1):
            Consecutive frames the model averages into one (the config's `video_temporal_pool`).
        audio_features (`FeatureExtractionMixin` or `dict`, *optional*):
            The audio encoder's feature extractor (e.g. `WhisperFeatureExtractor`) or its saved dict; `None` means
            the model takes no audio. Optional, unlike `ProcessorMixin`'s parts, so it is kept and saved here.
        audio_pool_stride (`int`, *optional*, defaults to 4):
            Encoder frames per audio token (the config's `audio_pool_stride`).
        context_length (`int`, *optional*):
            The backbone's context; a video or audio item that alone needs more tokens is an error.
    """

    return_mm_token_type_ids = True

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_seq_length: int = 1,
        grid_packing: bool = False,
        pad_to_square: bool = False,
        video_num_frames: int | None = None,
        video_temporal_pool: int = 1,
        audio_features=None,
        audio_pool_stride: int = 4,
        context_length: int | None = None,
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
        self.image_seq_length, self.grid_packing = image_seq_length, grid_packing
        self.pad_to_square = pad_to_square
        self.video_num_frames, self.video_temporal_pool = video_num_frames, video_temporal_pool
        self.audio_pool_stride, self.context_length = audio_pool_stride, context_length
        if isinstance(audio_features, dict):  # as saved in processor_config.json
            extractor_class = getattr(transformers, audio_features["feature_extractor_type"])
            audio_features = extractor_class(**audio_features)
        if audio_features is not None:
            # Pipelines collate a batch on the side the feature extractor and the tokenizer both report (and refuse
            # to batch when they differ); each audio window is still padded on the right (`_process_audio`).
            audio_features.padding_side = tokenizer.padding_side
        self.audio_features = audio_features
        for modality, enabled in (("video", video_num_frames is not None), ("audio", audio_features is not None)):
            token = getattr(tokenizer, f"{modality}_token", None)
            if enabled and token is None:
                raise ValueError(f"The tokenizer has no {modality} token: add <{modality}> as `{modality}_token`.")
            if enabled:
                setattr(self, f"{modality}_token", token)
                setattr(self, f"{modality}_token_id", tokenizer.convert_tokens_to_ids(token))
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @property
    def feature_extractor(self):
        """The audio feature extractor (what transformers' generic `__call__` looks for), or None."""
        return self.audio_features

    @property
    def video_processor(self):
        """Video frames go through the image processor (no torchvision needed)."""
        return self.image_processor

    @property
    def video_seq_length(self) -> int:
        return self.video_num_frames // self.video_temporal_pool * self.image_seq_length

    def to_dict(self) -> dict:
        output = super().to_dict()
        if self.audio_features is not None:
            output["audio_features"] = self.audio_features.to_dict()
        return output

    @classmethod
    def from_preset(cls, name: str) -> "MMLLMProcessor":
        """The processor of a tiny preset: an offline byte-level BPE tokenizer and the matching image processor.

        Deterministic and built locally (no download), so tests and the quickstart need no network.
        """
        return import_library_module("builders.presets").load_processor_preset(cls, name)

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """Refuse objects that are not images (or paths/URLs of images) before transformers tries to load them; empty
        item lists (`videos=[]`, as lmms-eval passes for text-only requests) mean no items."""
        images = None if _is_empty(images, nested=True) else images
        videos, audio = (None if _is_empty(items) else items for items in (videos, audio))
        for index, image in enumerate(_flatten(images)):
            if not (isinstance(image, str) or is_valid_image(image)):
                raise ValueError(
                    f"Image {index} is of type {type(image).__name__}, not an image: pass PIL images, numpy arrays, "
                    "torch tensors, or paths/URLs of image files."
                )
        if text is not None:
            _check_text(text)
        if self.all_special_multimodal_tokens and text is not None:
            text = [text] if isinstance(text, str) else list(text)
        if images is not None:
            images = self.image_processor.fetch_images(images)
        videos = None if videos is None else _clips(videos)
        audio = None if audio is None else _clips(audio, audio=True)
        return images, text, videos, audio

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """Check prompts against the items before any work: empty prompts, placeholder/item counts per modality."""
        samples = [text] if isinstance(text, str) else text
        if samples is not None and any(isinstance(sample, str) and not sample.strip() for sample in samples):
            raise ValueError("Empty prompt: every text must contain at least one non-space character.")
        if images is None and text is None and videos is None and audio is None:
            raise ValueError("Nothing to process: pass text (and images=, videos= or audio=).")
        items = {"image": len(_flatten(images)), "video": len(videos or []), "audio": len(audio or [])}
        for modality, count in items.items():
            token = getattr(self, f"{modality}_token", None)
            if token is None:
                if count:
                    raise ValueError(
                        f"Got {modality} input, but this processor has no {modality} support "
                        f"(no <{modality}> token and {modality} settings): use a model with a "
                        f"{modality} encoder."
                    )
                continue
            n_placeholders = sum(sample.count(token) for sample in samples or [])
            if samples is not None and n_placeholders != count:
                raise ValueError(
                    f"Got {count} {modality} item(s) but {n_placeholders} {token} placeholder(s) in the text: put "
                    f"one {token} where each {modality} item belongs (chat messages with {{'type': '{modality}'}} "
                    "parts do this through the chat template). Nothing is inserted silently."
                )

    def _check_context(self, modality: str, index: int, tokens: int, detail: str = "") -> None:
        if self.context_length is not None and tokens > self.context_length:
            raise ValueError(
                f"{modality.capitalize()} item {index}{detail} needs {tokens} tokens, more than the "
                f"model's context of {self.context_length}: shorten it."
            )

    def _process_videos(self, videos, **kwargs):
        """Sample `video_num_frames` frames per clip and run them through the image processor."""
        frames = [frame for index, clip in enumerate(videos) for frame in self._sample_frames(clip, index)]
        pixel_values = torch.as_tensor(np.asarray(self._process_images(frames, **kwargs)[0]["pixel_values"]))
        if self.tiled:
            pixel_values = pixel_values[:, 0]  # frames stay single views: the global view of each
        pixel_values = pixel_values.view(len(videos), self.video_num_frames, *np.shape(pixel_values)[1:])
        for index in range(len(videos)):
            self._check_context("video", index, self.video_seq_length)
        return {"pixel_values_videos": pixel_values}, [self.video_token * self.video_seq_length] * len(videos)

    def _sample_frames(self, clip, index: int) -> list:
        """A clip (`clip_frames`) -> its `video_num_frames` frames, sampled uniformly."""
        frames = clip_frames(clip, index)
        picks = np.linspace(0, len(frames) - 1, self.video_num_frames).round().astype(int)
        return [frames[pick] for pick in picks]

    def _process_audio(self, audio, sampling_rate: int | None = None, **kwargs):
        """Cut each clip into the encoder's windows; `<audio>` becomes the token count of its real length."""
        extractor = self.audio_features
        windows, replacements = [], []
        for index, clip in enumerate(audio):
            waveform = self._waveform(clip, index, sampling_rate)
            starts = range(0, len(waveform), extractor.n_samples)
            windows += [waveform[start : start + extractor.n_samples] for start in starts]
            frames = [
                math.ceil(min(extractor.n_samples, len(waveform) - start) / extractor.hop_length) for start in starts
            ]
            tokens = sum(num_audio_tokens(frame, self.audio_pool_stride) for frame in frames)
            self._check_context("audio", index, tokens, f" ({len(waveform) / extractor.sampling_rate:.1f} s)")
            replacements.append(self.audio_token * tokens)
        side, extractor.padding_side = extractor.padding_side, "right"  # Whisper's windows: audio first, then zeros
        try:
            features = extractor(
                windows,
                sampling_rate=extractor.sampling_rate,
                padding="max_length",
                return_attention_mask=True,
                return_tensors="pt",
            )
        finally:
            extractor.padding_side = side
        return (
            {"input_features": features["input_features"], "input_features_mask": features["attention_mask"]},
            replacements,
        )

    def _waveform(self, clip, index: int, sampling_rate: int | None) -> np.ndarray:
        """One mono waveform at the extractor's rate (resampled with soxr, as transformers' audio loader does); a file
        path, `{"array", "sampling_rate"}`, or an array with `sampling_rate`."""
        expected = self.audio_features.sampling_rate
        if isinstance(clip, str):
            if soundfile is None:
                raise ValueError(
                    f"Audio item {index} is a file ({clip}); reading audio files needs soundfile "
                    "(`pip install soundfile`), or pass the waveform and sampling_rate."
                )
            try:
                clip, sampling_rate = soundfile.read(clip, dtype="float32")
            except Exception as error:
                raise ValueError(f"Audio item {index}: cannot read {clip} ({error}).") from None
        elif isinstance(clip, dict):
            clip, sampling_rate = clip.get("array"), clip.get("sampling_rate")
        waveform = np.asarray(clip.cpu() if isinstance(clip, torch.Tensor) else clip, dtype=np.float32)
        if waveform.ndim == 2 and waveform.size:  # [samples, channels] -> mono (empty stays 2-D: refused below)
            waveform = waveform.mean(axis=-1 if waveform.shape[-1] < waveform.shape[0] else 0)
        if waveform.ndim != 1 or waveform.size == 0:
            raise ValueError(
                f"Audio item {index} is empty or not a waveform (shape {waveform.shape}): pass a 1-D array of samples."
            )
        if not np.isfinite(waveform).all():
            raise ValueError(
                f"Audio item {index} has {np.isnan(waveform).sum()} NaN and {np.isinf(waveform).sum()} infinite "
                "sample(s): the encoder would turn them into NaN features; clean or replace the clip."
            )
        if sampling_rate is None:
            raise ValueError(
                f"Audio item {index} has no sampling rate: pass sampling_rate={expected} (or a "
                "{'array', 'sampling_rate'} dict, or a file) so it is not misread."
            )
        if sampling_rate != expected:
            if soxr is None:
                raise ValueError(
                    f"Audio item {index} is sampled at {sampling_rate} Hz but the audio encoder expects "
                    f"{expected} Hz: install soxr to resample it here (`pip install mmllm[audio]`), or "
                    "resample it first."
                )
            waveform = soxr.resample(waveform, sampling_rate, expected).astype(np.float32)
        return waveform

    def _process_images(self, images, **kwargs):
        """Images (and video frames) as RGB on the 0..255 scale (`_as_rgb`), squared if `pad_to_square`, then the
        image processor."""
        rescale = kwargs.get("do_rescale")
        rescale = self.image_processor.do_rescale if rescale is None else rescale
        images = [_as_rgb(image, index, rescale) for index, image in enumerate(_flatten(images))]
        if self.pad_to_square:
            images = [self._expand_to_square(image) for image in images]
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

    def check_config(self, config) -> None:
        """Refuse a model config whose placeholder layout differs from this processor's (e.g. a hand-edited
        processor_config.json): the model would see too few or too many soft-token slots, or none at all."""
        pairs = {"image_seq_length": self.image_seq_length, "image_token_id": self.image_token_id}
        if self.video_num_frames is not None:
            pairs.update(
                video_num_frames=self.video_num_frames,
                video_temporal_pool=self.video_temporal_pool,
                video_token_id=self.video_token_id,
            )
        if self.audio_features is not None:
            pairs.update(audio_pool_stride=self.audio_pool_stride, audio_token_id=self.audio_token_id)
        for name, value in pairs.items():
            if getattr(config, name, value) != value:
                raise ValueError(
                    f"The processor's {name}={value} does not match the model config's {getattr(config, name)}: "
                    f"set {name} in processor_config.json to the config's value (or rebuild the processor)."
                )

    @property
    def signal_tokens(self) -> list[str]:
        """The image-generation signal tokens `<gen_img_0> ... <gen_img_{k-1}>` of the tokenizer (empty without)."""
        tokens = [token for token in self.tokenizer.get_added_vocab() if SIGNAL_TOKEN.fullmatch(token)]
        return sorted(tokens, key=lambda token: int(SIGNAL_TOKEN.fullmatch(token)[1]))

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """The chat template, told the signal tokens: an assistant `{"type": "image"}` part (an image the model
        produces) renders as `<gen_img_0> ... <gen_img_{k-1}>`."""
        kwargs.setdefault("image_generation_tokens", "".join(self.signal_tokens))
        return super().apply_chat_template(conversation, chat_template, **kwargs)

    def post_process_multimodal_output(
        self, generated_outputs, skip_special_tokens=True, generation_mode=None, **kwargs
    ):
        """Text (token ids -> strings) or, with `generation_mode="image"`, images `[B, 3, H, W]` (or one `[3, H, W]`)
        in `[0, 1]`, as a tensor, an array or a list of them -> a list of PIL images (what `pipeline("any-to-any")`
        returns)."""
        if generation_mode != "image":
            if torch.is_tensor(generated_outputs) and generated_outputs.is_floating_point():
                raise ValueError("These outputs are pixels, not token ids: pass generation_mode='image'.")
            return super().post_process_multimodal_output(
                generated_outputs, skip_special_tokens, generation_mode, **kwargs
            )
        items = generated_outputs if isinstance(generated_outputs, (list, tuple)) else [generated_outputs]
        pixels = torch.cat(
            [
                torch.as_tensor(np.asarray(item) if not torch.is_tensor(item) else item)
                .detach()
                .cpu()
                .reshape(-1, *np.shape(item)[-3:])
                for item in items
            ]
        )
        if pixels.ndim != 4 or pixels.shape[1] != 3 or not pixels.is_floating_point():
            raise ValueError(
                f"generation_mode='image' turns pixels [B, 3, H, W] (or [3, H, W]) in [0, 1] into PIL "
                f"images (what generate(generation_mode='image') returns); got {pixels.dtype} of shape "
                f"{tuple(pixels.shape)}."
            )
        pixels = pixels.float().clamp(0, 1).mul(255).round().to(torch.uint8)
        return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in pixels]

    @property
    def tiled(self) -> bool:
        """Whether images are tiled (AnyRes): the image processor has `image_grid_pinpoints`."""
        return getattr(self.image_processor, "image_grid_pinpoints", None) is not None

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """Placeholder tokens of an image of each `(height, width)` in `image_sizes`: what its `<image>` expands to
        (transformers' convention, which vLLM's Transformers backend reads to lay out prompts)."""
        if image_sizes is None:
            return MultiModalData()
        counts = [self._image_token_count(size) for size in image_sizes]
        return MultiModalData(num_image_tokens=counts, num_image_patches=[1] * len(counts))

    def _image_token_count(self, image_size, tile: int | None = None) -> int:
        """Placeholders of one image of `image_size` `(height, width)`: `image_seq_length`, or with AnyRes the count
        of its grid of `tile`-sized views (default: the image processor's crop size, LLaVA-NeXT's patch size)."""
        if not self.tiled:
            return self.image_seq_length
        size = image_size.tolist() if hasattr(image_size, "tolist") else list(image_size)
        tile = tile or self.image_processor.crop_size["height"]
        pinpoints = self.image_processor.image_grid_pinpoints
        return num_image_tokens(size, pinpoints, tile, self.image_seq_length, self.grid_packing)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """`<image>` -> its soft tokens' placeholders: `image_seq_length`, or the count of its AnyRes grid."""
        if not self.tiled:
            return self.image_token * self.image_seq_length
        tile = np.shape(image_inputs["pixel_values"][0])[-1]
        return self.image_token * self._image_token_count(image_inputs["image_sizes"][image_idx], tile)


MMLLMProcessor.register_for_auto_class()
transformers.AutoProcessor.register(MMLLMConfig, MMLLMProcessor, exist_ok=True)  # see the modeling file's end

__all__ = ["MMLLMProcessor"]
