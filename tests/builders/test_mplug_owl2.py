"""Original mPLUG-Owl2 checkpoints: from_mplug_owl2 reproduces what the original code computed (fixture)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from helpers import FIXTURES
from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration
from modeling_mmllm.conversion import from_mplug_owl2
from modeling_mmllm.modality_encoder import select_vision_features

pytestmark = pytest.mark.hub

FIXTURE = FIXTURES / "mplug-owl2-tiny"
VOCAB, TOKENS_PER_IMAGE = 320, 9


@pytest.fixture(scope="module")
def converted():
    model, processor = from_mplug_owl2(FIXTURE)
    return model, processor


@pytest.fixture(scope="module")
def data():
    return load_file(FIXTURE / "inputs.safetensors"), load_file(FIXTURE / "expected.safetensors")


def _expand(input_ids: torch.Tensor) -> torch.Tensor:
    """Each -200 of the original becomes image_seq_length copies of our image token."""
    rows = [
        [t for token in row for t in ([VOCAB] * TOKENS_PER_IMAGE if token == -200 else [token])]
        for row in input_ids.tolist()
    ]
    return torch.tensor(rows)


def test_config_and_processor(converted):
    model, processor = converted
    config = model.config
    assert processor is None  # the fixture folder has no tokenizer
    assert config.image_token_id == VOCAB and config.text_config.vocab_size == VOCAB + 1
    assert config.image_seq_length == TOKENS_PER_IMAGE and config.modality_adaptive
    assert config.vision_feature_layernorm and config.vision_feature_select_strategy == "full"


def test_logits_and_intermediate_tensors_match_the_original(converted, data):
    model, _ = converted
    inputs, expected = data
    ids = _expand(inputs["input_ids"])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=inputs["images"])
        vision = select_vision_features(model.model.vision_tower, inputs["images"], model.config)[1]
        text = model(input_ids=inputs["text_input_ids"], attention_mask=inputs["text_attention_mask"])
    assert torch.equal(model.model.get_mm_token_type_ids(ids), expected["modality_indicators"])
    assert (vision - expected["vision_last_hidden_state"]).abs().max() <= 1e-4
    assert (out.image_hidden_states - expected["image_features"]).abs().max() <= 1e-4
    assert (out.logits[..., :VOCAB] - expected["logits_image"]).abs().max() <= 1e-4
    assert (text.logits[..., :VOCAB] - expected["logits_text"]).abs().max() <= 1e-4


def test_cached_greedy_generation_matches_the_original(converted, data):
    model, _ = converted
    inputs, expected = data
    ids = _expand(inputs["input_ids"])
    out = model.generate(
        input_ids=ids[:1],
        pixel_values=inputs["images"][:1],
        max_new_tokens=8,
        do_sample=False,
        use_cache=True,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert out.sequences[:, -8:].tolist() == expected["greedy_new_ids_row0"].tolist()
    scores = torch.stack(out.logits, dim=1)
    assert (scores[..., :VOCAB] - expected["greedy_scores_row0"]).abs().max() <= 1e-4
    batch = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=inputs["images"],
        max_new_tokens=8,
        do_sample=False,
    )
    assert batch[:, -8:].tolist() == expected["greedy_new_ids_batch"].tolist()
    assert not (batch[:, ids.shape[1] :] == VOCAB).any()  # the added image token is never generated


def test_left_padded_row_equals_the_row_alone(converted, data):
    """Upstream masks the wrong positions in a padded batch (see the fixture README); ours keeps rows intact."""
    model, _ = converted
    inputs, _ = data
    original_ids, original_mask = inputs["padded_input_ids"], inputs["padded_attention_mask"]
    ids = _expand(original_ids)
    mask = torch.tensor(
        [
            [m for token, m in zip(row, mask_row) for m in ([m] * TOKENS_PER_IMAGE if token == -200 else [m])]
            for row, mask_row in zip(original_ids.tolist(), original_mask.tolist())
        ]
    )
    padding = int((mask[1] == 0).sum())
    assert padding == 2 and mask[1, :padding].sum() == 0
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["images"]).logits
        alone = model(input_ids=ids[1:, padding:], pixel_values=inputs["images"][1:]).logits
    torch.testing.assert_close(batched[1, padding:], alone[0], atol=1e-5, rtol=1e-4)


def test_grouped_query_attention_backbones_work():
    config = MMLLMConfig.from_preset(
        "owl2-tiny",
        text_config={**MMLLMConfig.from_preset("owl2-tiny").text_config.to_dict(), "num_key_value_heads": 2},
    )
    model = MMLLMForConditionalGeneration(config).eval()
    assert model.model.language_model.layers[0].self_attn.multiway["1"].k_proj.out_features == 32
    ids = torch.tensor([[7, *[5] * 9, 8, 9]])
    with torch.no_grad():
        assert model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32)).logits.shape == (1, 12, 512)


def test_tokenizer_in_the_folder_gives_a_processor(tmp_path):
    folder = tmp_path / "owl2"
    shutil.copytree(FIXTURE, folder)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([Path(__file__).read_text()] * 3, trainer)
    assert tokenizer.get_vocab_size() == VOCAB
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder)
    model, processor = from_mplug_owl2(folder)
    assert (
        processor.image_token_id == VOCAB and processor.image_seq_length == TOKENS_PER_IMAGE and processor.pad_to_square
    )
    from PIL import Image

    batch = processor(images=[Image.new("RGB", (40, 20), "red")], text=["<image> what is it?"], return_tensors="pt")
    assert (batch["input_ids"] == VOCAB).sum() == TOKENS_PER_IMAGE
    assert model.generate(**batch, max_new_tokens=3, do_sample=False).shape[1] == batch["input_ids"].shape[1] + 3


def test_not_an_mplug_owl2_folder_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not an original mPLUG-Owl2 checkpoint"):
        from_mplug_owl2(tmp_path)


def test_mplug_owl2_llama2_7b_preset_size():
    with torch.device("meta"):
        model = MMLLMForConditionalGeneration(MMLLMConfig.from_preset("mplug-owl2-llama2-7b"))
    assert abs(model.num_parameters() - 8.2e9) / 8.2e9 < 0.005
    assert model.config.image_seq_length == 65 and model.config.modality_adaptive
