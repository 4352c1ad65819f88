"""Cross-attention fusion (Flamingo, IDEFICS): gated blocks that start closed, attention to the latest image only,
both pixel_values layouts, KV-cached generation with latents computed once, gradient checkpointing, clear errors."""

import pytest
import torch

from helpers import open_gates, seeded_model
from modeling_mmllm import MMLLMConfig
from modeling_mmllm.gated_cross_attention import cross_attention_blocks, latest_image_mask

pytestmark = pytest.mark.hub

IMAGE = 5  # flamingo-tiny's <image> id
# Row 0: two images (text before the first); row 1 left-padded, one image.
IDS = torch.tensor([[7, 8, IMAGE, 9, 10, 11, IMAGE, 12, 13], [0, 0, 0, 7, IMAGE, 9, 10, 11, 12]])
MASK = (IDS != 0).long()
GENERATE = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": None}


@pytest.fixture(scope="module")
def closed():
    """A fresh flamingo-tiny: every gate at tanh(0) = 0."""
    return seeded_model(MMLLMConfig.from_preset("flamingo-tiny"))


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def plain_logits(model, input_ids, attention_mask=None):
    """The backbone alone (no blocks run without images) with the LM head."""
    with torch.no_grad():
        hidden = model.model.language_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return model.lm_head(hidden)


def logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_a_block_before_every_nth_layer_and_one_token_per_image():
    config = MMLLMConfig.from_preset(
        "flamingo-tiny", text_config={"num_hidden_layers": 4}, cross_attention_config={"cross_layer_interval": 2}
    )
    model = seeded_model(config)
    fused = [i for i, layer in enumerate(model.model.language_model.layers) if "gated_cross_attn" in layer._modules]
    assert fused == [0, 2]
    assert {"CrossAttentionLlamaDecoderLayer", "LlamaDecoderLayer"} <= model._no_split_modules  # device_map="auto"
    assert config.image_seq_length == 1 and config.projected_seq_length() == 8
    # IDEFICS's latents keep the encoder's width; the blocks' keys and values map it to the LLM's.
    assert model.model.multi_modal_projector.linear is None
    assert cross_attention_blocks(model)[0].cross_attn.k_proj.in_features == config.vision_config.hidden_size


def test_closed_gates_give_the_plain_llm_with_images(closed, pixels):
    assert torch.equal(
        logits(closed, input_ids=IDS, attention_mask=MASK, pixel_values=pixels), plain_logits(closed, IDS, MASK)
    )


def test_text_without_images_is_the_plain_llm_with_open_gates(closed, fusion_model):
    text = torch.tensor([[7, 8, 9, 10, 11]])
    assert torch.equal(logits(fusion_model, input_ids=text), plain_logits(fusion_model, text))


def test_images_matter_and_each_token_sees_only_the_latest_image(fusion_model, pixels):
    base = logits(fusion_model, input_ids=IDS, attention_mask=MASK, pixel_values=pixels)
    assert (base - plain_logits(fusion_model, IDS, MASK)).abs().max() > 1e-2
    attended = []
    hook = cross_attention_blocks(fusion_model)[0].cross_attn.register_forward_hook(
        lambda module, args, output: attended.append(output)
    )
    try:
        logits(fusion_model, input_ids=IDS, attention_mask=MASK, pixel_values=pixels)
        changed = pixels.clone()
        changed[0] = -changed[0]  # row 0's first image
        logits(fusion_model, input_ids=IDS, attention_mask=MASK, pixel_values=changed)
    finally:
        hook.remove()
    first, second = attended
    assert not torch.allclose(first[0, 2:6], second[0, 2:6])  # from the first <image> on: its image
    assert torch.equal(first[0, 6:], second[0, 6:])  # from the second <image> on: only the second image
    assert torch.equal(first[1], second[1])  # another row's image


def test_tokens_before_any_image_get_no_cross_attention_output(fusion_model, pixels):
    """With the dense gate closed, only cross-attention adds to the residual: positions before a row's first
    <image> then equal the plain LLM exactly (IDEFICS's cross_attention_gate)."""
    saved = [block.alpha_dense.detach().clone() for block in cross_attention_blocks(fusion_model)]
    try:
        for block in cross_attention_blocks(fusion_model):
            block.alpha_dense.data.zero_()
        fused = logits(fusion_model, input_ids=IDS, attention_mask=MASK, pixel_values=pixels)
    finally:
        for block, alpha in zip(cross_attention_blocks(fusion_model), saved):
            block.alpha_dense.data.copy_(alpha)
    plain = plain_logits(fusion_model, IDS, MASK)
    assert torch.equal(fused[0, :2], plain[0, :2]) and torch.equal(fused[1, 3:4], plain[1, 3:4])
    assert not torch.allclose(fused[0, 2:], plain[0, 2:])


