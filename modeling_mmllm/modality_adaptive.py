"""Modality-adaptive module (mPLUG-Owl2): per-modality K/V projections and layer norms inside the LLM.

In each selected decoder layer, `self_attn.k_proj`, `self_attn.v_proj`, `input_layernorm` and
`post_attention_layernorm` become `Multiway` modules with one branch per modality (`multiway.0` is text, then one
per extra modality id: 1 image, 2 video, 3 audio); `q_proj`, `o_proj`, the MLP and the final norm stay shared.
Every token goes through its own modality's branch only (gather/scatter).

Routing travels as the `mm_token_type_ids` keyword argument into each decoder layer's `forward`, which transformers'
decoder models pass through. The layer's class is extended with a `forward` that publishes the routing in a
context variable for the duration of the call, so gradient checkpointing (which re-runs `forward`) routes the same
way; the value is local to the running thread or task, never shared.
"""

import contextlib
import copy
from collections.abc import Iterator, Sequence
from contextvars import ContextVar

import torch
from torch import nn

TEXT = 0
MULTIWAY_MODULES = ("self_attn.k_proj", "self_attn.v_proj", "input_layernorm", "post_attention_layernorm")

_ROUTING: ContextVar[torch.Tensor | None] = ContextVar("mmllm_modality_routing", default=None)
_ADAPTIVE_CLASSES: dict[type, type] = {}


class Multiway(nn.Module):
    """One copy of a module per modality; each token runs through its modality's copy only.

    Tokens of a modality without a branch use the text branch. With text tokens only (or no routing), the text
    branch runs on the whole tensor: exactly the original module's computation.
    """

    def __init__(self, text_branch: nn.Module, modalities: Sequence[int]):
        super().__init__()
        branches = {str(TEXT): text_branch}
        branches.update({str(modality): _copy_branch(text_branch) for modality in modalities})
        self.multiway = nn.ModuleDict(branches)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        routing = _ROUTING.get()
        text_branch = self.multiway[str(TEXT)]
        if routing is None:
            return text_branch(hidden_states)
        routing = routing[..., -hidden_states.shape[-2]:].to(hidden_states.device).reshape(-1)
        extra = {int(key): branch for key, branch in self.multiway.items() if int(key) != TEXT}
        masks = {modality: routing == modality for modality in extra}
        present = {modality: mask for modality, mask in masks.items() if bool(mask.any())}
        if not present:
            return text_branch(hidden_states)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        text_mask = ~torch.stack(list(present.values())).any(0)
        groups = [(text_branch, text_mask)] + [(extra[modality], mask) for modality, mask in present.items()]
        output = None
        for branch, mask in groups:
            index = mask.nonzero(as_tuple=True)[0]
            if index.numel() == 0:
                continue
            result = branch(flat.index_select(0, index))
            if output is None:
                output = result.new_zeros(flat.shape[0], result.shape[-1])
            output = output.index_copy(0, index, result)
        return output.reshape(*hidden_states.shape[:-1], -1)


def _copy_branch(text_branch: nn.Module) -> nn.Module:
    """A copy of the text branch with its full weights, also when DeepSpeed ZeRO-3 has partitioned them.

    Under ZeRO-3 the weights are gathered for the copy, and the copy's parameters are plain ones (DeepSpeed
    partitions them when it wraps the model), not aliases of the original's partitions.
    """
    with _gathered(text_branch):
        branch = copy.deepcopy(text_branch)
        for module in branch.modules():
            for name, parameter in module.named_parameters(recurse=False):
                if hasattr(parameter, "ds_id"):
                    module._parameters[name] = nn.Parameter(parameter.data.clone(), parameter.requires_grad)
    return branch


def _gathered(module: nn.Module):
    """Under DeepSpeed ZeRO-3, gather a module's partitioned weights so that copies are not empty."""
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    try:
        import deepspeed
    except ImportError:  # partitioned weights without deepspeed cannot happen; keep the hub set importable
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def _adaptive_layer_class(layer_class: type) -> type:
    """`layer_class` whose `forward` takes `mm_token_type_ids` and routes the layer's multiway modules by it."""
    if layer_class not in _ADAPTIVE_CLASSES:

        def forward(self, *args, mm_token_type_ids: torch.Tensor | None = None, **kwargs):
            token = _ROUTING.set(mm_token_type_ids)
            try:
                return super(adaptive, self).forward(*args, **kwargs)
            finally:
                _ROUTING.reset(token)

        adaptive = type(f"ModalityAdaptive{layer_class.__name__}", (layer_class,), {"forward": forward})
        _ADAPTIVE_CLASSES[layer_class] = adaptive
    return _ADAPTIVE_CLASSES[layer_class]


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama-family backbone, or a clear error naming the backbone."""
    layers = getattr(language_model, "layers", None)
    model_type = getattr(language_model.config, "model_type", type(language_model).__name__)
    if not isinstance(layers, nn.ModuleList) or not all(_has_modules(layer) for layer in layers):
        raise ValueError(
            f"The modality-adaptive module needs a Llama-style backbone (decoder layers at `.layers` with "
            f"{', '.join(MULTIWAY_MODULES)}); the {model_type!r} backbone ({type(language_model).__name__}) does "
            "not have them (GPT-2, for one, fuses q/k/v in `c_attn`). Use a Llama, Mistral, Qwen2/3 or Gemma "
            "backbone, or set modality_adaptive=False."
        )
    return layers


def _has_modules(layer: nn.Module) -> bool:
    return all(_get(layer, path) is not None for path in MULTIWAY_MODULES)


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        module = getattr(module, name, None)
    return module


def _set(module: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(module, parent) if parent else module, name, value)


def apply_modality_adaptive(
    language_model: nn.Module, layers: Sequence[int] | None, modalities: Sequence[int]
) -> None:
    """Give the selected decoder layers one K/V/norm branch per modality, each a copy of the text branch."""
    all_layers = decoder_layers(language_model)
    indices = range(len(all_layers)) if layers is None else layers
    for index in indices:
        layer = all_layers[index]
        if isinstance(_get(layer, MULTIWAY_MODULES[0]), Multiway):
            raise ValueError(f"Decoder layer {index} is already modality-adaptive.")
        for path in MULTIWAY_MODULES:
            _set(layer, path, Multiway(_get(layer, path), modalities))
        layer.__class__ = _adaptive_layer_class(type(layer))


def modality_adaptive_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters of the non-text branches (the module's new weights: freeze policies, LoRA targets)."""
    for submodule in module.modules():
        if isinstance(submodule, Multiway):
            for key, branch in submodule.multiway.items():
                if int(key) != TEXT:
                    yield from branch.parameters()


__all__ = ["Multiway", "apply_modality_adaptive", "decoder_layers", "modality_adaptive_parameters"]
