"""Modality-adaptive module (mPLUG-Owl2): per-modality K/V projections and layer norms inside the LLM.

In each selected decoder layer, `self_attn.k_proj`, `self_attn.v_proj`, `input_layernorm` and
`post_attention_layernorm` get one branch per modality (0 text, then 1 image, 2 video, 3 audio); `q_proj`, `o_proj`,
the MLP and the final norm stay shared. With `modality_adaptive_parts="all"` (CogVLM's visual expert) `q_proj`,
`o_proj` and the MLP get branches too. The branches sit in their owner's `multiway` dict under the module's own
name (`self_attn.multiway.1.k_proj`, `multiway.1.input_layernorm`): each is a plain `nn.Linear` or norm whose name
ends like the backbone's, so PEFT's usual `target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]` and
`"all-linear"` give every branch its own adapter. Every token's output comes from its own modality's branch only
(on an accelerator and under torch.compile chosen on the device with `torch.where`, so a routed forward compiles in
one graph; on a CPU in eager mode by gather/scatter); a pass without routing (text only, every decode step) runs the
text branch alone, exactly the backbone's computation.

Routing travels as the `mm_token_type_ids` keyword argument into each decoder layer's `forward`, which transformers'
decoder models pass through. The layer's class is extended with a `forward` that publishes the routing in a
context variable for the duration of the call, so gradient checkpointing (which re-runs `forward`) routes the same
way; the value is local to the running thread or task, never shared (transformers' `CompileableContextVar`, which
`torch.compile` traces as a plain variable). While it is published, `self.k_proj` (in the
backbone's own attention code) is a router over the branches; otherwise it is the text branch, which is what tools
that walk the module tree by attribute see.

On disk the names are mPLUG-Owl2's (`self_attn.k_proj.multiway.{0,1}.weight`, as mmllm 0.1 saved them):
`CHECKPOINT_RENAMES` maps them onto the module tree when transformers loads a folder, and back when it saves one.
"""

import contextlib
import copy
import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from transformers.utils.import_utils import is_torchdynamo_compiling
from transformers.utils.output_capturing import CompileableContextVar

TEXT = 0
MODALITIES = (0, 1, 2, 3)
# The modules that get one branch per modality, by `modality_adaptive_parts`: owner (its path in the decoder layer;
# "" is the layer itself) -> the modules it holds. "kv_norms" is mPLUG-Owl2's module; "all" is CogVLM's visual
# expert (every projection of attention, the MLP and both norms).
MULTIWAY_PARTS = {
    "kv_norms": {"self_attn": ("k_proj", "v_proj"), "": ("input_layernorm", "post_attention_layernorm")},
    "all": {
        "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
        "": ("input_layernorm", "post_attention_layernorm", "mlp"),
    },
}

# (name on disk, name in the module tree) fragments; plain text, so transformers can apply them both ways.
CHECKPOINT_RENAMES = [
    (f".{name}.multiway.{modality}.", f".multiway.{modality}.{name}.")
    for names in MULTIWAY_PARTS["all"].values()
    for name in names
    for modality in MODALITIES
]


def module_tree_key(key: str) -> str:
    """A state-dict key as saved on disk (mPLUG-Owl2's multiway names) -> its name in this module tree."""
    for on_disk, in_model in CHECKPOINT_RENAMES:
        key = key.replace(on_disk, in_model)
    return key


# transformers' context variable that torch.compile traces (a plain ContextVar is a graph break).
_ROUTING = CompileableContextVar("mmllm_modality_routing")
_ADAPTIVE_CLASSES: dict[tuple[type, bool], type] = {}


