"""Verifiable rewards for GRPO (`reward_funcs` in a `trainer: grpo` recipe), with TRL's reward signature (library
side).

A reward function takes the `completions` of a batch (strings, or for conversational prompts TRL's lists of
assistant messages) and the dataset's columns as keyword arguments (`solution`, ...), and returns one float per
completion, or None where it does not apply (TRL leaves it out of the sum). Built in:

- `exact_match`: 1 when the answer equals the row's `solution`, compared as the evaluation compares (lower case,
  without surrounding whitespace and full stops);
- `numeric`: 1 when the answer's first number (digits, or a number word up to twenty) equals the solution's; None
  for rows whose solution holds no number;
- `format`: 1 when the completion is `<answer>...</answer>`, optionally after `<think>...</think>`.

An answer inside `<answer>...</answer>` tags is read from them (a reasoning completion is scored on its answer).
`reward_funcs` also takes `module:function` (or `module.function`) import paths of functions with this signature.
"""

import importlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..evaluation.metrics import normalize_answer

ANSWER_TAGS = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
FORMAT = re.compile(r"^\s*(<think>.*?</think>\s*)?<answer>.*?</answer>\s*$", re.DOTALL)
NUMBER_WORDS = {
    word: value
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
}
NUMBER = re.compile(r"-?\d+(?:\.\d+)?|\b(?:" + "|".join(NUMBER_WORDS) + r")\b", re.IGNORECASE)


def completion_text(completion) -> str:
    """The text of one completion: a string, or the content of TRL's conversational `[{"role": "assistant", ...}]`
    (typed parts joined)."""
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"] if completion else ""
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content if part.get("type") == "text")
    return content or ""


def answer_of(text: str) -> str:
    """The answer a completion gives: inside `<answer>...</answer>` when it has the tags, else the whole text."""
    match = ANSWER_TAGS.search(text)
    return match.group(1) if match else text


def first_number(text: str) -> float | None:
    """The first number in `text` (digits, or a number word up to twenty), or None."""
    match = NUMBER.search(text)
    if match is None:
        return None
    token = match.group(0).lower()
    return float(NUMBER_WORDS[token]) if token in NUMBER_WORDS else float(token)


def exact_match_reward(completions: list, solution: list[str], **kwargs) -> list[float]:
    """1.0 where the completion's answer equals the row's `solution` (normalised as the evaluation does), else 0.0."""
    return [
        float(normalize_answer(answer_of(completion_text(completion))) == normalize_answer(str(expected)))
        for completion, expected in zip(completions, solution, strict=True)
    ]


def numeric_reward(completions: list, solution: list, **kwargs) -> list[float | None]:
    """1.0 where the answer's first number equals the solution's, 0.0 where it differs or is missing; None for rows
    whose solution holds no number."""
    rewards = []
    for completion, expected in zip(completions, solution, strict=True):
        target = first_number(str(expected))
        value = first_number(answer_of(completion_text(completion)))
        rewards.append(None if target is None else float(value is not None and abs(value - target) < 1e-6))
    return rewards


def format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 where the completion is `<answer>...</answer>`, optionally after `<think>...</think>`, else 0.0."""
    return [float(FORMAT.match(completion_text(completion)) is not None) for completion in completions]


REWARDS: dict[str, Callable] = {"exact_match": exact_match_reward, "numeric": numeric_reward, "format": format_reward}


def resolve_reward(name: str) -> Callable:
    """A built-in reward by name, or a function by import path (`package.module:function`); a clear error else."""
    if name in REWARDS:
        return REWARDS[name]
    module_name, separator, attribute = name.partition(":") if ":" in name else name.rpartition(".")
    if not separator or not module_name or not attribute:
        raise ValueError(
            f"reward_funcs: {name!r} is neither a built-in reward ({', '.join(REWARDS)}) nor an import path "
            "(`package.module:function`)."
        )
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"reward_funcs: cannot import {name!r} ({error}).") from None
    if not callable(function):
        raise ValueError(f"reward_funcs: {name!r} is not a function.")
    return function


@dataclass
class Rewards:
    """A GRPO stage's rewards: the functions, their weights (None: 1 each) and the completion length they score."""

    functions: list[Callable]
    weights: list[float] | None = None
    max_new_tokens: int = 12

    def mean(self, prompts: list, answers: list[str], columns: dict) -> float:
        """The mean over rows of the weighted sum of the rewards of `answers` (one per prompt, e.g. greedy ones),
        each function called as TRL calls it (conversational completions, the rows' `columns` and TRL's other
        keyword arguments); a reward that does not apply to a row (None or NaN) adds nothing to it, as in TRL's
        sum."""
        completions = [[{"role": "assistant", "content": answer}] for answer in answers]
        extras = {"completion_ids": None, "trainer_state": None, "log_extra": _ignore, "log_metric": _ignore}
        weights = self.weights or [1.0] * len(self.functions)
        totals = [0.0] * len(answers)
        for function, weight in zip(self.functions, weights, strict=True):
            values = function(prompts=prompts, completions=completions, **columns, **extras)
            for index, value in enumerate(values):
                totals[index] += 0.0 if value is None or math.isnan(value) else weight * value
        return sum(totals) / max(1, len(totals))


def _ignore(*args, **kwargs) -> None:
    """TRL's `log_extra` / `log_metric` outside training: nothing to log to."""


def needs_solution(names: list[str]) -> bool:
    """Whether the built-in rewards among `names` read a `solution` column."""
    return any(name in ("exact_match", "numeric") for name in names)


__all__ = [
    "REWARDS",
    "Rewards",
    "answer_of",
    "completion_text",
    "exact_match_reward",
    "first_number",
    "format_reward",
    "needs_solution",
    "numeric_reward",
    "resolve_reward",
]
