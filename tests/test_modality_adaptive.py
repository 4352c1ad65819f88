"""Modality-adaptive module: correctness properties on Llama, Mistral and Qwen2 (GQA, q/k/v bias) backbones."""

import copy
import threading

import pytest
import torch

from helpers import make_images, perturb_branches, seeded_model, tiny_text_config, tiny_vision_config
from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration, MMLLMProcessor

pytestmark = pytest.mark.hub

GREEDY = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)


def _config(kind: str, **fields) -> MMLLMConfig:
    return MMLLMConfig(
        vision_config=tiny_vision_config("clip").to_dict(),
        text_config=tiny_text_config(kind).to_dict(),
        image_token_id=5,
        **fields,
    )


@pytest.fixture(scope="module")
def processor():
    return MMLLMProcessor.from_preset("llava-tiny")


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "llama:all", "qwen2:all"])
def models(request):
    """The plain model and the same weights with the module on (branches = copies of the text branch): mPLUG-Owl2's
    K/V and norms, or (`:all`) CogVLM's visual expert."""
    kind, _, parts = request.param.partition(":")
    plain = seeded_model(_config(kind))
    adaptive = copy.deepcopy(plain)
    adaptive.config.modality_adaptive_parts = parts or "kv_norms"
    adaptive.enable_modality_adaptive()
    return plain, adaptive


@pytest.fixture(scope="module")
def inputs(processor):
    text = processor(text=["A question with no image at all."], return_tensors="pt")
    image = processor(images=make_images(1), text=["Look: <image> what colour is it?"], return_tensors="pt")
    padded = processor(
        images=make_images(2, seed=3),
        text=["<image> short", "A longer prompt before <image> it"],
        return_tensors="pt",
        padding=True,
    )
    return text, image, padded


def test_text_only_is_bit_identical(models, inputs):
    plain, adaptive = models
    with torch.no_grad():
        assert torch.equal(plain(**inputs[0]).logits, adaptive(**inputs[0]).logits)


def test_branches_equal_to_text_give_the_plain_model(models, inputs):
    plain, adaptive = models
    with torch.no_grad():
        torch.testing.assert_close(adaptive(**inputs[1]).logits, plain(**inputs[1]).logits, atol=1e-6, rtol=0)


def test_a_modality_branch_changes_only_its_tokens_and_what_follows(models, inputs):
    _, adaptive = models
    changed = copy.deepcopy(adaptive)
    perturb_branches(changed)
    batch = inputs[1]
    first_image = int((batch["mm_token_type_ids"][0] == 1).nonzero()[0])
    with torch.no_grad():
        before, after = adaptive(**batch).logits[0], changed(**batch).logits[0]
    assert torch.equal(before[:first_image], after[:first_image])
    assert (before[first_image:] - after[first_image:]).abs().amax(-1).min() > 0