def test_idefics_layout_explicit_mask_and_default_agree(fusion_model, pixels):
    flat = logits(fusion_model, input_ids=IDS, attention_mask=MASK, pixel_values=pixels)
    padded = torch.zeros(2, 2, 3, 32, 32)
    padded[0], padded[1, 0] = pixels[:2], pixels[2]
    padded[1, 1] = 7.0  # a padding slot: never attended to
    assert torch.equal(logits(fusion_model, input_ids=IDS, attention_mask=MASK, pixel_values=padded), flat)
    mask = latest_image_mask(IDS, IMAGE, 2)
    assert mask[0, :2].sum() == 0 and mask[0, 2:6, 0].all() and mask[0, 6:, 1].all() and mask[1, 4:, 0].all()
    explicit = logits(fusion_model, input_ids=IDS, attention_mask=MASK, pixel_values=pixels, image_attention_mask=mask)
    assert torch.equal(explicit, flat)
    both = mask.clone()
    both[0, 6:, 0] = 1  # the caller's mask: after the second image, attend to both
    assert not torch.allclose(
        logits(fusion_model, input_ids=IDS, attention_mask=MASK, pixel_values=pixels, image_attention_mask=both), flat
    )


def test_cached_generation_equals_uncached_and_encodes_images_once(fusion_model, pixels):
    calls = []
    hook = fusion_model.model.multi_modal_projector.register_forward_hook(lambda *args: calls.append(1))
    try:
        cached = fusion_model.generate(input_ids=IDS, attention_mask=MASK, pixel_values=pixels, **GENERATE)
    finally:
        hook.remove()
    assert len(calls) == 1  # the prompt's latents serve every decoding step
    uncached = fusion_model.generate(
        input_ids=IDS, attention_mask=MASK, pixel_values=pixels, use_cache=False, **GENERATE
    )
    assert torch.equal(cached, uncached)
    # Greedy decoding by hand, full sequence every step, agrees too.
    sequence, mask = IDS, MASK
    for _ in range(GENERATE["max_new_tokens"]):
        step = logits(fusion_model, input_ids=sequence, attention_mask=mask, pixel_values=pixels)[:, -1].argmax(-1)
        sequence, mask = torch.cat([sequence, step[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(cached, sequence)
    # A caller's image_attention_mask grows by its last row, as in IDEFICS.
    mask = latest_image_mask(IDS, IMAGE, 2)
    given = fusion_model.generate(
        input_ids=IDS, attention_mask=MASK, pixel_values=pixels, image_attention_mask=mask, **GENERATE
    )
    assert torch.equal(given, cached)


def test_beams_and_return_sequences_keep_each_rows_images(fusion_model, pixels):
    """Generation repeats each row: flattened images must follow their row (a row with two images included)."""
    beams = {"num_beams": 2, "num_return_sequences": 2, **GENERATE}
    padded = torch.zeros(2, 2, 3, 32, 32)
    padded[0], padded[1, 0] = pixels[:2], pixels[2]
    flat = fusion_model.generate(input_ids=IDS, attention_mask=MASK, pixel_values=pixels, **beams)
    assert torch.equal(flat, fusion_model.generate(input_ids=IDS, attention_mask=MASK, pixel_values=padded, **beams))


def test_gradient_checkpointing_trains_the_resampler_and_the_gates(pixels):
    def gradients(checkpointing: bool) -> dict:
        model = open_gates(seeded_model(MMLLMConfig.from_preset("flamingo-tiny"))).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(input_ids=IDS, attention_mask=MASK, pixel_values=pixels, labels=IDS).loss.backward()
        return {
            name: p.grad for name, p in model.named_parameters() if "gated_cross_attn" in name or "projector" in name
        }

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and all(grad is not None for grad in checkpointed.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)
    assert checkpointed["model.language_model.layers.0.gated_cross_attn.alpha_cross_attn"].abs() > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"modality_adaptive": True}, "does not combine with modality_adaptive"),
        ({"image_grid_pinpoints": [[32, 64]]}, "does not combine with image_grid_pinpoints"),
        ({"cross_attention_config": {"cross_layer_interval": 3}}, "cross_layer_interval=3"),
        ({"cross_attention_config": {"alpha_type": "matrix"}}, "alpha_type='matrix'"),
        ({"cross_attention_config": {"interval": 2}}, "does not use"),
        ({"fusion": "concat"}, "Unknown fusion"),
        ({"image_seq_length": 8}, "1 token(s) in the text"),
    ],
)
def test_config_errors_name_the_setting(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MMLLMConfig.from_preset("flamingo-tiny", **overrides)


def test_backbones_without_llama_layers_are_refused():
    config = MMLLMConfig.from_preset(
        "flamingo-tiny", text_config={"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 512}
    )
    with pytest.raises(ValueError, match="Cross-attention fusion needs a Llama-style backbone.*fusion='tokens'"):
        seeded_model(config)


def test_inputs_that_do_not_fit_are_refused(fusion_model, pixels):
    with pytest.raises(ValueError, match="3 image\\(s\\) but 2 <image> token"):
        fusion_model(input_ids=IDS[:1], pixel_values=pixels)
    with pytest.raises(ValueError, match="image_attention_mask has shape"):
        fusion_model(input_ids=IDS, pixel_values=pixels, image_attention_mask=torch.ones(2, 9, 3))
    with pytest.raises(ValueError, match="do not fit the <image> tokens"):
        fusion_model(input_ids=IDS, pixel_values=torch.zeros(2, 1, 3, 32, 32))


def test_interleaved_few_shot_prompts(fusion_model, fusion_processor, images):
    """Several image/answer pairs, then a query image: one <image> token each, each answer after its own image."""
    question = {"type": "text", "text": "What colour?"}
    conversation = []
    for answer in ("red", "blue"):
        conversation += [{"role": "user", "content": [{"type": "image"}, question]}]
        conversation += [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    conversation += [{"role": "user", "content": [{"type": "image"}, question]}]
    prompt = fusion_processor.apply_chat_template(conversation, add_generation_prompt=True)
    plain = "<image>A red one.<image>A blue one.<image>A"
    inputs = fusion_processor(images=[images[:3], images[:3]], text=[prompt, plain], padding=True, return_tensors="pt")
    ids = inputs["input_ids"]
    assert (ids == IMAGE).sum(-1).tolist() == [3, 3] and len(inputs["pixel_values"]) == 6
    latest = latest_image_mask(ids, IMAGE, 3).argmax(-1)
    red = fusion_processor.tokenizer("red", add_special_tokens=False)["input_ids"]
    positions = [i for i in range(ids.shape[1] - len(red)) if ids[0, i : i + len(red)].tolist() == red]
    assert positions and all(latest[0, i] == 0 for i in positions)  # the first answer follows the first image
    assert latest[:, -1].tolist() == [2, 2]  # the prompt's end: the query image
    query = logits(fusion_model, **inputs)[:, -1]
    other = dict(inputs, pixel_values=inputs["pixel_values"].clone())
    other["pixel_values"][[2, 5]] = -other["pixel_values"][[2, 5]]  # another query image in both rows
    assert (logits(fusion_model, **other)[:, -1] - query).abs().amax(-1).min() > 1e-3
    generated = fusion_model.generate(**inputs, **GENERATE)
    assert generated.shape == (2, ids.shape[1] + GENERATE["max_new_tokens"])


def test_eager_and_sdpa_attention_agree(pixels):
    model = open_gates(seeded_model(MMLLMConfig.from_preset("flamingo-tiny")))
    sdpa = logits(model, input_ids=IDS, attention_mask=MASK, pixel_values=pixels)
    model.set_attn_implementation("eager")
    assert cross_attention_blocks(model)[0].cross_attn.config._attn_implementation == "eager"
    eager = logits(model, input_ids=IDS, attention_mask=MASK, pixel_values=pixels)
    torch.testing.assert_close(eager[MASK.bool()], sdpa[MASK.bool()], atol=1e-4, rtol=0)


def test_reduced_precision_masks_stay_finite(fusion_model, pixels):
    """Under bf16 autocast (the Trainer's bf16=True on float32 weights) tokens that attend to no image still get
    finite gradients: the additive mask is built in the attention's dtype, and such tokens see every latent."""
    model = open_gates(seeded_model(MMLLMConfig.from_preset("flamingo-tiny"))).train()
    model.set_attn_implementation("eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=IDS, attention_mask=MASK, pixel_values=pixels, labels=IDS).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_gates_missing_from_a_folder_start_closed(fusion_model, tmp_path):
    from safetensors.torch import load_file, save_file

    fusion_model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if ".alpha_" not in k}, tmp_path / "model.safetensors", {"format": "pt"}
    )
    loaded = type(fusion_model).from_pretrained(tmp_path)
    assert all(
        block.alpha_cross_attn.item() == 0 and block.alpha_dense.item() == 0 for block in cross_attention_blocks(loaded)
    )


def test_fusion_inputs_are_checked(fusion_model, pixels):
    latents = fusion_model(input_ids=IDS, attention_mask=MASK, pixel_values=pixels).cross_attention_states
    with torch.no_grad(), pytest.raises(ValueError, match="need image_attention_mask"):
        fusion_model(input_ids=IDS[:, -1:], cross_attention_states=latents)
    token_model = seeded_model(MMLLMConfig.from_preset("resampler-tiny"))
    with pytest.raises(ValueError, match="fusion='tokens'"):
        token_model(input_ids=IDS, image_attention_mask=torch.ones(2, 9, 1))
    with pytest.raises(ValueError, match="does not combine with cross-attention fusion"):
        seeded_model(MMLLMConfig.from_preset("flamingo-tiny")).enable_modality_adaptive()
    with pytest.raises(ValueError, match="cross_attention_config is set but fusion='tokens'"):
        MMLLMConfig.from_preset("resampler-tiny", cross_attention_config={"cross_layer_interval": 2})
    with pytest.raises(ValueError, match="qk_layer_norms='false'"):
        MMLLMConfig.from_preset("flamingo-tiny", cross_attention_config={"qk_layer_norms": "false"})
