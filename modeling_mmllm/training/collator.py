"""The collator: TRL's vision-language collator plus placeholder masking, audio, video and image-generation targets
(library side)."""

from dataclasses import dataclass

import numpy as np
import torch
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

# Collated keys that carry generation targets to `MMLLMTrainer.compute_loss` (never model inputs).
GENERATION_TARGETS = ("generation_captions", "generation_pixel_values")


@dataclass
class MultimodalCollator(DataCollatorForVisionLanguageModeling):
    """TRL's vision collator, plus: rows with an `audio` column (clips as `{"array", "sampling_rate"}`) get their
    clips into the first user message, and placeholder tokens (every non-text modality) never count in the loss.

    Image generation: an image part in an assistant turn (an image the model produces) is written as the signal
    tokens, and the `generation_caption` of each row that has one goes to the trainer as `generation_captions` (in
    row order); with `target_images`, their `generation_image`s too, as `generation_pixel_values` `[n, 3, H, W]` in
    `[0, 1]`. Target images are never input images.
    """

    target_images: bool = False

    def torch_call(self, examples):
        captions = [example.get("generation_caption") for example in examples]
        targets = [example.get("generation_image") for example, caption in zip(examples, captions) if caption]
        examples = [self._with_generated_images(self._with_audio_parts(example)) for example in examples]
        batch = super().torch_call(examples)
        batch["labels"][batch["mm_token_type_ids"] != 0] = -100
        if any(captions):
            batch["generation_captions"] = [caption for caption in captions if caption]
            if self.target_images:
                if any(image is None for image in targets):
                    raise ValueError(
                        "image_loss_weight needs the target image of every drawing request: give those rows "
                        "a generation_image, or set image_loss_weight to 0."
                    )
                batch["generation_pixel_values"] = pixel_tensor(targets)
        return batch

    def _with_generated_images(self, example: dict) -> dict:
        """Assistant image parts as text parts holding the signal tokens (what the chat template renders them as):
        TRL would count them as input images to fill."""
        messages = example["messages"]
        produced = any(
            isinstance(message["content"], list)
            and message["role"] == "assistant"
            and any(part["type"] == "image" for part in message["content"])
            for message in messages
        )
        if not produced:
            return example
        signal = "".join(self.processor.signal_tokens)
        if not signal:
            raise ValueError(
                "A row's assistant turn has an image part, but the processor has no signal tokens "
                "<gen_img_i>: add image generation to the model first (`model: {image_generation: ...}`)."
            )
        messages = [
            {
                **message,
                "content": [
                    {"type": "text", "text": signal} if part["type"] == "image" else part for part in message["content"]
                ],
            }
            if message["role"] == "assistant"
            else message
            for message in messages
        ]
        return {**example, "messages": messages}

    def _with_audio_parts(self, example: dict) -> dict:
        """Typed content for the first user message: image placeholders (TRL fills them), then the audio clips."""
        clips = example.get("audio") or []
        if not clips:
            return example
        rate = self.processor.audio_features.sampling_rate
        for clip in clips:
            if clip["sampling_rate"] != rate:
                raise ValueError(
                    f"An audio clip is sampled at {clip['sampling_rate']} Hz but the audio encoder "
                    f"expects {rate} Hz: resample the dataset first (datasets' cast_column)."
                )
        messages = [dict(message) for message in example["messages"]]
        user = next(message for message in messages if message["role"] == "user")
        user["content"] = [
            *({"type": "image"} for _ in example.get("images") or []),
            *({"type": "audio", "audio": np.asarray(clip["array"], dtype=np.float32)} for clip in clips),
            {"type": "text", "text": user["content"]},
        ]
        return {**example, "messages": messages}


def rows_beyond_max_length(collator: MultimodalCollator, dataset) -> dict[int, str]:
    """Row index -> reason, for rows whose image (video, audio) tokens reach past `collator.max_length`: truncation
    there would cut a span of soft tokens (AnyRes images grow with their size), so such rows are found first."""
    limit, collator.max_length = collator.max_length, None
    bad = {}
    try:
        for index, row in enumerate(dataset):
            types = collator.torch_call([dict(row)])["mm_token_type_ids"][0]
            positions = types.nonzero()
            end = int(positions[-1]) + 1 if len(positions) else 0
            if end > limit:
                bad[index] = f"its image/video/audio tokens end at position {end}, past max_length={limit}"
    finally:
        collator.max_length = limit
    return bad


def pixel_tensor(images: list) -> torch.Tensor:
    """PIL images -> `[n, 3, H, W]` in `[0, 1]` (all at the first image's size)."""
    size = images[0].size
    arrays = [np.asarray(image.convert("RGB").resize(size), dtype=np.float32) / 255 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


__all__ = ["GENERATION_TARGETS", "MultimodalCollator", "pixel_tensor", "rows_beyond_max_length"]
