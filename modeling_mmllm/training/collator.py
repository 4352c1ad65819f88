"""The collator: TRL's vision-language collator plus placeholder masking, audio, video, image-generation targets and
padding-free batches (library side)."""

from dataclasses import dataclass, field

import numpy as np
import torch
from trl.chat_template_utils import has_generation_markers
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

# Collated keys that carry generation targets to `MMLLMTrainer.compute_loss` (never model inputs).
GENERATION_TARGETS = ("generation_captions", "generation_pixel_values")
ROWS_PER_CALL = 64  # rows collated at once when rows are measured


@dataclass
class MultimodalCollator(DataCollatorForVisionLanguageModeling):
    """TRL's vision collator, plus: rows with a `videos` column (frame lists, arrays, files or frame folders) or an
    `audio` column (clips as `{"array", "sampling_rate"}`) get their clips into the first user message, and
    placeholder tokens (every non-text modality) never count in the loss.

    Image generation: an image part in an assistant turn (an image the model produces) is written as the signal
    tokens, and the `generation_caption` of each row that has one goes to the trainer as `generation_captions` (in
    row order); with `target_images`, their `generation_image`s too, as `generation_pixel_values` `[n, 3, H, W]` in
    `[0, 1]`. Target images are never input images.

    Padding-free (`padding_free`, TRL's name and meaning): the batch's rows go back to back into one row, with
    `position_ids` restarting at 0 for each and no `attention_mask` (transformers' packed-sequence masks keep
    attention inside each row); each row's first token is not predicted from the row before; the media stay in row
    order. Packing: an example `{"pack": [i, j, ...]}` stands for those rows of `packed_rows` (see
    `training/packing.py`) and becomes one such sequence; a batch of packs is one sequence per pack (attention
    within a pack costs its length squared, not the whole batch's).
    """

    target_images: bool = False
    padding_free: bool = False
    packed_rows: object = None  # the rows (a dataset) that `{"pack": [...]}` examples index
    # Under a chat template without `{% generation %}` markers (an LLM's own), assistant-only loss finds the answers
    # itself: the ids that open an answer and the id that ends it (`answer_markers`).
    answer_markers: tuple[list[int], int] | None = field(default=None, init=False)

    def __post_init__(self):
        if self.assistant_only_loss and not has_generation_markers(self.processor.chat_template):
            self.answer_markers = answer_markers(self.processor)
            self.assistant_only_loss = False

    def torch_call(self, examples):
        groups = None  # rows per sequence of a padding-free batch (None: all in one)
        if examples and "pack" in examples[0]:
            groups = [len(example["pack"]) for example in examples]
            examples = [dict(self.packed_rows[int(index)]) for example in examples for index in example["pack"]]
        captions = [example.get("generation_caption") for example in examples]
        targets = [example.get("generation_image") for example, caption in zip(examples, captions) if caption]
        examples = [self._with_generated_images(self._with_media_parts(example)) for example in examples]
        batch = super().torch_call(examples)
        batch["labels"][batch["mm_token_type_ids"] != 0] = -100
        if self.answer_markers is not None:
            batch["labels"][answer_mask(batch["input_ids"], *self.answer_markers) == 0] = -100
        if any(captions):
            batch["generation_captions"] = [caption for caption in captions if caption]
            if self.target_images:
                if any(image is None for image in targets):
                    raise ValueError(
                        "image_loss_weight needs the target image of every drawing request: give those rows "
                        "a generation_image, or set image_loss_weight to 0."
                    )
                batch["generation_pixel_values"] = pixel_tensor(targets)
        if not self.padding_free:
            return batch
        return padding_free_batch(batch, self.processor.tokenizer.pad_token_id, groups)

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

    def _with_media_parts(self, example: dict) -> dict:
        """A row's video clips (`videos`: frame lists, arrays, files or frame folders) and audio clips (`audio`:
        `{"array", "sampling_rate"}`) as data in its first user message, where the processor reads them: into the
        message's own `{"type": "video"}` / `{"type": "audio"}` parts in order, or, for a string message, after its
        image placeholders (TRL fills those) and before its text."""
        media = {
            "video": list(example.get("videos") or []),
            "audio": [self._audio_array(clip) for clip in example.get("audio") or []],
        }
        if not any(media.values()):
            return example
        messages = [dict(message) for message in example["messages"]]
        user = next(message for message in messages if message["role"] == "user")
        if isinstance(user["content"], str):
            placeholders = [{"type": kind} for kind, clips in media.items() for _ in clips]
            images = [{"type": "image"} for _ in example.get("images") or []]
            user["content"] = [*images, *placeholders, {"type": "text", "text": user["content"]}]
        for kind, clips in media.items():
            parts = [part for part in user["content"] if part.get("type") == kind]
            if len(parts) != len(clips):
                raise ValueError(
                    f"A row has {len(clips)} {kind} clip(s) but its first user message has {len(parts)} "
                    f"{{'type': '{kind}'}} part(s): give each clip a part, or write the message as a string."
                )
        clips = {kind: iter(items) for kind, items in media.items()}
        user["content"] = [
            {**part, part["type"]: next(clips[part["type"]])} if part.get("type") in clips else part
            for part in user["content"]
        ]
        return {**example, "messages": messages}

    def _audio_array(self, clip: dict) -> np.ndarray:
        """An `{"array", "sampling_rate"}` clip as the array, at the audio encoder's rate (or a clear error)."""
        rate = self.processor.audio_features.sampling_rate
        if clip["sampling_rate"] != rate:
            raise ValueError(
                f"An audio clip is sampled at {clip['sampling_rate']} Hz but the audio encoder "
                f"expects {rate} Hz: resample the dataset first (datasets' cast_column)."
            )
        return np.asarray(clip["array"], dtype=np.float32)


