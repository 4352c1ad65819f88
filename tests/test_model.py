"""MMLLMForConditionalGeneration: feature layer, placeholders, attention backends, checkpointing, cache, loss."""

import pytest
import torch
import torch.nn.functional as F

from helpers import cache_key, seeded_model
from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration
from modeling_mmllm.modality_encoder import select_vision_features

pytestmark = pytest.mark.hub


@pytest.fixture(scope="module")
def batch(processor, images):
    """Mixed batch: two images in row 0, none in row 1, one in row 2; left padding."""
    texts = ["<image>Compare with<image>, which is bigger?", "Just text, no picture.", "What is in <image>?"]
    return processor(images=[images[0], images[1], images[2]], text=texts, return_tensors="pt", padding=True)


def _vision_layer_calls(model: MMLLMForConditionalGeneration, pixel_values: torch.Tensor) -> list[int]:
    calls = []
    layers = model.model.vision_tower.encoder.layers
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, layer in enumerate(layers)]
    model.get_image_features(pixel_values)
    for hook in hooks:
        hook.remove()
    return calls


@pytest.mark.parametrize("feature_layer, ran", [(-2, [0]), (-1, [0, 1]), (1, [0]), (0, [0])])
def test_vision_tower_stops_at_the_feature_layer(feature_layer, ran):
    config = MMLLMConfig.from_preset("llava-tiny", vision_feature_layer=feature_layer)
    model = seeded_model(config)
    pixel_values = torch.randn(2, 3, 32, 32)
    assert _vision_layer_calls(model, pixel_values) == ran
    # Skipped layers stay in the weights: the state dict has every layer.
    assert any(".encoder.layers.1." in key for key in model.state_dict())
    # The features equal those of the full tower's hidden states (what LLaVA computes).
    layers = model.model.vision_tower.encoder.layers
    full = torch.nn.ModuleList(layers._modules.values())
    model.model.vision_tower.encoder.layers = full
    reference = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[feature_layer][:, 1:]
    model.model.vision_tower.encoder.layers = layers
    torch.testing.assert_close(select_vision_features(model.model.vision_tower, pixel_values, config)[1], reference)


def test_mm_token_type_ids_derived_from_placeholders(tiny_model, batch):
    derived = tiny_model.model.get_mm_token_type_ids(batch["input_ids"])
    assert torch.equal(derived, batch["mm_token_type_ids"])
    assert derived.sum() == 3 * 16


def test_mixed_batch_equals_rows_one_by_one(tiny_model, processor, images, batch):
    """Several images in a row, a row without images, left padding: each row as if it were alone."""
    with torch.no_grad():
        batched = tiny_model(**batch).logits
    rows = [
        ([images[0], images[1]], "<image>Compare with<image>, which is bigger?"),
        (None, "Just text, no picture."),
        ([images[2]], "What is in <image>?"),
    ]
    for index, (row_images, text) in enumerate(rows):
        single = processor(images=row_images, text=[text], return_tensors="pt")
        with torch.no_grad():
            alone = tiny_model(**single).logits[0]
        torch.testing.assert_close(batched[index, -alone.shape[0] :], alone, atol=1e-5, rtol=1e-4)


def test_eager_and_sdpa_agree(batch):
    config = MMLLMConfig.from_preset("llava-tiny")
    logits = {}
    for implementation in ("eager", "sdpa"):
        model = seeded_model(config)
        model.set_attn_implementation(implementation)
        assert model.model.language_model.config._attn_implementation == implementation
        assert model.model.vision_tower.config._attn_implementation == implementation
        with torch.no_grad():
            logits[implementation] = model(**batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(logits["eager"][mask], logits["sdpa"][mask], atol=1e-4, rtol=1e-4)


def test_loss_matches_cross_entropy_and_gradient_checkpointing_matches(batch):
    labels = batch["input_ids"].masked_fill(batch["mm_token_type_ids"].bool() | ~batch["attention_mask"].bool(), -100)
    grads = {}
    for checkpointing in (False, True):
        model = seeded_model(MMLLMConfig.from_preset("llava-tiny")).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        out = model(**batch, labels=labels)
        expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        torch.testing.assert_close(out.loss, expected)
        out.loss.backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    assert any("vision_tower" in name for name in grads[True])
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], atol=1e-6, rtol=1e-4)


