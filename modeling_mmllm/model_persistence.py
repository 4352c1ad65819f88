"""Loading and saving of the mmllm model classes: what `from_pretrained` accepts and how `save_pretrained` writes.

Loading takes safetensors only and turns the usual failures (a damaged file, weights that do not fit the config, a
folder of pickles) into errors that name the fix. Saving writes a complete folder (weights, config with `auto_map`,
code, the modality generator's files) into a staging sibling and swaps it in (`staged_folder.py`), then, for a push,
adds the model card and uploads what changed. The model classes take these as mixins; the modeling file holds the
model only.
"""

import os
from pathlib import Path

import torch
from torch import nn
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.utils import logging

from .configuration_mmllm import import_library_module
from .hub_upload import file_times, upload_folder_to_hub
from .modality_adaptive import CHECKPOINT_RENAMES
from .modality_generator import save_modality_generator
from .staged_folder import commit_staging, discard_staging, is_own_staging, keep_existing, make_staging, usual_modes

logger = logging.get_logger(__name__)

# Auto classes a saved folder answers to (written into config.json's `auto_map`).
AUTO_MAP = {
    "AutoConfig": "configuration_mmllm.MMLLMConfig",
    "AutoModel": "modeling_mmllm.MMLLMModel",
    "AutoModelForImageTextToText": "modeling_mmllm.MMLLMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_mmllm.MMLLMForConditionalGeneration",
}
# Models that take audio or generate images also answer `pipeline("any-to-any")`.
ANY_TO_ANY_AUTO_MAP = {"AutoModelForMultimodalLM": "modeling_mmllm.MMLLMForConditionalGeneration"}


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def _loading_problem(source: str, error: Exception) -> str | None:
    """What a failed `from_pretrained` of `source` means for its user, with the fix; None for any other failure
    (raised as it is)."""
    if type(error).__name__ == "SafetensorError":  # safetensors' own error: a truncated or foreign file
        return (
            f"The weights file in {source} is damaged ({error}): it is truncated or not safetensors. Save the "
            "model again, or download the folder again."
        )
    if isinstance(error, RuntimeError) and "ignore_mismatched_sizes" in str(error):
        return (
            f"The weights in {source} do not fit its config.json (tensor shapes differ: was a size such as "
            "hidden_size edited?). Restore the config the weights were saved with, or pass "
            "ignore_mismatched_sizes=True to start the mismatched layers afresh."
        )
    pickles = [path.name for pattern in PICKLE_WEIGHTS for path in Path(source).glob(pattern)]
    if isinstance(error, OSError) and pickles and not any(Path(source).glob("*.safetensors")):
        return (
            f"{source} holds its weights only as pickle files ({', '.join(sorted(pickles))}); mmllm loads "
            "safetensors only (a pickle can run code as it loads). Convert them once, where you trust the file: "
            "MMLLMForConditionalGeneration.from_pretrained(FOLDER, use_safetensors=False).save_pretrained(NEW_FOLDER)"
            " (or safetensors' convert script)."
        )
    return None


class SafetensorsLoadingMixin:
    """`from_pretrained` for safetensors weights, with errors that name the fix."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' `from_pretrained`, for safetensors weights only: pickled weights (`pytorch_model.bin`) can
        run code as they load, so a folder that has only those is refused with the way to convert it (an explicit
        `use_safetensors=False` still loads them). A damaged weights file, or weights whose shapes do not fit the
        config, is a `ValueError` that names the problem and the fix."""
        kwargs.setdefault("use_safetensors", True)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except Exception as error:
            problem = _loading_problem(str(pretrained_model_name_or_path), error)
            if problem is None:
                raise
            raise ValueError(problem) from error


