"""Every projector type honours the same contract: generation with cache, mixed batches, checkpointing,
other resolutions (query-based types), remote code in a fresh process, and learning."""

import json
import subprocess
import sys

import pytest
import torch

from helpers import make_images, seeded_model
from modeling_mmllm import MMLLMConfig, MMLLMProcessor
from modeling_mmllm.saving import save_model_folder

pytestmark = pytest.mark.hub

PRESETS = ["llava-tiny", "pixel-shuffle-tiny", "owl2-tiny", "blip2-tiny", "resampler-tiny"]
QUERY_BASED = ["owl2-tiny", "blip2-tiny", "resampler-tiny"]
TEXTS = ["<image>Compare with<image>, which is bigger?", "Just text, no picture.", "What is in <image>?"]


@pytest.fixture(scope="module", params=PRESETS)
def setup(request):
    config = MMLLMConfig.from_preset(request.param)
    processor = MMLLMProcessor.from_preset(request.param)
    images = make_images(3, seed=5)
    batch = processor(images=images, text=TEXTS, return_tensors="pt", padding=True)
    return request.param, config, processor, images, batch


def test_shapes_and_gradients_reach_every_projector_parameter(setup):
    name, config, processor, images, batch = setup
    model = seeded_model(config).train()
    out = model(**batch, labels=batch["input_ids"].masked_fill(batch["mm_token_type_ids"].bool(), -100))
    assert out.image_hidden_states.shape == (3, config.image_seq_length, config.text_config.hidden_size)
    out.loss.backward()
    missing = [n for n, p in model.model.multi_modal_projector.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, missing


def test_generation_with_cache_equals_without(setup):
    name, config, processor, images, batch = setup
    model = seeded_model(config)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(
        model.generate(**batch, use_cache=True, **kwargs), model.generate(**batch, use_cache=False, **kwargs)
    )


def test_mixed_batch_equals_rows_alone(setup):
    name, config, processor, images, batch = setup
    model = seeded_model(config)
    with torch.no_grad():
        batched = model(**batch).logits
    row_images = [images[:2], None, images[2:]]
    for index, text in enumerate(TEXTS):
        alone = processor(images=row_images[index], text=[text], return_tensors="pt")
        with torch.no_grad():
            logits = model(**alone).logits[0]
        torch.testing.assert_close(batched[index, -logits.shape[0] :], logits, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(setup):
    name, config, processor, images, batch = setup
    labels = batch["input_ids"].masked_fill(batch["mm_token_type_ids"].bool() | ~batch["attention_mask"].bool(), -100)
    grads = []
    for checkpointing in (False, True):
        model = seeded_model(config).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(**batch, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", QUERY_BASED)
def test_query_based_projectors_keep_their_token_count_at_another_resolution(name):
    config = MMLLMConfig.from_preset(name)
    processor = MMLLMProcessor.from_preset(name)
    model = seeded_model(config)
    size = {"height": 48, "width": 48}
    resize = (
        {"size": size}
        if "height" in processor.image_processor.size
        else {"size": {"shortest_edge": 48}, "crop_size": size}
    )
    batch = processor(images=make_images(1), text=["<image>What?"], return_tensors="pt", **resize)
    assert batch["pixel_values"].shape[-1] == 48
    assert (batch["input_ids"] == config.image_token_id).sum() == config.image_seq_length
    with torch.no_grad():
        out = model(**batch)
    assert out.image_hidden_states.shape[1] == config.image_seq_length
    assert torch.isfinite(out.logits).all()


def test_token_wise_projector_at_another_resolution_is_a_clear_error():
    processor = MMLLMProcessor.from_preset("llava-tiny")
    model = seeded_model(MMLLMConfig.from_preset("llava-tiny"))
    batch = processor(
        images=make_images(1),
        text=["<image>What?"],
        return_tensors="pt",
        size={"shortest_edge": 48},
        crop_size={"height": 48, "width": 48},
    )
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(**batch)


LOAD_ALL = """
import json, sys
sys.modules["modeling_mmllm"] = None
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from PIL import Image
result = {}
for folder in sys.argv[2:]:
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor(images=[Image.open(sys.argv[1])], text=["<image>What?"], return_tensors="pt")
    result[folder] = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None)[0].tolist()
print(json.dumps(result))
"""


@pytest.mark.slow
def test_every_projector_loads_as_remote_code_in_a_fresh_process(tmp_path):
    image = make_images(1, seed=9)[0]
    image.save(tmp_path / "image.png")
    expected = {}
    for name in PRESETS:
        model, processor = seeded_model(MMLLMConfig.from_preset(name)), MMLLMProcessor.from_preset(name)
        folder = save_model_folder(model, processor, tmp_path / name)
        inputs = processor(images=[image], text=["<image>What?"], return_tensors="pt")
        expected[str(folder)] = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None)[
            0
        ].tolist()
    run = subprocess.run(
        [sys.executable, "-c", LOAD_ALL, str(tmp_path / "image.png"), *expected],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == expected


def _colour_task(processor, n: int, seed: int):
    """Noisy images of one of four colours (each colour equally often); the answer is the colour's word."""
    import numpy as np
    from PIL import Image

    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
    rng = np.random.default_rng(seed)
    picks = [list(colours)[i % 4] for i in rng.permutation(n)]
    images = [
        Image.fromarray(np.clip(np.array(colours[c]) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8))
        for c in picks
    ]
    batch = processor(images=images, text=[f"<image>colour? {c}" for c in picks], return_tensors="pt", padding=True)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -1] = batch["input_ids"][:, -1]  # learn only the answer token
    return batch, labels


@pytest.mark.parametrize("name", PRESETS)
def test_projector_learns_a_tiny_task(name):
    torch.manual_seed(0)
    config = MMLLMConfig.from_preset(name)
    processor = MMLLMProcessor.from_preset(name)
    model = seeded_model(config).train()
    with torch.no_grad():
        model.lm_head.weight.div_(20)  # undo the test-only logit scaling: learn from a normal start
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch, labels = _colour_task(processor, 16, seed=1)
    first = None
    for _ in range(100):
        loss = model(**batch, labels=labels).loss
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    held_out, held_labels = _colour_task(processor, 8, seed=2)  # new images of the same colours
    with torch.no_grad():
        final = model.eval()(**held_out, labels=held_labels).loss.item()
    assert final < 0.1 * first, (first, final)
