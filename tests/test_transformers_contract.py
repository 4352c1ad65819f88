"""The checks transformers applies to its own LLaVA, written for our classes, with the modality-adaptive module off
and on: save/load round trips, embeddings resizing, attention and hidden-state outputs, tuple outputs, attention
backends, gradient checkpointing, `inputs_embeds`, left padding, every generation mode of a causal LM."""

import copy

import pytest
import torch
from transformers import AutoModelForImageTextToText
from transformers.modeling_outputs import BaseModelOutputWithPooling

from helpers import cache_key, make_images, seeded_model
from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration, MMLLMProcessor

pytestmark = pytest.mark.hub

GREEDY = {"max_new_tokens": 5, "do_sample": False}


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "modality-adaptive"])
def model(request) -> MMLLMForConditionalGeneration:
    return seeded_model(MMLLMConfig.from_preset("llava-tiny", modality_adaptive=request.param))


@pytest.fixture(scope="module")
def processor() -> MMLLMProcessor:
    return MMLLMProcessor.from_preset("llava-tiny")


@pytest.fixture(scope="module")
def inputs(processor):
    return processor(images=make_images(1), text=["<image>What is in the picture?"], return_tensors="pt")


@pytest.fixture(scope="module")
def greedy(model, inputs) -> torch.Tensor:
    return model.generate(**inputs, **GREEDY)


def _logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# --- model checks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shard", [None, "200KB"], ids=["one-file", "sharded"])
def test_save_and_load_round_trip(model, inputs, tmp_path, shard):
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert len(list(tmp_path.glob("*.safetensors"))) > (1 if shard else 0)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert reloaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(tensor, model.state_dict()[key]) for key, tensor in reloaded.state_dict().items())
    if model.config.text_config.tie_word_embeddings:
        assert reloaded.lm_head.weight is reloaded.get_input_embeddings().weight
    torch.testing.assert_close(_logits(reloaded, **inputs), _logits(model, **inputs))


def test_resize_token_embeddings(model, inputs):
    resized = seeded_model(copy.deepcopy(model.config))
    vocab = resized.config.text_config.vocab_size
    resized.resize_token_embeddings(vocab + 10, pad_to_multiple_of=8)
    assert resized.config.text_config.vocab_size == resized.lm_head.out_features == vocab + 16
    assert resized.get_input_embeddings().weight.shape[0] == vocab + 16
    assert _logits(resized, **inputs).shape[-1] == vocab + 16


def test_attentions_and_hidden_states(model, inputs):
    eager = seeded_model(model.config)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True, output_hidden_states=True)
    layers, length = eager.config.text_config.num_hidden_layers, inputs["input_ids"].shape[1]
    assert len(out.hidden_states) == layers + 1 and len(out.attentions) == layers
    assert out.attentions[0].shape[-2:] == (length, length)
    assert out.image_outputs.pooler_output.shape == (
        1,
        model.config.image_seq_length,
        model.config.text_config.hidden_size,
    )


def test_return_dict_false_gives_tuples(model, inputs):
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"], return_dict=False)
        features = model.get_image_features(inputs["pixel_values"], return_dict=False)
    assert isinstance(out, tuple) and out[0].ndim == 0 and out[1].shape[-1] == model.config.text_config.vocab_size
    assert isinstance(features, tuple)


def test_modality_features_follow_transformers_contract(model, inputs):
    features = model.get_image_features(inputs["pixel_values"], output_hidden_states=True)
    assert isinstance(features, BaseModelOutputWithPooling)
    assert features.pooler_output.shape == (1, model.config.image_seq_length, model.config.text_config.hidden_size)
    assert features.hidden_states is not None and features.last_hidden_state is not None
    with pytest.raises(ValueError, match="no <video> token"):
        model.get_video_features(inputs["pixel_values"][None])
    with pytest.raises(ValueError, match="no <audio> token"):
        model.get_audio_features(torch.zeros(1, 80, 3000), torch.ones(1, 3000))