class StagedSavingMixin:
    """`save_pretrained` that never leaves a half-written folder, and pushes with the package's model card."""

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        """Save weights (safetensors), config and code: the same files wherever this runs, as transformers does.

        `auto_map` names every Auto class that loads this folder with `trust_remote_code=True`. A local diffusers
        pipeline (the modality generator) is written into the `modality_generator/` sub-folder, which the saved
        config then names. With `push_to_hub=True` (and transformers' `repo_id`, `commit_message`, `create_pr`,
        `private`, `token`) the upload runs once the folder is complete, sub-folder included, with the model card
        that the `mmllm` package renders (without the package the folder's own README.md goes up, and a warning
        says so): every file this call wrote or changed is uploaded.

        The files are written into a staging sibling and swapped in by renames (`staged_folder.py`): a kill at any
        point leaves the folder as it was or complete, never config and code without weights. Files already in the
        folder that this save does not write (a processor, notes, a sub-folder) are kept, as transformers keeps
        them. Files written get the umask's usual modes. A model whose weights safetensors cannot store (torch's
        dynamic quantization) is refused before anything is written.
        """
        _refuse_unsaveable_weights(self)
        if os.path.isfile(save_directory):
            raise NotADirectoryError(f"save_pretrained({str(save_directory)!r}): that is a file; pass a folder path.")
        hub = {key: kwargs.pop(key) for key in ("repo_id", "commit_message", "create_pr", "private") if key in kwargs}
        before = file_times(save_directory)
        writes = _writes_files(kwargs.get("is_main_process", True))
        if writes and not is_own_staging(save_directory):
            self._save_staged(os.path.realpath(save_directory), args, kwargs, push_to_hub, hub.get("repo_id"))
        else:  # other ranks only join the gathering of sharded weights; a staging folder of ours is already one
            self._write_folder(save_directory, writes, *args, **kwargs)
            if push_to_hub and writes:
                _write_model_card(self, save_directory, hub.get("repo_id"))
        if push_to_hub and writes:
            upload_folder_to_hub(save_directory, changed_since=before, token=kwargs.get("token"), **hub)

    def _save_staged(self, target: str, args: tuple, kwargs: dict, push_to_hub: bool, repo_id: str | None) -> None:
        """Write the folder into a staging sibling of `target`, carry over the files of an existing `target` that
        this save does not replace, add the model card of a push, then swap it in."""
        staging = make_staging(target)  # removes what killed saves of `target` left first
        try:
            self._write_folder(staging, True, *args, **kwargs)
            usual_modes(staging)  # before `keep_existing`: hard-linked old files keep their own modes
            keep_existing(target, staging)
            if push_to_hub:
                _write_model_card(self, staging, repo_id)
            commit_staging(staging, target)
        except BaseException:
            discard_staging(staging)
            raise

    def _write_folder(self, save_directory, writes: bool, *args, **kwargs) -> None:
        """transformers' `save_pretrained` into `save_directory`, with this model's `auto_map` and its modality
        generator's files (`writes`: whether this process writes them)."""
        any_to_any = self.config.audio_config is not None or self.config.image_generation
        auto_map = {**AUTO_MAP, **(ANY_TO_ANY_AUTO_MAP if any_to_any else {})}
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **auto_map}
        source_settings = self.config.modality_generator
        os.makedirs(save_directory, exist_ok=True)
        self.config.modality_generator = save_modality_generator(
            self.model.modality_generator, source_settings, save_directory, writes
        )
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:  # the saved config names the copy; this model keeps using its source
            self.config.modality_generator = source_settings


def _writes_files(is_main_process: bool) -> bool:
    """Whether this process writes a saved folder: the main process, and under torch.distributed rank 0 only (as
    transformers does; the other ranks only take part in gathering sharded weights)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return is_main_process and (not distributed or torch.distributed.get_rank() == 0)


def _refuse_unsaveable_weights(model: nn.Module) -> None:
    """A clear error, before anything is written, for weights safetensors cannot store: torch's own quantized
    modules (`torch.ao.quantization.quantize_dynamic`) hold packed parameters and dtypes instead of tensors (the
    save would otherwise fail half-way with "'torch.dtype' object has no attribute 'data_ptr'")."""
    entries = [
        name for name, value in model.state_dict().items() if not isinstance(value, torch.Tensor) or value.is_quantized
    ]
    if not entries:
        return
    quantized = [name for name, module in model.named_modules() if ".quantized" in type(module).__module__]
    outermost = [name for name in quantized if not any(name.startswith(f"{other}.") for other in quantized)]
    named = outermost or entries
    where = ", ".join(named[:3]) + (f" and {len(named) - 3} more" if len(named) > 3 else "")
    raise ValueError(
        f"save_pretrained cannot store this model: {where} hold torch's quantized weights (packed parameters, not "
        "tensors, as torch.ao.quantization.quantize_dynamic makes them), which safetensors cannot write. Save the "
        "unquantized model and quantize it when loading: `--quantization int8` (mmllm generate, chat, serve, demo) "
        "or from_pretrained(folder, quantization_config=TorchAoConfig(Int8WeightOnlyConfig())); a model loaded that "
        "way saves and reloads."
    )


def _write_model_card(model, folder, repo_id: str | None) -> None:
    """The package's model card for a push; a bare remote-code environment uploads the folder's own card."""
    try:
        cards = import_library_module("export.hub_card")
    except ImportError:
        logger.warning(
            "Uploading without a rendered model card (the `mmllm` package is not installed here): the folder's "
            "own README.md, if any, goes up. `pip install mmllm` renders one, or `mmllm push FOLDER REPO` later."
        )
        return
    cards.write_model_card(model, folder, repo_id=repo_id)


# Folders keep mPLUG-Owl2's multiway names on disk (see modality_adaptive.py); transformers maps them both ways.
register_checkpoint_conversion_mapping(
    "mmllm", [WeightRenaming(on_disk, in_model) for on_disk, in_model in CHECKPOINT_RENAMES], overwrite=True
)


__all__ = ["ANY_TO_ANY_AUTO_MAP", "AUTO_MAP", "SafetensorsLoadingMixin", "StagedSavingMixin"]
