"""What the offline lmms-eval tasks need beyond lmms-eval's own benchmark code (library side).

The task YAMLs in `evaluation_tasks/` call lmms-eval's VQAv2, POPE, MME and ScienceQA functions directly; this adds
only what lmms-eval does not offer: MME's per-category accuracy and accuracy+ as metrics (lmms-eval logs the
per-category score and reports the sum), POPE's yes-ratio as POPE defines it (the share of *answers* that are
"yes": lmms-eval 0.7.3's `pope_aggregate_yes_ratio` counts the ground truth's yes answers, which is 0.5 on every
balanced split whatever the model says), and a multiple-choice task class that stays a simple task under a chat
model (lmms-eval 0.7.3 builds chat tasks for generation only).
"""

from collections import defaultdict

from lmms_eval.api.task import ConfigurableTask
from lmms_eval.tasks.mme.utils import mme_process_results


class MultipleChoiceTask(ConfigurableTask):
    """A YAML task (`class: !function modeling_mmllm.evaluation.benchmark_scoring.MultipleChoiceTask`) that is
    loaded as a simple task whatever the model's kind, so `multiple_choice` runs next to chat generation tasks."""

    def __init__(self, *args, config: dict | None = None, **kwargs) -> None:
        config = {key: value for key, value in (config or {}).items() if key != "class"}
        super().__init__(*args, config=config, **kwargs)


def pope_yes_ratio(records: list[dict]) -> float:
    """Share of the model's answers that are "yes" (POPE's measure of a model's bias towards yes)."""
    return sum(record["prediction"] == "yes" for record in records) / len(records)


def mme_results_by_category(doc: dict, results: list[str]) -> dict:
    """lmms-eval's MME result for one question, plus the same record under the question's per-category metrics."""
    scored = mme_process_results(doc, results)
    record = next(iter(scored.values()))
    return {**scored, f"mme_acc_{doc['category']}": record, f"mme_acc_plus_{doc['category']}": record}


def _pairs(records: list[dict]) -> list[list[float]]:
    scores = defaultdict(list)
    for record in records:
        scores[record["question_id"]].append(record["score"])
    return list(scores.values())


def mme_accuracy(records: list[dict]) -> float:
    """Share of a category's questions answered right, in percent (MME's "accuracy")."""
    return 100.0 * sum(record["score"] for record in records) / len(records)


def mme_accuracy_plus(records: list[dict]) -> float:
    """Share of a category's images whose two questions are both right, in percent (MME's "accuracy+")."""
    pairs = _pairs(records)
    return 100.0 * sum(all(pair) for pair in pairs) / len(pairs)


__all__ = [
    "MultipleChoiceTask",
    "mme_accuracy",
    "mme_accuracy_plus",
    "mme_results_by_category",
    "pope_yes_ratio",
]
