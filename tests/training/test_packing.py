"""Packing and padding-free SFT (TRL's `packing` / `padding_free`, which TRL refuses for vision data): the collator's
padding-free batches give every row its padded batch's logits, loss and gradients (images, AnyRes tiles, audio,
text-only rows, the modality-adaptive module); packs hold whole rows within `max_length`; the recipe keys train,
and what cannot be exact is a clear error."""

import json
from types import SimpleNamespace

import pytest
import torch

from helpers import QUICKSTART_THREADS
from modeling_mmllm.data.synthetic import make_dataset
from modeling_mmllm.training import load_recipe, train
from modeling_mmllm.training.collator import MultimodalCollator, padding_free_batch
from modeling_mmllm.training.model_setup import build_model
from modeling_mmllm.training.packing import pack_length, pack_rows, row_lengths

TINY = {"max_steps": 2, "save_steps": 100, "logging_steps": 1, "dataloader_num_workers": 0}


@pytest.mark.parametrize(
    ("preset", "task", "image_size"),
    [("owl2-tiny", "joint", 32), ("owl2-anyres-tiny", "detail", 64), ("audio-tiny", "audio", 32)],
)
@pytest.mark.parametrize("packs", [None, [2, 3, 1]])
def test_padding_free_batches_give_each_row_its_padded_logits_loss_and_gradients(preset, task, image_size, packs):
    """One padding-free sequence (TRL's `padding_free`) or one per pack: equal to the padded batch (1e-5)."""
    model, processor = build_model({"preset": preset})
    model.train()
    rows = [dict(row) for row in make_dataset(task, n=6, image_size=image_size)][:6]
    collator = MultimodalCollator(processor=processor, max_length=None, assistant_only_loss=True)
    padded = collator.torch_call(rows)
    mask = padded["attention_mask"].bool()
    free = padding_free_batch(dict(padded), processor.tokenizer.pad_token_id, packs)
    assert "attention_mask" not in free and free["input_ids"].shape[0] == len(packs or [1])

    padded_out = model(**padded, use_cache=False)
    free_out = model(**free, use_cache=False)
    sizes = [int(group.sum()) for group in mask.sum(dim=1).split(packs or [len(rows)])]
    real = torch.cat([free_out.logits[i, :size] for i, size in enumerate(sizes)])  # a short pack's pads follow it
    torch.testing.assert_close(real, padded_out.logits[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(free_out.loss, padded_out.loss, atol=1e-5, rtol=1e-5)

    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    free_grads = torch.autograd.grad(free_out.loss, parameters, allow_unused=True)
    padded_grads = torch.autograd.grad(padded_out.loss, parameters, allow_unused=True)
    for free_grad, padded_grad in zip(free_grads, padded_grads, strict=True):
        assert (free_grad is None) == (padded_grad is None)
        if free_grad is not None:
            torch.testing.assert_close(free_grad, padded_grad, atol=1e-5, rtol=1e-4)


def test_packs_hold_whole_rows_within_max_length():
    """Best-fit decreasing (TRL's packer): every row in exactly one pack, no pack over the budget, packs nearly full."""
    lengths = [37, 120, 8, 200, 64, 64, 91, 15, 150, 33, 77, 5] * 5
    packs = pack_rows(lengths, max_length=256, seed=3)["pack"]
    assert sorted(index for pack in packs for index in pack) == list(range(len(lengths)))
    assert max(sum(lengths[index] for index in pack) for pack in packs) <= 256
    assert len(packs) <= -(-sum(lengths) // 256) + 1  # within one pack of the lower bound


def test_row_lengths_are_the_collators_token_counts():
    """Each row's length is what the collator writes for it alone (images expanded), however many it measures at
    once; a batch of packs is one sequence per pack, a short one filled by a pad row of its own."""
    _, processor = build_model({"preset": "owl2-tiny"})
    rows = make_dataset("joint", n=10, image_size=32)
    collator = MultimodalCollator(processor=processor, max_length=None, assistant_only_loss=True, padding_free=True)
    padded = MultimodalCollator(processor=processor, max_length=None, assistant_only_loss=True)
    expected = [int(padded.torch_call([dict(row)])["attention_mask"].sum()) for row in rows]
    assert row_lengths(collator, rows) == expected and collator.padding_free
    collator.packed_rows = rows
    batch = collator.torch_call([{"pack": [0, 1]}, {"pack": [2]}])
    assert batch["input_ids"].shape == (2, expected[0] + expected[1])
    assert batch["position_ids"][0, expected[0]] == 0 and batch["position_ids"][1, expected[2]] == 0  # rows restart


@pytest.mark.parametrize("keys", [{"packing": True, "max_length": 192}, {"padding_free": True}, {"packing": True}])
def test_packing_is_one_recipe_key_away(keys, tmp_path, caplog):
    """`packing: true` (without max_length: the backbone's context) and `padding_free: true` train a recipe TRL would
    refuse for vision data; the log says how many packs."""
    overrides = {"model": "owl2-tiny", "data": {"synthetic": "joint", "n": 16, "image_size": 32}}
    recipe = load_recipe(
        "quickstart-stage2",
        {**overrides, "output_dir": str(tmp_path), "per_device_train_batch_size": 2, "eval": None, **TINY, **keys},
    )
    with caplog.at_level("INFO"):
        folder = train(recipe, name="packed")
    history = json.loads((folder / "training_history.json").read_text())[-1]
    assert history["steps"] == 2 and all(loss > 0 for _, loss in history["losses"])
    if keys.get("packing"):
        assert "packs of at most" in caplog.text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model": "flamingo-tiny", "packing": True, "max_length": 256}, "cross-attention fusion"),
        ({"model": "owl2-tiny", "packing": True, "max_length": 256, "packing_strategy": "wrapped"}, "bfd"),
    ],
)
def test_what_packing_cannot_do_exactly_is_a_clear_error(overrides, message, tmp_path):
    recipe = load_recipe(
        "quickstart-stage2",
        {"data": {"synthetic": "joint", "n": 8, "image_size": 32}, "output_dir": str(tmp_path), **TINY, **overrides},
    )
    with pytest.raises(ValueError, match=message):
        train(recipe, name="packed")


def test_a_pack_of_rows_without_a_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="set max_length"):
        pack_length(SimpleNamespace(max_length=None), SimpleNamespace(max_position_embeddings=None))
    assert pack_length(SimpleNamespace(max_length=None), SimpleNamespace(max_position_embeddings=512)) == 512


@pytest.mark.slow
@pytest.mark.threads(QUICKSTART_THREADS)  # beside the quickstart's padded stage 2, trained with them
def test_a_packed_stage_learns_what_the_padded_stage_learns(quickstart_run, tmp_path):
    """The quickstart's stage 2 again from its stage-1 model, packed (two packs of at most 256 tokens a step, 800
    steps: about the rows of the padded stage's 720 steps of 16): the same held-out accuracy as the padded stage."""
    assert quickstart_run["returncode"] == 0, quickstart_run["stderr"][-3000:]
    padded = json.loads((quickstart_run["stage2"] / "eval_results.json").read_text())
    settings = {"packing": True, "max_length": 256, "per_device_train_batch_size": 2, "max_steps": 800}
    recipe = load_recipe(
        "quickstart-stage2",
        {"model": str(quickstart_run["stage1"]), "output_dir": str(tmp_path), "save_steps": 10_000, **settings},
    )
    packed = json.loads((train(recipe, name="quickstart-stage2") / "eval_results.json").read_text())
    assert packed["accuracy/overall"] >= 0.95
    assert abs(packed["accuracy/overall"] - padded["accuracy/overall"]) <= 0.03, (packed, padded)
