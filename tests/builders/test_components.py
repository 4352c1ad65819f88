"""from_components: pretrained encoder + pretrained causal LM folders -> model and processor."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionModel,
    PreTrainedTokenizerFast,
)

from helpers import make_images, tiny_text_config, tiny_vision_config
from modeling_mmllm import MMLLMForConditionalGeneration

pytestmark = pytest.mark.hub


def _plain_lm_tokenizer() -> PreTrainedTokenizerFast:
    """An ordinary LM tokenizer (byte-level BPE with only <s> and </s>), as a pretrained LM would ship."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny CLIP vision model, a tiny CLIP dual encoder and tiny Llama / GPT-2 causal LMs, saved to folders."""
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(1)
    CLIPVisionModel(tiny_vision_config("clip")).save_pretrained(root / "clip-vision")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "clip-vision"
    )
    clip = CLIPModel(
        CLIPConfig(
            vision_config=tiny_vision_config("clip").to_dict(),
            text_config={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "vocab_size": 99,
            },
            projection_dim=32,
        )
    )
    clip.save_pretrained(root / "clip-dual")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "clip-dual"
    )
    tokenizer = _plain_lm_tokenizer()
    for kind in ("llama", "gpt2"):
        lm = AutoModelForCausalLM.from_config(tiny_text_config(kind, vocab_size=len(tokenizer)))
        lm.save_pretrained(root / kind)
        tokenizer.save_pretrained(root / kind)
    return root


@pytest.mark.parametrize("vision, text", [("clip-vision", "llama"), ("clip-dual", "gpt2")])
def test_composed_model_keeps_pretrained_weights_and_lm_logits(parts, vision, text):
    model, processor = MMLLMForConditionalGeneration.from_components(
        vision=str(parts / vision), text=str(parts / text), projector="mlp"
    )
    lm = AutoModelForCausalLM.from_pretrained(parts / text).eval()
    original_vocab = lm.config.vocab_size
    # Special tokens were added and the embeddings resized to the tokenizer.
    assert len(processor.tokenizer) > original_vocab
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    assert processor.tokenizer.image_token == "<image>"
    for token in ("<image>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert len(processor.tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token
    assert model.config.image_token_id == processor.tokenizer.image_token_id
    assert "{% generation %}" in processor.chat_template or "generation" in processor.chat_template
    assert model.config.base_models == [str(parts / vision), str(parts / text)]
    # Text-only input: the causal LM's own computation. Hidden states and head rows are bit-identical; the
    # logits of the original vocabulary differ only by BLAS summation order of the wider head (~1e-8).
    ids = torch.tensor([[10, 40, 200, 7, 99, 250]])
    with torch.no_grad():
        ours = model.eval()(input_ids=ids, output_hidden_states=True)
        theirs = lm(input_ids=ids, output_hidden_states=True)
    assert all(torch.equal(a, b) for a, b in zip(ours.hidden_states, theirs.hidden_states))
    assert torch.equal(model.lm_head.weight[:original_vocab], lm.get_output_embeddings().weight)
    torch.testing.assert_close(ours.logits[..., :original_vocab], theirs.logits, atol=1e-6, rtol=0)
    # Pretrained vision weights are in the tower.
    source = CLIPVisionModel.from_pretrained(parts / vision)
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[name], tensor), name
    # The processor and the model work together end to end.
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = processor(images=make_images(1), text=[prompt], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3 or processor.tokenizer.eos_token_id in out[0]


def test_caller_chat_template_and_config_overrides(parts):
    model, processor = MMLLMForConditionalGeneration.from_components(
        vision=str(parts / "clip-vision"),
        text=str(parts / "llama"),
        projector="linear",
        chat_template="{{ messages[0]['content'] }}",
        vision_feature_layer=-1,
    )
    assert processor.chat_template == "{{ messages[0]['content'] }}"
    assert model.config.projector_type == "linear" and model.config.vision_feature_layer == -1


def test_modality_adaptive_branches_copy_the_pretrained_text_branch(parts):
    model, _ = MMLLMForConditionalGeneration.from_components(
        vision=str(parts / "clip-vision"),
        text=str(parts / "llama"),
        projector="abstractor",
        projector_config={"num_queries": 4, "num_layers": 1, "num_heads": 4, "intermediate_size": 64},
        vision_feature_select_strategy="full",
        modality_adaptive=True,
    )
    lm = AutoModelForCausalLM.from_pretrained(parts / "llama")
    assert model.config.modality_adaptive and model.config.image_seq_length == 5
    for index, layer in enumerate(model.model.language_model.layers):
        source = lm.model.layers[index]
        for branch in ("0", "1"):
            assert torch.equal(layer.self_attn.multiway[branch].k_proj.weight, source.self_attn.k_proj.weight)
            assert torch.equal(layer.multiway[branch].input_layernorm.weight, source.input_layernorm.weight)


def test_a_flamingo_from_pretrained_parts_starts_as_its_llm(parts):
    """from_components with cross-attention fusion: the pretrained LLM's weights load (the new blocks are the only
    keys it lacks), the gates are closed, and the model answers as the LLM until they open."""
    model, processor = MMLLMForConditionalGeneration.from_components(
        vision=str(parts / "clip-vision"),
        text=str(parts / "llama"),
        projector="resampler",
        projector_config={"num_latents": 4, "depth": 1, "num_heads": 2, "head_dim": 8},
        vision_feature_layer=-1,
        fusion="cross_attention",
    )
    lm = AutoModelForCausalLM.from_pretrained(parts / "llama")
    backbone = model.model.language_model.state_dict()
    for name, tensor in lm.model.state_dict().items():
        if name != "embed_tokens.weight":  # resized for the added tokens
            assert torch.equal(backbone[name], tensor), name
    assert processor.image_seq_length == 1 and model.config.image_seq_length == 1
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        add_generation_prompt=True,
    )
    batch = processor(images=make_images(1), text=[prompt], return_tensors="pt")
    with torch.no_grad():
        fused = model.eval()(**batch).logits
        # the same tokens without the image (as embeddings: input_ids with an <image> token need pixel_values)
        text_only = model(inputs_embeds=model.get_input_embeddings()(batch["input_ids"])).logits
    assert torch.equal(fused, text_only)  # closed gates: the image changes nothing yet