def test_cached_generation_equals_uncached_and_padding_keeps_rows(models, processor, inputs):
    _, adaptive = models
    model = copy.deepcopy(adaptive)
    perturb_branches(model)
    padded = inputs[2]
    assert torch.equal(
        model.generate(**padded, use_cache=True, **GREEDY), model.generate(**padded, use_cache=False, **GREEDY)
    )
    with torch.no_grad():
        batched = model(**padded).logits
    batched_ids = model.generate(**padded, **GREEDY)[:, -GREEDY["max_new_tokens"] :]
    for row, (image, text) in enumerate(
        zip(make_images(2, seed=3), ["<image> short", "A longer prompt before <image> it"])
    ):
        alone = processor(images=[image], text=[text], return_tensors="pt")
        with torch.no_grad():
            logits = model(**alone).logits[0]
        # float noise only (a padding leak moves logits by far more); the visual expert's perturbed MLP branches
        # make the largest activations, whose summation order differs by up to 3e-5 between the two batches
        torch.testing.assert_close(batched[row, -logits.shape[0] :], logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(model.generate(**alone, **GREEDY)[0, -GREEDY["max_new_tokens"] :], batched_ids[row])


def test_routing_derived_when_mm_token_type_ids_absent(models, inputs):
    _, adaptive = models
    model = copy.deepcopy(adaptive)
    perturb_branches(model)
    batch = dict(inputs[1])
    with torch.no_grad():
        explicit = model(**batch).logits
        derived = model(**{k: v for k, v in batch.items() if k != "mm_token_type_ids"}).logits
        text_routing = model(**{**batch, "mm_token_type_ids": torch.zeros_like(batch["mm_token_type_ids"])}).logits
    assert torch.equal(explicit, derived)
    assert not torch.allclose(explicit, text_routing)


def test_eager_sdpa_and_gradient_checkpointing(models, inputs):
    _, adaptive = models
    batch = inputs[1]
    labels = batch["input_ids"].masked_fill(batch["mm_token_type_ids"].bool(), -100)
    grads, logits = [], {}
    for implementation, checkpointing in (("eager", False), ("sdpa", False), ("sdpa", True)):
        model = copy.deepcopy(adaptive).train()
        perturb_branches(model)
        model.set_attn_implementation(implementation)
        if checkpointing:
            model.gradient_checkpointing_enable()
        out = model(**batch, labels=labels)
        out.loss.backward()
        logits[implementation] = out.logits.detach()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(logits["eager"], logits["sdpa"], atol=1e-4, rtol=1e-4)
    assert any("multiway.1" in name for name in grads[2])  # the image branch trains under checkpointing
    for name in grads[1]:
        torch.testing.assert_close(grads[1][name], grads[2][name], atol=1e-6, rtol=1e-4)


def test_threads_route_independently(models, inputs):
    _, adaptive = models
    model = copy.deepcopy(adaptive)
    perturb_branches(model)
    with torch.no_grad():
        expected = [model(**inputs[0]).logits, model(**inputs[1]).logits]
    results, errors = {}, []

    def run(index):
        try:
            with torch.no_grad():
                results[index] = [model(**inputs[index % 2]).logits for _ in range(5)]
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for index, runs in results.items():
        assert all(torch.equal(r, expected[index % 2]) for r in runs)


def test_new_branches_are_copies_and_listed():
    model = seeded_model(_config("llama"))
    model.enable_modality_adaptive(layers=[1], modalities=[1, 3])
    layer = model.model.language_model.layers[1]
    for owner in (layer.self_attn, layer):
        assert set(owner.multiway) == {"0", "1", "3"}
        for key in ("1", "3"):
            assert all(
                torch.equal(a, b) for a, b in zip(owner.multiway[key].parameters(), owner.multiway["0"].parameters())
            )
    assert "multiway" not in model.model.language_model.layers[0]._modules
    names = {id(p) for p in model.modality_adaptive_parameters()}
    expected = [p for n, p in model.named_parameters() if ".multiway.1." in n or ".multiway.3." in n]
    assert names == {id(p) for p in expected} and len(expected) == 8
    assert model.config.modality_adaptive and model.config.modality_adaptive_layers == [1]
    with pytest.raises(ValueError, match="already on"):
        model.enable_modality_adaptive()


def test_n_modalities_route_each_to_its_branch(processor):
    model = seeded_model(_config("qwen2", modality_adaptive=True, modality_adaptive_modalities=[1, 2, 3]))
    batch = processor(text=["one two three four five six"], return_tensors="pt")
    routing = torch.zeros_like(batch["input_ids"])
    routing[0, 2:4], routing[0, 4:6] = 2, 3  # pretend these are video and audio tokens
    embeds = model.get_input_embeddings()(batch["input_ids"])  # embeddings keep their given routing
    routed = {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"], "mm_token_type_ids": routing}
    with torch.no_grad():
        reference = model(**routed).logits
        perturb_branches(model, modality=3)
        changed = model(**routed).logits
    assert torch.equal(reference[0, :4], changed[0, :4]) and not torch.allclose(reference[0, 4:], changed[0, 4:])


def test_backbone_without_llama_modules_is_a_clear_error():
    with pytest.raises(ValueError, match="'gpt2' backbone.*c_attn"):
        MMLLMForConditionalGeneration(_config("gpt2", modality_adaptive=True))


def test_save_and_reload_keeps_the_branches(tmp_path):
    model = seeded_model(_config("mistral", modality_adaptive=True))
    perturb_branches(model)
    model.save_pretrained(tmp_path)
    reloaded = MMLLMForConditionalGeneration.from_pretrained(tmp_path)
    state = model.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in reloaded.state_dict().items())


def test_a_folders_weights_file_loads_by_hand_with_its_on_disk_names(tmp_path):
    """The Trainer resumes with `load_state_dict(load_file(...))`: mPLUG-Owl2's on-disk names must land."""
    from safetensors.torch import load_file

    model = seeded_model(_config("llama", modality_adaptive=True))
    perturb_branches(model)
    model.save_pretrained(tmp_path)
    on_disk = load_file(tmp_path / "model.safetensors")
    assert any(".k_proj.multiway.1." in key for key in on_disk)
    fresh = seeded_model(_config("llama", modality_adaptive=True), seed=1)
    fresh.load_state_dict(on_disk, strict=True)
    assert all(torch.equal(tensor, model.state_dict()[key]) for key, tensor in fresh.state_dict().items())


def test_visual_expert_branches_every_projection_the_mlp_and_the_norms(tmp_path):
    """`modality_adaptive_parts="all"` (CogVLM): q/k/v/o, the MLP and both norms get an image branch; the folder keeps
    the on-disk names and reloads them; the tensor-parallel plan names every branch."""
    model = seeded_model(_config("llama", modality_adaptive=True, modality_adaptive_parts="all"))
    layer = model.model.language_model.layers[0]
    assert set(layer.self_attn.multiway["1"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(layer.multiway["1"]) == {"input_layernorm", "post_attention_layernorm", "mlp"}
    plain = sum(p.numel() for p in seeded_model(_config("llama")).model.language_model.layers.parameters())
    branches = sum(p.numel() for p in model.modality_adaptive_parameters())
    assert branches == plain  # the expert doubles every decoder layer
    perturb_branches(model)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    on_disk = load_file(tmp_path / "model.safetensors")
    assert any(".mlp.multiway.1.gate_proj." in key for key in on_disk)
    assert any(".q_proj.multiway.1." in key for key in on_disk)
    reloaded = MMLLMForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.config.modality_adaptive_parts == "all"
    state = model.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in reloaded.state_dict().items())
    plan = model.model.language_model._tp_plan or {}
    if plan:
        assert "layers.*.multiway.*.mlp.gate_proj" in plan and "layers.*.self_attn.multiway.*.q_proj" in plan


def test_unknown_parts_are_a_clear_error():
    with pytest.raises(ValueError, match="modality_adaptive_parts='qkv'.*kv_norms.*all"):
        _config("llama", modality_adaptive=True, modality_adaptive_parts="qkv")
