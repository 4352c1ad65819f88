"""`MMLLMTrainer`: TRL's SFTTrainer plus the losses the model owns (NExT-GPT's alignment loss) and per-group learning
rates; `MMLLMDPOTrainer` and `MMLLMGRPOTrainer`: TRL's DPOTrainer and GRPOTrainer with the same learning rates
(library side)."""

from collections.abc import Mapping
from contextlib import contextmanager
from types import MappingProxyType

import torch
from torch import nn
from torch.nn import functional as F
from trl import DPOTrainer, GRPOTrainer, SFTTrainer

from ..utils.logging import get_logger
from .collator import GENERATION_TARGETS
from .model_setup import component_of, component_parameter_names, vision_lr_scales

logger = get_logger(__name__)


def inner_model(model: nn.Module) -> nn.Module:
    """The `MMLLMModel` inside `model`, wherever wrappers put it (PEFT, DDP): the module TRL's fused LM head runs."""
    for module in model.modules():
        if hasattr(module, "signal_states") and hasattr(module, "language_model"):
            return module
    raise ValueError(f"No MMLLMModel inside {type(model).__name__}: the alignment loss needs an mmllm model.")


@contextmanager
def captured_hidden_states(module: nn.Module):
    """Record `last_hidden_state` of the first forward of `module` inside the block (the one with gradients)."""
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, _args, output):
        captured.setdefault("hidden_states", output.last_hidden_state)

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


class ParameterGroups:
    """Trainer mix-in: learning rates per component (`component_lrs`: `vision_tower_lr`, `projector_lr`) and per
    parameter (`vision_lr_decay`, `lr_scales`, which multiply the component's) as optimizer groups, no weight decay on
    `row_masked_parameters` (their frozen rows stay bit-identical), and the groups logged as the optimizer is made."""

    vision_lr_decay: float | None = None
    component_lrs: Mapping[str, float] = MappingProxyType({})  # component name -> its learning rate
    lr_scales: Mapping[str, float] = MappingProxyType({})  # read-only defaults: instances set their own
    row_masked_parameters: frozenset[str] = frozenset()

    def get_decay_parameter_names(self, model) -> list[str]:
        return [name for name in super().get_decay_parameter_names(model) if name not in self.row_masked_parameters]

    def create_optimizer(self, model=None):
        model = self.model if model is None else model
        if self.optimizer is not None:
            return super().create_optimizer(model)
        learning_rates = self.parameter_learning_rates(model)
        if learning_rates:
            optimizer = self._grouped_optimizer(model, learning_rates)
        else:
            optimizer = super().create_optimizer(model)
        for line in parameter_group_lines(optimizer, model):
            logger.info(line)
        return optimizer

    def _grouped_optimizer(self, model: nn.Module, learning_rates: dict[str, float]):
        decay_names = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[float, float], list] = {}
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                decay = self.args.weight_decay if name in decay_names else 0.0
                key = (learning_rates.get(name, self.args.learning_rate), decay)
                groups.setdefault(key, []).append(parameter)
        param_groups = [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]
        optimizer_class, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_class(param_groups, **optimizer_kwargs)
        return self.optimizer

    def parameter_learning_rates(self, model: nn.Module) -> dict[str, float]:
        """Learning rate per parameter name, for those whose rate is not `learning_rate`: the component's rate
        (`component_lrs`) times the vision encoder's layer-wise decay and `lr_scales`."""
        rates = {
            name: rate
            for component, rate in self.component_lrs.items()
            for name in component_parameter_names(model, component)
        }
        decay = vision_lr_scales(model, self.vision_lr_decay) if self.vision_lr_decay is not None else {}
        for name, scale in [*decay.items(), *self.lr_scales.items()]:
            rates[name] = rates.get(name, self.args.learning_rate) * scale
        return rates