def padding_free_batch(batch: dict, pad_token_id: int, groups: list[int] | None = None) -> dict:
    """A padded batch without padding: the rows of each group (`groups`: rows per sequence; None: all in one) go back
    to back into one sequence, `position_ids` restarting at 0 for each row, and no `attention_mask` (transformers'
    packed-sequence masks keep attention inside each row). Every per-token tensor (`[B, T]`, as the mask) follows;
    the first label of each row is ignored (it would be predicted from the end of the row before). Sequences shorter
    than the longest are filled with `pad_token_id` as a row of their own (positions from 0, no labels). Media and
    other keys stay as they are (in row order)."""
    mask = batch.pop("attention_mask").bool()
    lengths = mask.sum(dim=1)
    tokens = [key for key, value in batch.items() if torch.is_tensor(value) and value.shape == mask.shape]
    flat = {key: batch[key][mask] for key in tokens}
    flat["position_ids"] = torch.cat([torch.arange(length) for length in lengths.tolist()])
    if "labels" in flat:
        flat["labels"][lengths.cumsum(0) - lengths] = -100
    sizes = [int(group.sum()) for group in lengths.split(groups or [len(lengths)])]
    width = max(sizes)
    fill = {"input_ids": pad_token_id, "labels": -100}
    for key, values in flat.items():
        sequences = values.split(sizes)
        batch[key] = torch.stack(
            [
                torch.cat([sequence, torch.arange(width - len(sequence))])
                if key == "position_ids"
                else torch.cat([sequence, sequence.new_full((width - len(sequence),), fill.get(key, 0))])
                for sequence in sequences
            ]
        )
    return batch


def answer_markers(processor) -> tuple[list[int], int]:
    """`(opening ids, end id)` of an assistant answer under a chat template without generation markers: what
    `add_generation_prompt` appends (e.g. ChatML's `<|im_start|>assistant\n`), and the first token the template
    writes after an answer (its end-of-turn token, e.g. `<|im_end|>`), which the model must learn to produce."""
    user, answer = [{"role": "user", "content": "?"}], "ANSWER"
    prompt = processor.apply_chat_template(user, add_generation_prompt=True)
    opening = prompt[len(processor.apply_chat_template(user)) :]
    chat = processor.apply_chat_template([*user, {"role": "assistant", "content": answer}])
    if not opening or not chat.startswith(prompt + answer):
        raise ValueError(
            "assistant_only_loss cannot find the answers under this chat template (no generation prompt, or a chat "
            "that does not start with it): add {% generation %} markers around assistant turns, or set "
            "assistant_only_loss: false."
        )
    tokenizer = processor.tokenizer
    closing = tokenizer(chat[len(prompt + answer) :], add_special_tokens=False)["input_ids"]
    return tokenizer(opening, add_special_tokens=False)["input_ids"], (closing or [tokenizer.eos_token_id])[0]


def answer_mask(input_ids: torch.Tensor, opening: list[int], end: int) -> torch.Tensor:
    """1 on every assistant answer in `input_ids` `[B, T]`: the tokens after each `opening` sequence, up to and
    including the next `end` (or to the row's end, for an answer cut by truncation)."""
    mask = torch.zeros_like(input_ids)
    width = len(opening)
    for row, ids in enumerate(input_ids.tolist()):
        start, position = None, 0
        while position < len(ids):
            if start is None and ids[position : position + width] == opening:
                start = position = position + width
                continue
            if start is not None and ids[position] == end:
                mask[row, start : position + 1], start = 1, None
            position += 1
        if start is not None:
            mask[row, start:] = 1
    return mask


def row_token_counts(collator: MultimodalCollator, dataset) -> list[tuple[int, int]]:
    """`(tokens, media end)` of each row as the collator writes it, untruncated: its token count and the position just
    past its last image/video/audio token (0 without media); `ROWS_PER_CALL` rows are collated at a time."""
    settings = collator.max_length, collator.padding_free
    collator.max_length, collator.padding_free = None, False
    counts: list[tuple[int, int]] = []
    try:
        for start in range(0, len(dataset), ROWS_PER_CALL):
            batch = collator.torch_call(
                [dict(dataset[i]) for i in range(start, min(start + ROWS_PER_CALL, len(dataset)))]
            )
            mask = batch["attention_mask"].bool()
            position = mask.cumsum(dim=1) * mask  # 1-based within each row's own tokens, whichever side is padded
            ends = (position * (batch["mm_token_type_ids"] != 0)).amax(dim=1)
            counts += zip(mask.sum(dim=1).tolist(), ends.tolist(), strict=True)
    finally:
        collator.max_length, collator.padding_free = settings
    return counts


def rows_beyond_max_length(counts: list[tuple[int, int]], limit: int) -> dict[int, str]:
    """Row index -> reason, for rows (`row_token_counts`) whose image (video, audio) tokens reach past `limit`:
    truncation there would cut a span of soft tokens (AnyRes images grow with their size), so such rows are found
    first."""
    return {
        index: f"its image/video/audio tokens end at position {end}, past max_length={limit}"
        for index, (_, end) in enumerate(counts)
        if end > limit
    }


def pixel_tensor(images: list) -> torch.Tensor:
    """PIL images -> `[n, 3, H, W]` in `[0, 1]` (all at the first image's size)."""
    size = images[0].size
    arrays = [np.asarray(image.convert("RGB").resize(size), dtype=np.float32) / 255 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


__all__ = [
    "GENERATION_TARGETS",
    "MultimodalCollator",
    "answer_mask",
    "answer_markers",
    "padding_free_batch",
    "pixel_tensor",
    "row_token_counts",
    "rows_beyond_max_length",
]