def test_image_features_pooler_output_is_what_fills_the_image_tokens(model, inputs, processor):
    """vLLM's Transformers backend embeds images with `get_image_features(pixel_values, return_dict=True)` and
    scatters `.pooler_output` into the `<image>` positions: it must be exactly what our forward puts there."""
    seen = {}

    def record(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    hook = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
            features = model.get_image_features(inputs["pixel_values"], return_dict=True)
    finally:
        hook.remove()
    placed = seen["embeds"][inputs["input_ids"] == processor.image_token_id]
    torch.testing.assert_close(features.pooler_output.reshape(placed.shape), placed, atol=0, rtol=0)


def test_eager_equals_sdpa(model, inputs):
    eager, sdpa = seeded_model(model.config), seeded_model(model.config)
    eager.set_attn_implementation("eager")
    sdpa.set_attn_implementation("sdpa")
    torch.testing.assert_close(_logits(eager, **inputs), _logits(sdpa, **inputs), atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(model, inputs):
    grads = []
    for checkpointing in (False, True):
        trained = seeded_model(model.config).train()
        if checkpointing:
            trained.gradient_checkpointing_enable()
        trained(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append({name: p.grad for name, p in trained.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)


def test_inputs_embeds_instead_of_input_ids(model, inputs):
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    by_embeds = _logits(
        model,
        inputs_embeds=embeds,
        pixel_values=inputs["pixel_values"],
        attention_mask=inputs["attention_mask"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
    )
    torch.testing.assert_close(by_embeds, _logits(model, **inputs))


def test_left_padded_batch_equals_single_rows(model, processor):
    texts = ["<image>What is in the picture?", "<image>Colour?"]
    batch = processor(images=make_images(2), text=texts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0  # the shorter row is padded on the left
    batched = _logits(model, **batch)[:, -1]
    for row, (image, text) in enumerate(zip(make_images(2), texts)):
        single = _logits(model, **processor(images=[image], text=[text], return_tensors="pt"))[:, -1]
        torch.testing.assert_close(batched[row : row + 1], single, atol=1e-5, rtol=1e-4)


# --- generation modes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode",
    [
        {"use_cache": False},
        {"cache_implementation": "static"},
        {"prompt_lookup_num_tokens": 2},
    ],
    ids=["no-cache", "static-cache", "prompt-lookup"],
)
def test_generation_modes_that_equal_greedy(model, inputs, greedy, mode):
    assert torch.equal(model.generate(**inputs, **GREEDY, **mode), greedy)


def test_assisted_decoding_equals_greedy(model, inputs, greedy):
    assert torch.equal(model.generate(**inputs, **GREEDY, assistant_model=model), greedy)


def test_sampling_is_reproducible(model, inputs):
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=20, temperature=1.5))
    assert torch.equal(*runs) and runs[0].shape[1] == inputs["input_ids"].shape[1] + 5


@pytest.mark.parametrize("sample", [False, True], ids=["beam-search", "beam-sampling"])
def test_beam_search(model, inputs, sample):
    torch.manual_seed(0)
    out = model.generate(
        **inputs,
        max_new_tokens=5,
        num_beams=3,
        do_sample=sample,
        num_return_sequences=2,
        return_dict_in_generate=True,
        output_scores=True,
    )
    assert out.sequences.shape[0] == 2
    assert out.sequences_scores[0] >= out.sequences_scores[1]
    assert torch.equal(out.sequences[:, : inputs["input_ids"].shape[1]], inputs["input_ids"].repeat(2, 1))


def test_num_return_sequences_and_scores_and_logits(model, inputs, greedy):
    out = model.generate(
        **inputs,
        max_new_tokens=5,
        do_sample=True,
        num_return_sequences=3,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    assert out.sequences.shape[0] == 3
    new = out.sequences.shape[1] - inputs["input_ids"].shape[1]
    assert len(out.scores) == len(out.logits) == new
    assert out.logits[0].shape == (3, model.config.text_config.vocab_size)
    plain = model.generate(**inputs, **GREEDY, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(plain.sequences, greedy)
    assert torch.equal(torch.stack(plain.logits, 1).argmax(-1), greedy[:, inputs["input_ids"].shape[1] :])


def test_continue_final_message(model, processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "It is a"}]},
    ]
    prompt = processor.apply_chat_template(messages, continue_final_message=True)
    assert prompt.endswith("It is a")
    inputs = processor(images=make_images(1), text=[prompt], return_tensors="pt")
    assert model.generate(**inputs, **GREEDY).shape[1] == inputs["input_ids"].shape[1] + 5


def test_contrastive_search_names_its_limitation(model, inputs):
    """transformers 5 moved contrastive search to a Hub repository: it needs that download (and remote code)."""
    with pytest.raises(ValueError, match="Contrastive Search requires `trust_remote_code=True`"):
        model.generate(**inputs, **GREEDY, penalty_alpha=0.6, top_k=4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the offloaded cache works")
def test_offloaded_cache_without_a_gpu_is_a_clear_error(model, inputs):
    with pytest.raises(ValueError, match="offloaded cache moves layers between a GPU and the CPU"):
        model.generate(**inputs, **GREEDY, cache_implementation="offloaded")


def test_weights_missing_from_a_folder_get_each_sub_models_own_init(model, tmp_path):
    """transformers fills missing weights with each sub-model's init (CLIP's attention has its own), as for LLaVA."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if ".vision_tower." not in k},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    built = MMLLMForConditionalGeneration(model.config)
    for module in (reloaded, built):
        module.std = module.model.vision_tower.encoder.layers[0].self_attn.q_proj.weight.std().item()
    assert 0.8 < reloaded.std / built.std < 1.25 and abs(reloaded.std - 0.02) > 0.02


def test_tensor_parallel_plan_covers_every_branch(model):
    import re

    plan = model.model.language_model._tp_plan
    patterns = [re.compile(key.replace(".", r"\.").replace("*", r"\d+") + "$") for key in plan]
    for name, _ in model.model.language_model.named_modules():
        if name.endswith(("k_proj", "v_proj", "q_proj", "o_proj")):
            assert any(pattern.match(name) for pattern in patterns), name


def test_compile_fullgraph_is_declared_honestly(model, inputs):
    """generate() compiles decode steps with `fullgraph=model._can_compile_fullgraph`: a whole-model decode step
    with a static cache must trace in one graph, with the module on or off."""
    from torch._dynamo.testing import CompileCounter
    from transformers import StaticCache

    assert model._can_compile_fullgraph
    cache = StaticCache(config=model.config.text_config, max_cache_len=inputs["input_ids"].shape[1] + 2)
    key = cache_key(model.model.language_model)
    with torch.no_grad():
        next_ids = model(**inputs, **{key: cache}).logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(next_ids)], 1)
        step = {"input_ids": next_ids, "attention_mask": mask, "position_ids": mask.cumsum(-1)[:, -1:] - 1}
        counter = CompileCounter()
        torch._dynamo.reset()
        torch.compile(model, backend=counter, fullgraph=True)(**step, **{key: cache})
        torch._dynamo.reset()
    assert counter.frame_count == 1