def parameter_group_lines(optimizer, model: nn.Module) -> list[str]:
    """One line per optimizer group: its learning rate, weight decay, size and the components its parameters are
    in."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    lines = []
    for index, group in enumerate(optimizer.param_groups):
        components = sorted({component_of(names.get(id(parameter), "")) for parameter in group["params"]})
        size = sum(parameter.numel() for parameter in group["params"])
        lines.append(
            f"optimizer group {index}: lr {group['lr']:.3g}, weight decay {group['weight_decay']:g}, "
            f"{size:,} parameters ({', '.join(components)})"
        )
    return lines


class MMLLMTrainer(ParameterGroups, SFTTrainer):
    """`SFTTrainer` with layer-wise learning-rate decay on the vision encoder (mPLUG-Owl2, BEiT-style) and
    NExT-GPT's output-side losses.

    TRL's fused LM head runs the inner `MMLLMModel` and never the model's `forward`, so the losses the model owns
    are added here: a forward hook keeps the inner model's last hidden states, the signal tokens' states go through
    the output projector, and the conditioning is compared with the generator's encoding of the captions
    (`alignment_loss_weight`, MSE) and, optionally, scored by the generator against the target images
    (`image_loss_weight`). Both are logged (`alignment_loss`, `image_loss`). `row_masked_parameters` (rows trained
    by `train_token_rows`) get no weight decay, so their frozen rows stay bit-identical.
    """

    def __init__(
        self,
        *args,
        vision_lr_decay: float | None = None,
        component_lrs: dict[str, float] | None = None,
        alignment_loss_weight: float = 1.0,
        image_loss_weight: float = 0.0,
        row_masked_parameters: set[str] | None = None,
        lr_scales: dict[str, float] | None = None,
        **kwargs,
    ):
        self.vision_lr_decay = vision_lr_decay
        self.component_lrs = dict(component_lrs or {})
        self.alignment_loss_weight = alignment_loss_weight
        self.image_loss_weight = image_loss_weight
        self.row_masked_parameters = set(row_masked_parameters or ())
        self.lr_scales = dict(lr_scales or {})
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = self._multimodal_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        if torch.is_grad_enabled() and not loss.requires_grad:
            # A batch that reaches no trainable parameter (text-only rows while only the projector trains): a zero
            # gradient for every trainable parameter instead of autograd's "does not require grad" error.
            loss = loss + 0.0 * sum(parameter.sum() for parameter in model.parameters() if parameter.requires_grad)
        return (loss, result[1]) if return_outputs else loss

    def _multimodal_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """The LM loss, plus the generation-alignment loss on batches with image-generation targets."""
        targets = {key: inputs.pop(key) for key in GENERATION_TARGETS if key in inputs}
        if "generation_captions" not in targets or not (self.alignment_loss_weight or self.image_loss_weight):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inner = inner_model(model)
        with captured_hidden_states(inner) as captured:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        # Like TRL's MoE aux loss: a per-micro-batch mean, averaged over gradient accumulation steps.
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        loss = loss + self.generation_loss(inner, captured["hidden_states"], inputs["input_ids"], targets) / steps
        return (loss, result[1]) if return_outputs else loss

    def generation_loss(
        self, inner: nn.Module, hidden_states: torch.Tensor, input_ids: torch.Tensor, targets: dict
    ) -> torch.Tensor:
        """Weighted alignment (+ image) loss of the signal groups in the batch against the rows' targets."""
        captions = targets["generation_captions"]
        states = inner.signal_states(hidden_states, input_ids)
        if states.shape[0] != len(captions):
            raise ValueError(
                f"{len(captions)} row(s) of the batch have a generation_caption but {states.shape[0]} "
                "signal-token group(s) made it into the batch: every such row needs one assistant image "
                "part, and max_length must not cut the answer (raise max_length or set it to null)."
            )
        conditioning = inner.get_generation_conditioning(states)
        generator = inner.modality_generator
        mode = "train" if self.model.training else "eval"
        loss = conditioning.new_zeros(())
        if self.alignment_loss_weight:
            with torch.no_grad():
                target = generator.encode_prompt(captions, self.processing_class.tokenizer)
            alignment = F.mse_loss(conditioning.float(), target.to(conditioning.device).float())
            self._metrics[mode]["alignment_loss"].append(alignment.item())
            loss = loss + self.alignment_loss_weight * alignment
        if self.image_loss_weight:
            if "generation_pixel_values" not in targets:
                raise ValueError(
                    "image_loss_weight needs the target images: the rows need a generation_image column "
                    "and the collator target_images=True (train() sets it)."
                )
            image = generator.image_loss(conditioning, targets["generation_pixel_values"].to(conditioning.device))
            self._metrics[mode]["image_loss"].append(image.item())
            loss = loss + self.image_loss_weight * image
        return loss


class ComponentRates(ParameterGroups):
    """Trainer mix-in that takes the learning rates per component and the layer-wise decay on the vision encoder
    (`component_lrs`, `vision_lr_decay`) as keyword arguments, as the SFT stages have them."""

    def __init__(
        self, *args, vision_lr_decay: float | None = None, component_lrs: dict[str, float] | None = None, **kwargs
    ):
        self.vision_lr_decay = vision_lr_decay
        self.component_lrs = dict(component_lrs or {})
        super().__init__(*args, **kwargs)


class MMLLMDPOTrainer(ComponentRates, DPOTrainer):
    """`DPOTrainer` with the learning rates per component (`ComponentRates`)."""


class MMLLMGRPOTrainer(ComponentRates, GRPOTrainer):
    """`GRPOTrainer` with the learning rates per component (`ComponentRates`)."""


__all__ = [
    "ComponentRates",
    "MMLLMDPOTrainer",
    "MMLLMGRPOTrainer",
    "MMLLMTrainer",
    "ParameterGroups",
    "captured_hidden_states",
    "inner_model",
    "parameter_group_lines",
]
