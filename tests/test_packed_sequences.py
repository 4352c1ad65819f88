"""The model's side of padding-free training (TRL's `padding_free`, and packing): one row that holds several examples
back to back, `position_ids` restarting at 0 for each, no `attention_mask` and the media of all of them in order,
gives each example exactly its own logits, loss and gradients (transformers' packed-sequence masks keep attention
inside each example), with and without the modality-adaptive module. A training pass without a cache
(`use_cache=False`): transformers turns the packed-sequence detection off when a cache is passed or made."""

import pytest
import torch

from helpers import seeded_model
from modeling_mmllm import MMLLMConfig

pytestmark = pytest.mark.hub

TEXT_LENGTHS = ((5, 3), (0, 9), (7, 2))  # (text before the image, text after) of each example; 0: none


def _examples(config, seed: int = 0) -> list[dict]:
    """Three examples of different lengths, each one image between two runs of text, with labels."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for before, after in TEXT_LENGTHS:
        text = lambda length: torch.randint(10, config.text_config.vocab_size, (length,), generator=generator)  # noqa: E731
        image = torch.full((config.image_seq_length,), config.image_token_id)
        ids = torch.cat([text(before), image, text(after)])
        labels = torch.where(ids == config.image_token_id, -100, ids)
        pixels = torch.randn(
            1, 3, config.vision_config.image_size, config.vision_config.image_size, generator=generator
        )
        examples.append({"input_ids": ids, "labels": labels, "pixel_values": pixels})
    return examples


def _packed(examples: list[dict]) -> dict:
    """The examples as one padding-free row: positions restart per example, and no label spans two examples (each
    example's first token is not predicted from the one before)."""
    labels = [example["labels"].clone() for example in examples]
    for label in labels[1:]:
        label[0] = -100
    return {
        "input_ids": torch.cat([example["input_ids"] for example in examples])[None],
        "position_ids": torch.cat([torch.arange(len(example["input_ids"])) for example in examples])[None],
        "labels": torch.cat(labels)[None],
        "pixel_values": torch.cat([example["pixel_values"] for example in examples]),
    }


@pytest.mark.parametrize("preset", ["llava-tiny", "owl2-tiny"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_a_packed_row_gives_each_example_its_own_logits_loss_and_gradients(preset, attn_implementation):
    config = MMLLMConfig.from_preset(preset)
    config._attn_implementation = attn_implementation
    model = seeded_model(config).train()
    examples = _examples(config)

    packed = _packed(examples)
    outputs = model(**packed, use_cache=False)
    weighted, tokens, start = 0.0, 0, 0
    for example in examples:
        alone = model(**_single(example), use_cache=False)
        length = len(example["input_ids"])
        torch.testing.assert_close(outputs.logits[0, start : start + length], alone.logits[0], atol=1e-5, rtol=1e-5)
        counted = int((example["labels"][1:] != -100).sum())  # the labels an example's own loss predicts
        weighted, tokens, start = weighted + alone.loss * counted, tokens + counted, start + length
    assert tokens == int((packed["labels"][0, 1:] != -100).sum())  # no label crosses from one example to the next
    torch.testing.assert_close(outputs.loss, weighted / tokens, atol=1e-5, rtol=1e-5)

    packed_grads = torch.autograd.grad(outputs.loss, list(model.parameters()), allow_unused=True)
    separate_grads = torch.autograd.grad(weighted / tokens, list(model.parameters()), allow_unused=True)
    names = [name for name, _ in model.named_parameters()]
    for name, packed_grad, separate_grad in zip(names, packed_grads, separate_grads, strict=True):
        assert (packed_grad is None) == (separate_grad is None), name
        if packed_grad is not None:
            torch.testing.assert_close(packed_grad, separate_grad, atol=1e-5, rtol=1e-4, msg=name)


def _single(example: dict) -> dict:
    return {key: value if key == "pixel_values" else value[None] for key, value in example.items()}
