"""torch.compile and the static cache: a modality-adaptive decode step traces in one graph and equals eager; every
preset family decodes the same tokens with `cache_implementation="static"`; a compiled forward does not recompile
per decoded token."""

import copy

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounter
from transformers import StaticCache

from helpers import cache_key, make_images, perturb_branches, seeded_model
from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration, MMLLMProcessor

pytestmark = pytest.mark.hub

GREEDY = dict(max_new_tokens=6, do_sample=False)
FAMILIES = ["llava-tiny", "owl2-tiny", "blip2-tiny", "resampler-tiny", "audio-tiny", "flamingo-tiny"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(preset: str) -> MMLLMForConditionalGeneration:
    model = seeded_model(MMLLMConfig.from_preset(preset))
    if model.config.modality_adaptive:
        for modality in model.config.modality_adaptive_modalities:
            perturb_branches(model, modality, seed=modality)  # routing matters
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # well-separated greedy choices
    return model


def _inputs(preset: str) -> dict:
    """Two left-padded rows of different lengths, each with its preset's media."""
    processor = MMLLMProcessor.from_preset(preset)
    processor.tokenizer.padding_side = "left"
    if preset == "audio-tiny":
        rate = processor.feature_extractor.sampling_rate
        clips = [np.sin(np.linspace(0, 400 * seconds, int(rate * seconds))).astype(np.float32) for seconds in (1, 2)]
        texts = ["<image><audio> what is it?", "Listen: <audio> and look <image> closely"]
        return processor(
            images=make_images(2), audio=clips, text=texts, sampling_rate=rate, padding=True, return_tensors="pt"
        )
    texts = ["<image> short", "A longer prompt before <image> it"]
    return processor(images=make_images(2), text=texts, padding=True, return_tensors="pt")


@pytest.fixture(scope="module")
def owl2():
    return _model("owl2-tiny"), _inputs("owl2-tiny")


def _decode_step(model, batch) -> dict:
    """The backbone's inputs for one new (text) token per row after the prompt, with the prompt's cache."""
    language_model = model.model.language_model
    with torch.no_grad():
        prompt = model.model(**batch, use_cache=True)
        next_ids = model.lm_head(prompt.last_hidden_state[:, -1:]).argmax(-1)
    cache = prompt[cache_key(language_model)]
    attention_mask = torch.cat([batch["attention_mask"], torch.ones_like(next_ids)], dim=1)
    return {
        "inputs_embeds": model.get_input_embeddings()(next_ids),
        "attention_mask": attention_mask,
        "position_ids": attention_mask.cumsum(-1)[:, -1:] - 1,
        cache_key(language_model): cache,
        "mm_token_type_ids": torch.zeros_like(next_ids),
        "use_cache": True,
    }


def test_a_modality_adaptive_decode_step_compiles_fullgraph_and_equals_eager(owl2):
    model, batch = owl2
    language_model = model.model.language_model
    step = _decode_step(model, batch)
    key = cache_key(language_model)
    compiled = torch.compile(language_model, fullgraph=True)
    with torch.no_grad():
        eager = language_model(**{**step, key: copy.deepcopy(step[key])}).last_hidden_state
        traced = compiled(**{**step, key: copy.deepcopy(step[key])}).last_hidden_state
    torch.testing.assert_close(traced, eager, atol=1e-5, rtol=1e-4)
    assert torch.equal(model.lm_head(traced).argmax(-1), model.lm_head(eager).argmax(-1))


def test_a_routed_prompt_traces_in_one_graph(owl2):
    """Image and text tokens in one pass: the routing is chosen on the device, no graph break, no host sync."""
    model, batch = owl2
    language_model = model.model.language_model
    embeds = model.get_input_embeddings()(batch["input_ids"])
    routed = {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"]}
    routed["mm_token_type_ids"] = batch["mm_token_type_ids"]
    assert batch["mm_token_type_ids"].bool().any() and not batch["mm_token_type_ids"].bool().all()
    counter = CompileCounter()
    with torch.no_grad():
        eager = language_model(**routed).last_hidden_state
        traced = torch.compile(language_model, backend=counter, fullgraph=True)(**routed).last_hidden_state
        text_only = language_model(**{**routed, "mm_token_type_ids": None}).last_hidden_state
    assert counter.frame_count == 1
    torch.testing.assert_close(traced, eager)
    assert not torch.allclose(eager, text_only)  # the image tokens did take their own branch


def test_every_family_declares_fullgraph_compile_honestly():
    for preset in FAMILIES:
        model = MMLLMForConditionalGeneration(MMLLMConfig.from_preset(preset))
        assert model._can_compile_fullgraph is (model.config.fusion != "cross_attention"), preset


@pytest.mark.parametrize("preset", FAMILIES)
def test_static_cache_decodes_the_dynamic_cache_tokens(preset):
    model, batch = _model(preset), _inputs(preset)
    scored = dict(GREEDY, output_scores=True, return_dict_in_generate=True)
    dynamic = model.generate(**batch, **scored)
    static = model.generate(**batch, **scored, cache_implementation="static")
    assert torch.equal(static.sequences, dynamic.sequences)
    for static_scores, dynamic_scores in zip(static.scores, dynamic.scores, strict=True):
        torch.testing.assert_close(static_scores, dynamic_scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preset", ["llava-tiny", "owl2-tiny"])
def test_a_compiled_forward_does_not_recompile_per_token(preset):
    """`model.forward = torch.compile(model.forward)` with a static cache: the prompt (with the graph breaks of
    transformers' own vision towers) and the first decode steps compile; a second, longer generation compiles
    nothing more, and gives the eager tokens."""
    model, batch = _model(preset), _inputs(preset)
    length = batch["input_ids"].shape[1] + 12
    key = cache_key(model.model.language_model)

    def generate(new_tokens: int) -> torch.Tensor:
        cache = StaticCache(config=model.config.text_config, max_cache_len=length)
        return model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, **{key: cache})

    eager = generate(12)
    counter = CompileCounter()
    model.forward = torch.compile(model.forward, backend=counter)
    try:
        assert torch.equal(generate(4)[:, : eager.shape[1] - 8], eager[:, :-8])
        compiled_frames = counter.frame_count
        assert torch.equal(generate(12), eager)
    finally:
        del model.forward
    assert compiled_frames > 0
    assert counter.frame_count == compiled_frames, f"{counter.frame_count - compiled_frames} recompilations"
