"""The offline lmms-eval tasks score like their benchmarks: each task, loaded by lmms-eval from the shipped YAML, is
fed hand-made predictions and must give the figures the benchmark's definition gives (a wrong normalisation, a
metric wired to the wrong aggregation or a yes-ratio of the ground truth fails here)."""

import numpy as np
import pytest
from datasets import Dataset

from modeling_mmllm.evaluation.offline_benchmarks import BENCHMARKS, benchmark_dataset, tasks_dir

lmms_eval_tasks = pytest.importorskip("lmms_eval.tasks", reason="the offline tasks need mmllm[eval] (lmms-eval)")


def _leaves(tasks: dict):
    for key, value in tasks.items():
        yield from _leaves(value) if isinstance(value, dict) else [(key, value)]


@pytest.fixture(scope="module")
def tasks() -> dict:
    """The four offline tasks as lmms-eval builds them from the group `mmllm_offline`."""
    manager = lmms_eval_tasks.TaskManager(include_path=str(tasks_dir()))
    return dict(_leaves(lmms_eval_tasks.get_task_dict(["mmllm_offline"], manager)))


def _scores(task, docs: list[dict], predictions: list) -> dict:
    """The task's aggregated metrics over `docs` answered with `predictions` (one per doc)."""
    per_metric: dict[str, list] = {}
    for doc, prediction in zip(docs, predictions, strict=True):
        results = prediction if task.OUTPUT_TYPE == "multiple_choice" else [prediction]
        for metric, value in task.process_results(doc, results).items():
            per_metric.setdefault(metric, []).append(value)
    return {metric: task.aggregation()[metric](values) for metric, values in per_metric.items()}


def test_the_group_holds_the_four_benchmarks(tasks):
    assert {name: task.OUTPUT_TYPE for name, task in tasks.items()} == {
        "mmllm_vqav2": "generate_until",
        "mmllm_pope": "generate_until",
        "mmllm_mme": "generate_until",
        "mmllm_scienceqa_img": "multiple_choice",
    }


def _vqa_doc(answers: list[str]) -> dict:
    return {"question_id": 1, "answers": [{"answer": answer, "answer_id": i} for i, answer in enumerate(answers)]}


@pytest.mark.parametrize(
    "answers, prediction, accuracy",
    [
        (["green"] * 6 + ["green.", "Green", "the green", "green"], "The green.", 1.0),  # article, case, full stop
        (["two"] * 9 + ["2"], "2", 1.0),  # a number word and its digit are one answer
        (["green"] * 10, "red", 0.0),
        # two of ten annotators agree: min(matches / 3, 1) over the ten leave-one-out subsets averages to 0.6
        (["red", "red"] + ["blue"] * 8, "red", 0.6),
    ],
)
def test_vqav2_accuracy_normalises_answers_like_evalai(tasks, answers, prediction, accuracy):
    assert _scores(tasks["mmllm_vqav2"], [_vqa_doc(answers)], [prediction])["exact_match"] == pytest.approx(accuracy)


def test_vqav2_rows_have_ten_annotators_agreeing_after_normalisation(tasks):
    task = tasks["mmllm_vqav2"]
    docs = list(task.test_docs())
    assert all(len(doc["answers"]) == 10 for doc in docs)
    assert _scores(task, docs, [doc["multiple_choice_answer"] for doc in docs])["exact_match"] == 1.0


def test_pope_accuracy_precision_recall_f1_and_yes_ratio(tasks):
    docs = [{"question_id": str(i), "answer": answer} for i, answer in enumerate(["yes", "yes", "no", "no"])]
    scores = _scores(tasks["mmllm_pope"], docs, ["Yes", "yes", "yes", "no"])
    # TP 2, FP 1, FN 0, TN 1: the model said yes three times in four
    assert scores == pytest.approx(
        {
            "pope_accuracy": 0.75,
            "pope_precision": 2 / 3,
            "pope_recall": 1.0,
            "pope_f1_score": 0.8,
            "pope_yes_ratio": 0.75,
        }
    )
    always_no = _scores(tasks["mmllm_pope"], docs, ["no"] * 4)
    assert always_no["pope_yes_ratio"] == 0.0 and always_no["pope_recall"] == 0.0 and always_no["pope_accuracy"] == 0.5


def test_mme_per_category_accuracy_accuracy_plus_and_summed_score(tasks):
    task = tasks["mmllm_mme"]
    docs = list(task.test_docs())[:4]  # image 0 (existence) and image 1 (color): a Yes and a No question each
    assert [(doc["category"], doc["answer"]) for doc in docs] == [
        ("existence", "Yes"),
        ("existence", "No"),
        ("color", "Yes"),
        ("color", "No"),
    ]
    assert docs[0]["question_id"] == docs[1]["question_id"] != docs[2]["question_id"]
    scores = _scores(task, docs, ["Yes", "No.", "yes", "Yes"])  # image 0 both right, image 1 one of two
    assert scores["mme_acc_existence"] == 100.0 and scores["mme_acc_plus_existence"] == 100.0
    assert scores["mme_acc_color"] == 50.0 and scores["mme_acc_plus_color"] == 0.0
    assert scores["mme_perception_score"] == pytest.approx(100 + 100 + 50 + 0)  # MME: acc + acc+ summed


def test_scienceqa_accuracy_takes_the_most_likely_choice(tasks):
    task = tasks["mmllm_scienceqa_img"]
    doc = next(iter(task.test_docs()))
    choices, gold = task.doc_to_choice(doc), doc["answer"]
    assert choices[gold] in doc["solution"]
    # (negative log-likelihood, is_greedy) per choice, as our lmms-eval model returns them: lower is more likely
    likely_gold = [(0.5 if index == gold else 4.0, index == gold) for index in range(len(choices))]
    likely_other = [(4.0 if index == gold else 0.5, False) for index in range(len(choices))]
    assert _scores(task, [doc, doc], [likely_gold, likely_other])["acc"] == 0.5


@pytest.mark.parametrize("name", BENCHMARKS)
def test_shipped_parquet_is_what_the_generator_makes(name):
    """The committed data files are reproducible: `python -m modeling_mmllm.evaluation.offline_benchmarks`."""
    shipped = Dataset.from_parquet(str(tasks_dir() / f"{name}.parquet"))
    made = benchmark_dataset(name)
    assert shipped.features == made.features and len(shipped) == len(made)
    for shipped_row, made_row in zip(shipped, made):
        for column, value in made_row.items():
            if column == "image":
                assert np.array_equal(np.asarray(shipped_row[column]), np.asarray(value))
            else:
                assert shipped_row[column] == value, column