def test_logits_to_keep(tiny_model, batch):
    with torch.no_grad():
        full = tiny_model(**batch).logits
        last = tiny_model(**batch, logits_to_keep=1).logits
    assert last.shape[1] == 1
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_cached_generation_equals_uncached(tiny_model, batch):
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = tiny_model.generate(**batch, use_cache=True, **kwargs)
    uncached = tiny_model.generate(**batch, use_cache=False, **kwargs)
    assert cached.shape[1] == batch["input_ids"].shape[1] + 6
    assert torch.equal(cached, uncached)


def test_placeholder_count_mismatch_is_a_clear_error(tiny_model, processor, images):
    inputs = processor(images=[images[0]], text=["<image>hi"], return_tensors="pt")
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        tiny_model(input_ids=inputs["input_ids"][:, 3:], pixel_values=inputs["pixel_values"])


def test_no_split_modules_come_from_the_sub_models(tiny_model):
    assert {"LlamaDecoderLayer", "CLIPEncoderLayer"} <= set(tiny_model._no_split_modules)


def test_device_map_auto_keeps_decoder_layers_whole(saved_folder):
    from accelerate import infer_auto_device_map

    model = MMLLMForConditionalGeneration.from_pretrained(saved_folder, device_map="auto")
    assert model(**{"input_ids": torch.tensor([[8, 9, 10]])}).logits.shape == (1, 3, 512)
    budget = {"cpu": "400KB", "disk": "10GB"}  # a small first device forces a split
    device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=model._no_split_modules)
    devices_per_layer = {}
    for name, device in device_map.items():
        if ".layers." in name:
            layer = name.split(".layers.")[0] + ".layers." + name.split(".layers.")[1].split(".")[0]
            devices_per_layer.setdefault(layer, set()).add(device)
    assert len(set(device_map.values())) > 1
    assert all(len(devices) == 1 for devices in devices_per_layer.values())


@pytest.mark.parametrize(
    "preset, token, argument",
    [("llava-tiny", 5, "images"), ("video-tiny", 6, "videos"), ("flamingo-tiny", 5, "images")],
)
def test_placeholders_without_their_media_are_a_clear_error(preset, token, argument):
    """`<image>` (or `<video>`) tokens in input_ids with no pixel_values would run as plain tokens: a prompt given to
    generate() and a training batch are refused, with the count and the fix; token fusion and cross-attention fusion
    alike. An inference forward embeds what it is given (transformers' convention, as LLaVA's)."""
    model = MMLLMForConditionalGeneration(MMLLMConfig.from_preset(preset)).eval()
    ids = torch.tensor([[8, token, token, 9]])
    with pytest.raises(ValueError, match=f"2 <.*> placeholder token\\(s\\) but no {argument} were given"):
        model.generate(input_ids=ids, max_new_tokens=2)  # checked before the prefill, whose cache skips it
    with pytest.raises(
        ValueError, match=f"2 <.*> placeholder token\\(s\\) but no {argument} were given.*pass {argument}="
    ):
        model.train()(input_ids=ids)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
        model(inputs_embeds=model.get_input_embeddings()(ids))  # embeddings: the caller placed the features


def test_a_decode_step_may_carry_a_placeholder_token(tiny_model, processor, images):
    """After a prompt pass with its images, new tokens run without pixel_values, even an `<image>` id that an
    untrained model emits."""
    inputs = processor(images=[images[0]], text=["<image>hi"], return_tensors="pt")
    key = cache_key(tiny_model.model.language_model)
    with torch.no_grad():
        prompt = tiny_model(**inputs, use_cache=True)
        step = tiny_model(input_ids=torch.tensor([[tiny_model.config.image_token_id]]), **{key: prompt[key]})
    assert step.logits.shape == (1, 1, 512)


