"""A recipe's `model` and `data` (and `eval`) sections, typed: one dataclass field per key, with its help text and its
one default (library side).

`ModelSection.parse("model", mapping)` / `DataSection.parse("data", mapping)` check the keys (an unknown key is an
error naming the nearest valid one, `check_keys`), the value types (`check_types`: `n: "64"` becomes 64) and build
the section with transformers' `HfArgumentParser`; `__post_init__` checks what the fields say together (one model
source, one data source, a synthetic task of the registry). Recipe configs keep the sections as plain dicts (TRL's
`to_dict()` / `to_json_string()` need JSON values); whoever reads one parses it here and reads attributes, so every
default is written once, in the field.
"""

import difflib
import enum
import os
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from functools import cache

from transformers import HfArgumentParser

from ..data.synthetic import SYNTHETIC_TASKS, check_split, synthetic_task, task_menu

TYPE_NAMES = {
    bool: "true or false",
    int: "a whole number",
    float: "a number",
    str: "a string",
    dict: "a mapping ({key: value})",
    list: "a list ([a, b])",
}


def check_keys(section: str, given, valid, listing: str | None = None, elsewhere: dict | None = None) -> None:
    """A clear error for keys of `given` that are not in `valid`, with the nearest valid key as the fix (and
    `listing`, or every valid key, as the menu); `elsewhere` maps keys valid in another setting to the hint that
    names it."""
    unknown = sorted(set(given) - set(valid))
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
        if key in (elsewhere or {}):
            hints.append(f"{key!r} {elsewhere[key]}")
        else:
            hints.append(f"{key!r} -> did you mean {close[0]!r}?" if close else f"{key!r} is no {section} key")
    menu = listing or f"Valid keys: {', '.join(sorted(valid))}."
    hint = "; ".join(hints)
    raise ValueError(f"Unknown {section} keys {unknown}: {hint}{'' if hint.endswith('?') else '.'} {menu}")


def check_types(config_class: type, recipe: dict, section: str | None = None) -> dict:
    """The recipe (or the `section` of it) with each value checked against its field's type: a value of the wrong
    kind (`learning_rate: fast`) is a clear error, and a number YAML reads as a string (`3e-3`) becomes a number."""
    hints = typing.get_type_hints(config_class)
    defaults = {f.name: None if f.default is MISSING else f.default for f in fields(config_class)}
    prefix = f"{section}." if section else ""
    return {key: _typed(prefix + key, value, hints.get(key), defaults.get(key)) for key, value in recipe.items()}


def _typed(key: str, value, hint, default):
    allowed = _plain_types(hint)
    if allowed is None or value is None and type(None) in allowed:
        return value
    if isinstance(value, bool):  # a bool is an int to Python, not to a recipe
        if bool in allowed:
            return value
    elif isinstance(value, tuple(allowed)):
        return value
    elif isinstance(value, str) and list in allowed:  # `--freeze vision_tower`: a list of one
        return [value]
    elif isinstance(value, (int, float, str)):
        for kind in (int, float, str):
            if kind in allowed and (converted := _convert(value, kind)) is not None:
                return converted
    names = " or ".join(TYPE_NAMES[kind] for kind in allowed if kind in TYPE_NAMES)
    example = f" (default: {default})" if default is not None and not isinstance(default, (dict, list)) else ""
    raise ValueError(f"{key}: {value!r} is not {names}: give {names}{example}.")


def _convert(value, kind: type):
    """`value` as `kind` when nothing is lost (`"3e-3"` -> 0.003, `4.0` -> 4, `7` -> "7"), else None."""
    try:
        converted = kind(value)
    except ValueError:
        return None
    if kind is int and isinstance(value, (float, str)) and float(value) != converted:
        return None
    return converted


def _plain_types(hint) -> set | None:
    """The plain types (None, bool, int, float, str, dict, list) a field's annotation admits; None when it admits
    something else too (checked by the config itself). An enum admits its string values."""
    if hint is None:
        return None
    kinds = set()
    for option in typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,):
        option = typing.get_origin(option) or option
        if isinstance(option, type) and issubclass(option, enum.Enum):
            option = str
        if option not in TYPE_NAMES and option is not type(None):
            return None
        kinds.add(option)
    return kinds


@cache
def _parser(section_class: type) -> HfArgumentParser:
    return HfArgumentParser(section_class)


