"""`from_idefics`: transformers' IDEFICS (the open Flamingo) converted into cross-attention fusion, with equal logits
and greedy tokens; `mmllm convert idefics` writes a folder that loads back."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    IdeficsConfig,
    IdeficsForVisionText2Text,
    IdeficsImageProcessorPil,
    IdeficsProcessor,
    PreTrainedTokenizerFast,
)

from helpers import make_images, tiny_idefics_config
from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration
from modeling_mmllm.cli.main import main
from modeling_mmllm.conversion import from_idefics
from modeling_mmllm.gated_cross_attention import latest_image_mask

pytestmark = pytest.mark.hub

VOCAB = 100
FAKE, IMAGE = VOCAB, VOCAB + 1  # IDEFICS-9B's tokenizer: <fake_token_around_image>, <image> after the vocabulary
# Left-padded: row 0 has two images, row 1 one (and a padding image slot).
IDS = torch.tensor(
    [
        [1, 7, FAKE, IMAGE, FAKE, 8, 9, FAKE, IMAGE, FAKE, 10, 11],
        [0, 0, 0, 0, 1, 7, FAKE, IMAGE, FAKE, 12, 13, 14],
    ]
)
MASK = (torch.arange(12) >= torch.tensor([[0], [4]])).long()


def idefics(interval: int, qk_layer_norms: bool, vocab_size: int = VOCAB) -> IdeficsForVisionText2Text:
    config = tiny_idefics_config(vocab_size, interval, qk_layer_norms)
    torch.manual_seed(0)
    model = IdeficsForVisionText2Text(config).eval()
    with torch.no_grad():  # open gates, so the images matter; a larger head, so greedy choices are well apart
        model.lm_head.weight.mul_(20)
        model.lm_head.additional_fc.weight.mul_(20)
        for layer in model.model.gated_cross_attn_layers:
            layer.alpha_cross_attn.normal_()
            layer.alpha_dense.normal_()
    return model


@pytest.fixture(scope="module")
def pixels():
    pixel_values = torch.randn(2, 2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    pixel_values[1, 1] = 0  # IDEFICS pads a row's missing images with zeros
    return pixel_values


@pytest.mark.parametrize(("interval", "qk_layer_norms"), [(1, False), (2, True)])
def test_logits_and_greedy_tokens_equal_idefics(interval, qk_layer_norms, pixels):
    reference = idefics(interval, qk_layer_norms)
    ours = from_idefics(reference)
    image_mask = latest_image_mask(IDS, IMAGE, 2)
    inputs = {"input_ids": IDS, "attention_mask": MASK}
    with torch.no_grad():
        expected = reference(**inputs, pixel_values=pixels, image_attention_mask=image_mask).logits
        given_mask = ours(**inputs, pixel_values=pixels, image_attention_mask=image_mask).logits
        derived = ours(**inputs, pixel_values=pixels).logits
        flattened = ours(**inputs, pixel_values=torch.cat([pixels[0], pixels[1, :1]])).logits
        other_images = ours(**inputs, pixel_values=pixels.flip(0)).logits
    real = MASK.bool()
    for output in (given_mask, derived, flattened):
        torch.testing.assert_close(output[real], expected[real], atol=1e-4, rtol=0)
    assert (other_images[real] - expected[real]).abs().max() > 1e-2  # the images matter
    generate = {"max_new_tokens": 6, "do_sample": False}
    expected_ids = reference.generate(**inputs, pixel_values=pixels, image_attention_mask=image_mask, **generate)
    assert torch.equal(ours.generate(**inputs, pixel_values=pixels, **generate), expected_ids)


def test_converted_config_keeps_idefics_ids_and_settings():
    reference = idefics(2, True)
    config = from_idefics(reference).config
    assert (config.text_config.bos_token_id, config.text_config.eos_token_id, config.text_config.pad_token_id) == (
        1,
        2,
        0,
    )
    assert config.text_config.vocab_size == VOCAB + 2 and config.image_token_id == IMAGE
    assert config.fusion == "cross_attention"
    assert config.cross_attention_config == {"cross_layer_interval": 2, "qk_layer_norms": True, "alpha_type": "float"}


def test_idefics_without_the_perceiver_is_refused():
    reference = idefics(1, False)
    reference.config.use_resampler = False
    with pytest.raises(ValueError, match="use_resampler=True"):
        from_idefics(reference)


def idefics_processor() -> IdeficsProcessor:
    """A tiny IdeficsProcessor: a byte-level BPE whose last two tokens are <fake_token_around_image> and <image>,
    as in IDEFICS-9B's tokenizer."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(["User: what is in the image? Assistant: a red circle."] * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>"]})
    return IdeficsProcessor(image_processor=IdeficsImageProcessorPil(image_size=16), tokenizer=tokenizer)


def test_mmllm_convert_idefics_writes_a_folder_that_answers_like_idefics(tmp_path, capsys):
    """The converted folder's processor (IDEFICS's tokenizer and image processor, one <image> token per image) and
    model give IDEFICS's input ids and logits for a prompt written with IDEFICS's image tokens."""
    source = idefics_processor()
    reference = idefics(2, False, vocab_size=len(source.tokenizer) - 2)
    reference.save_pretrained(tmp_path / "idefics")
    source.save_pretrained(tmp_path / "idefics")
    assert main(["convert", "idefics", str(tmp_path / "idefics"), str(tmp_path / "ours")]) == 0
    assert "saved idefics as mmllm" in capsys.readouterr().out
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "ours", trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "ours", trust_remote_code=True)
    image = make_images(1)[0]
    expected = source(text=[["User:", image, "what is in the image? Assistant:"]], return_tensors="pt")
    image_tokens = "<fake_token_around_image><image><fake_token_around_image>"
    ours = processor(
        images=[image], text=[f"<s>User:{image_tokens}what is in the image? Assistant:"], return_tensors="pt"
    )
    assert torch.equal(ours["input_ids"], expected["input_ids"])
    torch.testing.assert_close(ours["pixel_values"], expected["pixel_values"].flatten(0, 1))
    with torch.no_grad():
        expected_logits = reference(**expected).logits
        logits = model(input_ids=ours["input_ids"], pixel_values=ours["pixel_values"]).logits
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)


def test_idefics_9b_has_transformers_parameter_count():
    config = MMLLMConfig.from_preset("idefics-9b")
    vision, resampler = config.vision_config, config.projector_config
    with torch.device("meta"):
        ours = MMLLMForConditionalGeneration(config)
        reference = IdeficsForVisionText2Text(
            IdeficsConfig(
                additional_vocab_size=2,
                cross_layer_interval=4,
                use_resampler=True,
                vision_config=dict(
                    embed_dim=vision.hidden_size,
                    image_size=vision.image_size,
                    intermediate_size=vision.intermediate_size,
                    patch_size=vision.patch_size,
                    num_attention_heads=vision.num_attention_heads,
                    num_hidden_layers=vision.num_hidden_layers,
                ),
                perceiver_config=dict(
                    use_resampler=True,
                    resampler_n_latents=resampler["num_latents"],
                    resampler_depth=resampler["depth"],
                    resampler_n_heads=resampler["num_heads"],
                    resampler_head_dim=resampler["head_dim"],
                ),
            )
        )
    assert ours.num_parameters() == reference.num_parameters() == 8_929_675_280