def test_inputs_past_the_backbones_context_are_a_clear_error(tiny_model):
    """llava-tiny's backbone has 512 positions: a longer forward (cached tokens included) is refused with the lengths
    and the fix; 512 tokens run."""
    context = tiny_model.config.text_config.max_position_embeddings
    assert context == 512
    ids = torch.randint(10, 400, (1, context + 1))
    with pytest.raises(
        ValueError, match="input is 513 tokens, but the backbone's context .* is 512: shorten the prompt"
    ):
        tiny_model(input_ids=ids)
    key = cache_key(tiny_model.model.language_model)
    with torch.no_grad():
        prompt = tiny_model(input_ids=ids[:, :500], use_cache=True)
        assert tiny_model(input_ids=ids[:, 500:512], **{key: prompt[key]}).logits.shape[1] == 12
    with pytest.raises(ValueError, match="513 tokens \\(512 in the cache \\+ 1 new\\)"):
        tiny_model(input_ids=ids[:, 512:], **{key: prompt[key]})


def test_generate_checks_the_context_up_front(tiny_model, caplog):
    """A prompt that fills the context is an error before anything runs; an answer that would run past it is cut to
    fit, with a warning."""
    with pytest.raises(ValueError, match="prompt is 512 tokens .* context .* is 512: no room is left to generate"):
        tiny_model.generate(input_ids=torch.randint(10, 400, (1, 512)), max_new_tokens=1)
    with caplog.at_level("WARNING"):
        output = tiny_model.generate(
            input_ids=torch.randint(10, 400, (1, 500)), max_new_tokens=30, do_sample=False, eos_token_id=None
        )
    assert output.shape == (1, 512)
    assert "The prompt (500 tokens) and the requested answer (30 new tokens) exceed" in caplog.text
    assert "generating at most 12 new tokens" in caplog.text


def test_token_ids_outside_the_vocabulary_are_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="token id 99999, outside the model's vocabulary of 512 ids: encode the text"):
        tiny_model(input_ids=torch.tensor([[1, 99999]]))
    with pytest.raises(ValueError, match="token id -1"):
        tiny_model.generate(input_ids=torch.tensor([[1, -1]]), max_new_tokens=1)


@pytest.mark.parametrize("modality_adaptive", [False, True])
def test_a_chat_continues_from_its_cache(processor, images, modality_adaptive):
    """A chat about an image, generated with its cache returned, then continued by a second `generate` with the whole
    conversation's ids and that cache (no images again: their placeholders are in the cache) equals generating the
    whole conversation from scratch with the image."""
    from helpers import perturb_branches

    model = seeded_model(MMLLMConfig.from_preset("llava-tiny", modality_adaptive=modality_adaptive)).eval()
    if modality_adaptive:
        perturb_branches(model)  # image tokens take their own branch
    greedy = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    first = processor(images=images[:1], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**first, **greedy, return_dict_in_generate=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    turn = processor.tokenizer("<|end|>\n<|user|>\nAnd its shape?<|end|>\n<|assistant|>\n", return_tensors="pt")
    conversation = torch.cat([out.sequences, turn["input_ids"]], dim=1)
    mask = torch.ones_like(conversation)
    with torch.no_grad():
        cached = {cache_key(model.model.language_model): cache}  # `past_key_values` before transformers 5.24
        continued = model.generate(input_ids=conversation, attention_mask=mask, **cached, **greedy)
        scratch = model.generate(
            input_ids=conversation, attention_mask=mask, pixel_values=first["pixel_values"], **greedy
        )
        with pytest.raises(ValueError, match="placeholder token"):  # no cache: the image really is missing
            model.generate(input_ids=conversation, attention_mask=mask, **greedy)
    assert torch.equal(continued, scratch)
