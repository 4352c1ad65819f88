"""Offline benchmarks in the survey's formats, made from the quickstart's synthetic scenes (library side).

No benchmark can be downloaded where mmllm is built and tested, so the lmms-eval tasks in `evaluation_tasks/`
(installed as `modeling_mmllm.evaluation_tasks`) read parquet files written here, with each benchmark's own columns:

- `mmllm_vqav2`: VQAv2 (`question_id`, `question`, `question_type`, `answers`: ten annotator answers,
  `multiple_choice_answer`, `answer_type`, `image_id`, `image`), scored by lmms-eval's VQAv2 code (EvalAI answer
  normalisation, min(#matching annotators / 3, 1) averaged over the ten leave-one-out subsets);
- `mmllm_pope`: POPE (`question_id`, `question`, `answer` yes/no, `image_source`, `category`, `image`), balanced
  yes/no object-existence questions, scored by lmms-eval's POPE code (accuracy, precision, recall, F1, yes-ratio);
- `mmllm_mme`: MME (`question_id` shared by an image's two questions, `question`, `answer` Yes/No, `category`,
  `image`), one yes and one no question per image in four perception categories, scored by lmms-eval's MME code
  (per category accuracy + accuracy+, summed) plus per-category accuracy and accuracy+;
- `mmllm_scienceqa_img`: ScienceQA-IMG (`image`, `question`, `choices`, `answer` index, `hint`, `task`, `grade`,
  `subject`, `topic`, `category`, `skill`, `lecture`, `solution`) as a `multiple_choice` task (loglikelihood of each
  choice), scored by accuracy.

Rows are drawn from the held-out split's seed family (never the training rows) and are deterministic:
`python -m modeling_mmllm.evaluation.offline_benchmarks` rewrites the shipped files, and a test checks that they
equal what this module makes.
"""

import sys
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, Image, Sequence, Value

from ..builders.presets import asset_dir
from ..data.synthetic import (
    COLOURS,
    NUMBERS,
    QUESTIONS,
    SHAPES,
    SPLIT_SEEDS,
    YES_NO_QUESTIONS,
    YES_NO_SUFFIX,
    random_scene,
    render,
    yes_no_question,
)

ROWS = 60  # per benchmark (MME: images, two questions each)
IMAGE_SIZE = 64
SEEDS = {"vqav2": 11, "pope": 12, "mme": 13, "scienceqa_img": 14}  # offsets from the held-out seed
# Ten annotators: most write the canonical answer, some capitalise it, add an article or a full stop, and one in
# ten writes a number as a digit; EvalAI's normalisation makes them all one answer.
ANNOTATOR_FORMS = ("{}", "{}", "{}", "{}", "{}", "{}", "{}.", "{cap}", "the {}", "{digit}")
DIGITS = {word: str(number) for number, word in enumerate(NUMBERS)}
VQA_TYPES = {
    "colour": ("what color are the", "other"),
    "shape": ("what shape is", "other"),
    "count": ("how many", "number"),
    "size": ("are the", "other"),
    "position": ("are the", "other"),
}

VQAV2_FEATURES = Features(
    {
        "question_id": Value("int64"),
        "question": Value("string"),
        "question_type": Value("string"),
        "answers": [{"answer": Value("string"), "answer_confidence": Value("string"), "answer_id": Value("int64")}],
        "multiple_choice_answer": Value("string"),
        "answer_type": Value("string"),
        "image_id": Value("int64"),
        "image": Image(),
    }
)
POPE_FEATURES = Features(
    {
        "question_id": Value("string"),
        "question": Value("string"),
        "answer": Value("string"),
        "image_source": Value("string"),
        "category": Value("string"),
        "image": Image(),
    }
)
MME_FEATURES = Features(
    {
        "question_id": Value("string"),
        "question": Value("string"),
        "answer": Value("string"),
        "category": Value("string"),
        "image": Image(),
    }
)
SCIENCEQA_FEATURES = Features(
    {
        "image": Image(),
        "question": Value("string"),
        "choices": Sequence(Value("string")),
        "answer": Value("int64"),
        "hint": Value("string"),
        "task": Value("string"),
        "grade": Value("string"),
        "subject": Value("string"),
        "topic": Value("string"),
        "category": Value("string"),
        "skill": Value("string"),
        "lecture": Value("string"),
        "solution": Value("string"),
    }
)


def _scenes(benchmark: str, n: int):
    """`n` (scene, image, rng) triples of a benchmark's own seed."""
    rng = np.random.default_rng(SPLIT_SEEDS["heldout"] + SEEDS[benchmark])
    for _ in range(n):
        scene = random_scene(rng)
        yield scene, render(scene, rng, IMAGE_SIZE), rng