class MultiwayRouter:
    """Runs each token through its modality's branch (`{modality id: module}`); other modalities use text's.

    On an accelerator, or under `torch.compile`, every branch runs on the whole tensor and `torch.where` keeps each
    token's own branch output: the choice is made on the device, with no host synchronisation and no
    data-dependent shapes, so a routed forward traces in one `torch.compile(fullgraph=True)` graph (and CUDA
    graphs). In eager mode on a CPU, where reading a mask costs nothing, each branch runs on its own tokens only
    (gather/scatter), which saves the extra branches' work on the other tokens. Either way each token's output and
    gradient come from its own branch only.
    """

    def __init__(self, branches: dict[int, nn.Module], routing: torch.Tensor):
        self.branches, self.routing = branches, routing

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        routing = self.routing[..., -hidden_states.shape[-2] :].to(hidden_states.device)
        if hidden_states.device.type == "cpu" and not is_torchdynamo_compiling():
            return self._gathered(hidden_states, routing.reshape(-1))
        output = self.branches[TEXT](hidden_states)
        for modality, branch in self.branches.items():
            if modality != TEXT:
                output = torch.where((routing == modality).unsqueeze(-1), branch(hidden_states), output)
        return output

    def _gathered(self, hidden_states: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        """Each present modality's branch on its own tokens (index_select / index_copy)."""
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        masks = {modality: routing == modality for modality in self.branches if modality != TEXT}
        text = torch.ones_like(routing, dtype=torch.bool)  # text, and modalities without a branch of their own
        for mask in masks.values():
            text &= ~mask
        groups = [(self.branches[TEXT], text)] + [(self.branches[modality], mask) for modality, mask in masks.items()]
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


def _multiway_attribute(self: nn.Module, name: str):
    """The router (during a routed forward) or the text branch for one of this owner's multiway names."""
    branches = nn.Module.__getattr__(self, "multiway")
    routing = _ROUTING.get()
    if routing is None:
        return branches[str(TEXT)][name]
    return MultiwayRouter({int(modality): modules[name] for modality, modules in branches.items()}, routing)


def _adaptive_class(owner_class: type, publishes_routing: bool) -> type:
    """`owner_class` whose multiway names resolve through `_multiway_attribute`; the decoder layer's `forward` also
    takes `mm_token_type_ids` and publishes it while it runs."""
    key = (owner_class, publishes_routing)
    if key not in _ADAPTIVE_CLASSES:

        def __getattr__(self, name: str):
            modules = self.__dict__["_modules"]
            if name not in modules and "multiway" in modules and name in modules["multiway"][str(TEXT)]:
                return _multiway_attribute(self, name)
            return super(adaptive, self).__getattr__(name)

        namespace = {"__getattr__": __getattr__}
        if publishes_routing:

            def forward(self, *args, mm_token_type_ids: torch.Tensor | None = None, **kwargs):
                token = _ROUTING.set(mm_token_type_ids)
                try:
                    return super(adaptive, self).forward(*args, **kwargs)
                finally:
                    _ROUTING.reset(token)

            namespace["forward"] = forward
        adaptive = type(f"ModalityAdaptive{owner_class.__name__}", (owner_class,), namespace)
        _ADAPTIVE_CLASSES[key] = adaptive
    return _ADAPTIVE_CLASSES[key]


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


def decoder_layers(
    language_model: nn.Module,
    feature: str = "The modality-adaptive module",
    alternative: str = "modality_adaptive=False",
    parts: str = "kv_norms",
) -> nn.ModuleList:
    """The decoder layers of a Llama-family backbone, or a clear error naming the backbone, the `feature` that
    needs them (the modules of `parts`) and the `alternative` setting."""
    layers = getattr(language_model, "layers", None)
    model_type = getattr(language_model.config, "model_type", type(language_model).__name__)
    modules = MULTIWAY_PARTS[parts]
    if not isinstance(layers, nn.ModuleList) or not all(_has_modules(layer, modules) for layer in layers):
        paths = [f"{owner}.{name}" if owner else name for owner, names in modules.items() for name in names]
        raise ValueError(
            f"{feature} needs a Llama-style backbone (decoder layers at `.layers` with "
            f"{', '.join(paths)}); the {model_type!r} backbone ({type(language_model).__name__}) does "
            "not have them (GPT-2, for one, fuses q/k/v in `c_attn`). Use a Llama, Mistral, Qwen2/3 or Gemma "
            f"backbone, or set {alternative}."
        )
    return layers


def keep_layers_together(language_model: nn.Module) -> None:
    """`device_map` splitting keeps each extended decoder layer on one device, as the backbone's own layers
    (transformers matches `_no_split_modules` by class name, and the extended classes have their own)."""
    names = {type(layer).__name__ for layer in language_model.layers}
    language_model._no_split_modules = {*(language_model._no_split_modules or ()), *names}


def _owner(layer: nn.Module, path: str) -> nn.Module | None:
    return getattr(layer, path, None) if path else layer


def _has_modules(layer: nn.Module, modules: dict[str, tuple[str, ...]]) -> bool:
    for owner, names in modules.items():
        module = _owner(layer, owner)
        if module is None or not all(isinstance(getattr(module, name, None), nn.Module) for name in names):
            return False
    return True


def _make_multiway(owner: nn.Module, names: Sequence[str], modalities: Sequence[int], publishes_routing: bool):
    """Move `owner`'s `names` into `owner.multiway["0"]` and add a copy of each per modality."""
    text = nn.ModuleDict({name: owner._modules.pop(name) for name in names})
    branches = {str(TEXT): text}
    branches.update(
        {str(modality): nn.ModuleDict({name: _copy_branch(text[name]) for name in names}) for modality in modalities}
    )
    owner.multiway = nn.ModuleDict(branches)
    owner.__class__ = _adaptive_class(type(owner), publishes_routing)


def _accept_checkpoint_names(layer: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """`load_state_dict` pre-hook: a folder's own weights file (the Trainer's resume, loading by hand) carries the
    on-disk names; rename them onto the module tree (the dict is `load_state_dict`'s own copy)."""
    for key in [key for key in state_dict if key.startswith(prefix) and ".multiway." in key]:
        renamed = prefix + module_tree_key("." + key[len(prefix) :])[1:]
        if renamed != key:
            state_dict[renamed] = state_dict.pop(key)


def apply_modality_adaptive(
    language_model: nn.Module, layers: Sequence[int] | None, modalities: Sequence[int], parts: str = "kv_norms"
) -> None:
    """Give the selected decoder layers one branch per modality of each module `parts` names (`MULTIWAY_PARTS`),
    each a copy of the text branch."""
    all_layers = decoder_layers(language_model, parts=parts)
    indices = range(len(all_layers)) if layers is None else layers
    for index in indices:
        layer = all_layers[index]
        if "multiway" in layer._modules:
            raise ValueError(f"Decoder layer {index} is already modality-adaptive.")
        for owner, names in MULTIWAY_PARTS[parts].items():
            _make_multiway(_owner(layer, owner), names, modalities, publishes_routing=not owner)
        layer.register_load_state_dict_pre_hook(_accept_checkpoint_names)
    keep_layers_together(language_model)
    _extend_tensor_parallel_plan(language_model, MULTIWAY_PARTS[parts])


def _extend_tensor_parallel_plan(language_model: nn.Module, modules: dict[str, tuple[str, ...]]) -> None:
    """The backbone's tensor-parallel plan names the modules that now have branches (`self_attn.k_proj`,
    `mlp.gate_proj`, ...): give every branch the same style, and keep the plain entry only where a layer still has
    the plain module (the plan's entries must each name modules)."""
    plan = getattr(language_model, "_tp_plan", None) or {}
    names = [name for name, _ in language_model.named_modules()]
    owned = [(f".{owner}." if owner else ".", name) for owner, names_ in modules.items() for name in names_]
    extended = {}
    for key, style in plan.items():
        candidates = [key] + [
            (key + ".").replace(f"{owner}{name}.", f"{owner}multiway.*.{name}.", 1)
            for owner, name in owned
            if f"{owner}{name}." in key + "."
        ]
        for candidate in candidates:
            candidate = candidate.rstrip(".")
            pattern = re.compile(re.escape(candidate).replace(r"\*", r"\d+") + "$")
            if any(pattern.match(name) for name in names):
                extended[candidate] = style
    if plan:
        language_model._tp_plan = extended


def multiway_branches(module: nn.Module, modality: int) -> Iterator[nn.Module]:
    """Every branch module of one modality (`0` text) under `module`."""
    for submodule in module.modules():
        multiway = submodule._modules.get("multiway") if type(submodule) in _ADAPTIVE_CLASSES.values() else None
        if multiway is not None and str(modality) in multiway:
            yield from multiway[str(modality)].values()


def modality_adaptive_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters of the non-text branches (the module's new weights: freeze policies, LoRA targets)."""
    for modality in MODALITIES[1:]:
        for branch in multiway_branches(module, modality):
            yield from branch.parameters()


__all__ = [
    "CHECKPOINT_RENAMES",
    "MULTIWAY_PARTS",
    "MultiwayRouter",
    "apply_modality_adaptive",
    "decoder_layers",
    "keep_layers_together",
    "modality_adaptive_parameters",
    "module_tree_key",
    "multiway_branches",
]