class RecipeSection:
    """What the typed sections share: parsing a recipe's mapping, and the key menu of the help texts."""

    SOURCES: typing.ClassVar[tuple[str, ...]] = ()  # keys of which a section names exactly one

    @classmethod
    def parse(cls, section: str, mapping):
        """The section `mapping` describes (a recipe's partial dict, a normalised one, or a section already):
        unknown keys and values of the wrong type are clear errors, every key left out takes its field's default."""
        if isinstance(mapping, cls):
            return mapping
        if not isinstance(mapping, dict):
            raise ValueError(
                f"The recipe's {section} is {mapping!r}: give a mapping of its keys ({', '.join(cls.keys())})."
            )
        check_keys(section, mapping, cls.keys())
        values = {key: os.fspath(value) if isinstance(value, os.PathLike) else value for key, value in mapping.items()}
        (parsed,) = _parser(cls).parse_dict(check_types(cls, values, section))
        return parsed

    @classmethod
    def keys(cls) -> dict[str, str]:
        """Key -> help text with its default: the menu of the recipe help and of unknown-key errors."""
        return {
            f.name: f.metadata["help"] + (f" (default {f.default})" if f.default not in (None, MISSING) else "")
            for f in fields(cls)
        }

    def _one_source(self, what: str, fixes: dict[str, str], override: str) -> None:
        given = [key for key in self.SOURCES if getattr(self, key) is not None]
        menu = "; ".join(f"{key}: {text}" for key, text in fixes.items())
        if not given:
            names = [f"`{key}`" for key in self.SOURCES]
            raise ValueError(f"The recipe's {what} needs one of {', '.join(names[:-1])} or {names[-1]}.")
        if len(given) > 1:
            named = " and ".join(f"`{key}`" for key in given)
            raise ValueError(
                f"The recipe's {what} names {len(given)} sources, {named}: keep one ({menu}). On the command line "
                f"{override} replaces the recipe file's source."
            )


@dataclass
class ModelSection(RecipeSection):
    """A recipe's `model`: where the model comes from (exactly one of preset, path, components, mplug_owl2) and how a
    saved folder is loaded."""

    SOURCES: typing.ClassVar[tuple[str, ...]] = ("preset", "path", "components", "mplug_owl2")

    preset: str | None = field(
        default=None, metadata={"help": "a preset name (configuration/<name>.json), built with random weights"}
    )
    overrides: dict = field(default_factory=dict, metadata={"help": "MMLLMConfig fields over the preset's"})
    path: str | None = field(default=None, metadata={"help": "a saved model folder (a previous stage)"})
    components: dict | None = field(
        default=None,
        metadata={"help": "{vision, text, projector, ...}: pretrained encoder and LLM composed (`from_components`)"},
    )
    mplug_owl2: str | None = field(default=None, metadata={"help": "an original mPLUG-Owl2 folder, converted"})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "attention backend of a loaded folder (eager, sdpa, flash_attention_2)"}
    )
    dtype: str | None = field(default=None, metadata={"help": "dtype of a loaded folder (float32, bfloat16, ...)"})
    device_map: str | dict | None = field(default=None, metadata={"help": "device map of a loaded folder"})
    quantization: str | None = field(default=None, metadata={"help": "4bit (QLoRA, with `lora`) or 8bit"})
    image_generation: dict | None = field(
        default=None,
        metadata={"help": "{output_projector_type, num_signal_tokens, modality_generator, output_projector_config}"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the new weights"})

    def __post_init__(self):
        self._one_source(
            "model",
            {
                "preset": "a new model with random weights",
                "path": "a saved folder",
                "components": "pretrained encoder and LLM",
                "mplug_owl2": "an original mPLUG-Owl2 folder",
            },
            "`--model FOLDER_OR_PRESET` (or `--model.path FOLDER`, `--model.preset NAME`)",
        )


@dataclass
class DataSection(RecipeSection):
    """A recipe's `data`, or its `eval` (held-out rows, the same keys): exactly one of synthetic, dataset, llava_json,
    with the keys that source reads."""

    SOURCES: typing.ClassVar[tuple[str, ...]] = ("synthetic", "dataset", "llava_json")

    synthetic: str | None = field(default=None, metadata={"help": "a synthetic task: " + task_menu()})
    n: int = field(default=512, metadata={"help": "number of synthetic rows"})
    split: str = field(default="train", metadata={"help": "dataset split, or train / heldout for synthetic data"})
    image_size: int = field(default=64, metadata={"help": "synthetic image size"})
    seed: int = field(default=0, metadata={"help": "synthetic data seed"})
    dataset: str | None = field(
        default=None, metadata={"help": "a datasets name, a saved dataset folder or a json/jsonl/parquet file"}
    )
    llava_json: str | None = field(default=None, metadata={"help": "a LLaVA-style conversation file"})
    image_folder: str | None = field(
        default=None,
        metadata={
            "help": "the folder its image names are relative to (unset: the current folder for llava_json, the "
            "data file's own folder for dataset)"
        },
    )
    task: str = field(
        default="chat",
        metadata={
            "help": "llava_json: chat (the conversations) or generate (captions -> images)",
            "choices": ["chat", "generate"],
        },
    )

    def __post_init__(self):
        self._one_source(
            "data",
            {
                "synthetic": "rows made here",
                "dataset": "a datasets name, folder or file",
                "llava_json": "a LLaVA conversation file",
            },
            "`--data.synthetic TASK` (or `--data.dataset`, `--data.llava_json`)",
        )
        if self.synthetic is not None:
            synthetic_task(self.synthetic)  # an unknown task is an error naming every task
            check_split(self.split)
        if self.task not in ("chat", "generate"):
            raise ValueError(
                f"llava_json task={self.task!r}: use chat (the conversations) or generate (captions -> images)."
            )


MODEL_KEYS = ModelSection.keys()
DATA_KEYS = DataSection.keys()

__all__ = [
    "DATA_KEYS",
    "MODEL_KEYS",
    "SYNTHETIC_TASKS",
    "DataSection",
    "ModelSection",
    "RecipeSection",
    "check_keys",
    "check_types",
]