def _annotator_answers(answer: str) -> list[dict]:
    forms = [form.format(answer, cap=answer.capitalize(), digit=DIGITS.get(answer, answer)) for form in ANNOTATOR_FORMS]
    return [{"answer": form, "answer_confidence": "yes", "answer_id": index + 1} for index, form in enumerate(forms)]


def vqav2_rows(n: int = ROWS) -> list[dict]:
    """Open-answer questions of the quickstart's five kinds, with ten annotator answers each."""
    rows = []
    for index, (scene, image, rng) in enumerate(_scenes("vqav2", n)):
        kind = list(QUESTIONS)[rng.integers(len(QUESTIONS))]
        question_type, answer_type = VQA_TYPES[kind]
        answer = scene.answer(kind)
        rows.append(
            {
                "question_id": index * 10 + 1,
                "question": QUESTIONS[kind],
                "question_type": question_type,
                "answers": _annotator_answers(answer),
                "multiple_choice_answer": answer,
                "answer_type": answer_type,
                "image_id": index,
                "image": image,
            }
        )
    return rows


def pope_rows(n: int = ROWS) -> list[dict]:
    """ "Is there a SHAPE in the image?", alternately about the shape shown (yes) and a random absent one (no)."""
    rows = []
    for index, (scene, image, rng) in enumerate(_scenes("pope", n)):
        present = index % 2 == 0
        rows.append(
            {
                "question_id": str(index),
                "question": yes_no_question(scene, "existence", present, rng),
                "answer": "yes" if present else "no",
                "image_source": f"synthetic_{index:04d}",
                "category": "random",
                "image": image,
            }
        )
    return rows


def mme_rows(n: int = ROWS) -> list[dict]:
    """Two questions per image (one answered Yes, one No) of a category taken in turn."""
    rows = []
    for index, (scene, image, rng) in enumerate(_scenes("mme", n)):
        category = list(YES_NO_QUESTIONS)[index % len(YES_NO_QUESTIONS)]
        for true, answer in ((True, "Yes"), (False, "No")):
            rows.append(
                {
                    "question_id": f"{category}/{index:04d}.png",
                    "question": yes_no_question(scene, category, true, rng) + YES_NO_SUFFIX,
                    "answer": answer,
                    "category": category,
                    "image": image,
                }
            )
    return rows


def scienceqa_rows(n: int = ROWS) -> list[dict]:
    """Closed-choice questions (the quickstart's five kinds) over every value of the asked attribute."""
    options = {
        "colour": list(COLOURS),
        "shape": list(SHAPES),
        "count": list(NUMBERS[1:]),
        "size": ["small", "large"],
        "position": ["left", "right"],
    }
    rows = []
    for scene, image, rng in _scenes("scienceqa_img", n):
        kind = list(QUESTIONS)[rng.integers(len(QUESTIONS))]
        choices = [str(choice) for choice in rng.permutation(options[kind])]
        rows.append(
            {
                "image": image,
                "question": QUESTIONS[kind],
                "choices": choices,
                "answer": choices.index(scene.answer(kind)),
                "hint": "",
                "task": "closed choice",
                "grade": "grade1",
                "subject": "natural science",
                "topic": "shapes",
                "category": kind,
                "skill": f"identify {kind}",
                "lecture": "",
                "solution": f"The answer is {scene.answer(kind)}.",
            }
        )
    return rows


BENCHMARKS = {
    "mmllm_vqav2": (vqav2_rows, VQAV2_FEATURES),
    "mmllm_pope": (pope_rows, POPE_FEATURES),
    "mmllm_mme": (mme_rows, MME_FEATURES),
    "mmllm_scienceqa_img": (scienceqa_rows, SCIENCEQA_FEATURES),
}


def benchmark_dataset(name: str) -> Dataset:
    """The rows of one offline benchmark (`mmllm_vqav2`, `mmllm_pope`, `mmllm_mme`, `mmllm_scienceqa_img`)."""
    rows, features = BENCHMARKS[name]
    return Dataset.from_list(rows(), features=features)


def tasks_dir() -> Path:
    """The folder of mmllm's lmms-eval tasks (`--include_path` for `python -m lmms_eval`)."""
    return asset_dir("evaluation_tasks")


def write_benchmarks(folder: Path | None = None) -> list[Path]:
    """Write `<name>.parquet` for every benchmark into `folder` (the task YAMLs read them from beside themselves)."""
    paths = []
    for name in BENCHMARKS:
        path = Path(folder or tasks_dir()) / f"{name}.parquet"
        temporary = path.with_suffix(".parquet.tmp")
        benchmark_dataset(name).to_parquet(temporary)
        temporary.replace(path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_benchmarks(Path(sys.argv[1]) if len(sys.argv) > 1 else None):
        print(written)


__all__ = ["BENCHMARKS", "benchmark_dataset", "tasks_dir", "write_benchmarks"]
