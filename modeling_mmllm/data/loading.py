"""Training data for recipes: synthetic sets, `datasets` datasets, LLaVA-style JSON, VQA rows (library side).

Every source becomes TRL's conversational format (`images` + `messages`), or for preference tuning TRL's
preference format (`images` + `prompt` / `chosen` / `rejected`). VQA-style rows (`question` + `answer`, or VQAv2's
`answers` list; an optional `image` and `kind`) become conversations with `answer` and `kind` columns, so they train
and evaluate as they are. Rows whose images (input images, or the
`generation_image` targets of image-generation rows) are missing or cannot be decoded are found before training and
reported by row index: skipped with a count, or the run stops.
"""

import json
from collections import Counter
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

from datasets import Dataset, Features, Image, Sequence, Value, load_dataset, load_from_disk
from PIL import Image as PILImage

from ..processing_mmllm import clip_frames
from ..utils.logging import get_logger
from .synthetic import GENERATION_FEATURES, GENERATION_PROMPTS, make_dataset

if TYPE_CHECKING:
    from ..training.recipe_sections import DataSection

logger = get_logger(__name__)

DATA_FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # suffix -> datasets' builder
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
PART = {"type": Value("string"), "text": Value("string")}
LLAVA_FEATURES = Features({"images": Sequence(Image()), "messages": [{"role": Value("string"), "content": [PART]}]})
# VQA rows: the question column, the answer columns (VQAv2's `answers` list gives its most common answer), the image
# and kind columns, each by priority.
VQA_ANSWERS = ("answer", "multiple_choice_answer", "answers")
VQA_IMAGES = ("image", "images", "image_path")
VQA_KINDS = ("kind", "question_type", "answer_type")
VQA_FEATURES = Features({**LLAVA_FEATURES, "kind": Value("string"), "answer": Value("string")})
OTHER_LAYOUTS = (
    "VQA rows (`question` + `answer` or VQAv2's `answers` list; optional `image` or `image_path`, relative to the "
    "data file's folder or `image_folder`, and `kind` or `question_type`), or a LLaVA conversation file "
    "(`llava_json: FILE`, `image_folder: DIR`)"
)


def llava_json_dataset(json_file: str, image_folder: str) -> Dataset:
    """LLaVA conversation files (`"image"`, `"conversations": [{"from", "value"}]`) as TRL rows.

    `<image>` stays where the text puts it (a typed image part); rows without `"image"` are text-only.
    """
    records = json.loads(Path(json_file).read_text())
    rows = []
    for index, record in enumerate(records):
        images = record.get("image") or []
        images = [images] if isinstance(images, str) else images
        messages = _llava_messages(record, index, len(images), json_file)
        rows.append({"images": [str(Path(image_folder) / name) for name in images], "messages": messages})
    return Dataset.from_list(rows, features=LLAVA_FEATURES)


def _llava_messages(record: dict, index: int, images: int, json_file: str) -> list[dict]:
    """One LLaVA record's turns as typed-part messages. A record with one image and no `<image>` tag gets it before
    its first question (as LLaVA's own loader does); any other mismatch, or an unknown role, is a clear error."""
    where = f"{json_file}, row {index} (id {record.get('id', '?')})"
    unknown = sorted({turn.get("from") for turn in record.get("conversations", [])} - set(ROLES), key=str)
    if unknown or not record.get("conversations"):
        raise ValueError(
            f"{where}: conversation turns need a `from` of {', '.join(ROLES)} and a `value`; got {unknown or 'none'}."
        )
    messages = [{"role": ROLES[turn["from"]], "content": _parts(turn["value"])} for turn in record["conversations"]]
    tags = sum(part["type"] == "image" for message in messages for part in message["content"])
    if images == 1 and tags == 0:
        first = next(message for message in messages if message["role"] == "user")
        first["content"].insert(0, {"type": "image", "text": None})
    elif tags != images:
        raise ValueError(
            f"{where}: {tags} <image> tag(s) for {images} image(s): put one <image> in the text per image "
            "(a record with one image may also have none: the image then comes first)."
        )
    return messages


def llava_generation_dataset(json_file: str, image_folder: str) -> Dataset:
    """LLaVA caption conversations turned around for image generation (NExT-GPT's decoding-side alignment): the
    last assistant answer (the caption) becomes the request "Draw {caption}." (phrasings rotate) answered with an
    image part, `generation_caption` the caption and `generation_image` the record's image. Records without an
    image are left out."""
    records = [record for record in json.loads(Path(json_file).read_text()) if record.get("image")]
    rows = []
    for index, record in enumerate(records):
        caption = next(
            turn["value"] for turn in reversed(record["conversations"]) if ROLES[turn["from"]] == "assistant"
        )
        caption = caption.strip().rstrip(".")
        image = record["image"] if isinstance(record["image"], str) else record["image"][0]
        request = GENERATION_PROMPTS[index % len(GENERATION_PROMPTS)].format(caption)
        rows.append(
            {
                "images": [],
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": request}]},
                    {"role": "assistant", "content": [{"type": "image", "text": None}]},
                ],
                "kind": "generate",
                "answer": caption,
                "generation_caption": caption,
                "generation_image": str(Path(image_folder) / image),
            }
        )
    return Dataset.from_list(rows, features=GENERATION_FEATURES)


def is_vqa(dataset: Dataset) -> bool:
    """Whether `dataset` has VQA-style rows: a `question` and an answer column, and no `messages`."""
    columns = set(dataset.column_names)
    return "question" in columns and bool(columns & set(VQA_ANSWERS)) and "messages" not in columns


def vqa_dataset(dataset: Dataset, image_folder: str | Path = ".") -> Dataset:
    """VQA rows as conversations: the question (after its images, or with them where it says `<image>`) answered by
    the answer, plus `answer` and `kind` columns for evaluation (no `kind` when the rows have none). Image paths are
    relative to `image_folder`."""
    columns = dataset.column_names
    answers, kinds = [c for c in VQA_ANSWERS if c in columns], [c for c in VQA_KINDS if c in columns]
    images = [column for column in VQA_IMAGES if column in columns]
    for column in images:
        dataset = _undecoded(dataset, column)  # paths and bytes pass through as they are

    def convert(row: dict) -> dict:
        answer = _vqa_answer(_first(row, answers))
        converted = {"images": _vqa_images(_first(row, images), Path(image_folder)), "answer": answer}
        content = _question_parts(str(row["question"]), len(converted["images"]))
        converted["messages"] = [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
        if kinds:
            kind = _first(row, kinds)
            converted["kind"] = "other" if kind is None else str(kind)
        return converted

    features = VQA_FEATURES if kinds else Features({k: v for k, v in VQA_FEATURES.items() if k != "kind"})
    return dataset.map(convert, remove_columns=columns, features=features, desc="VQA rows to conversations")


def _first(row: dict, columns: list[str]):
    """The row's value in the first of `columns` that has one (files mix `answer` and `answers` rows)."""
    return next((row[column] for column in columns if row[column] not in (None, [], "")), None)


def _undecoded(dataset: Dataset, column: str) -> Dataset:
    """`dataset` with an image column (one image or a list) left as paths / bytes, not decoded."""
    feature = dataset.features[column]
    if isinstance(feature, Image):
        return dataset.cast_column(column, Image(decode=False))
    if isinstance(getattr(feature, "feature", None), Image):
        return dataset.cast_column(column, Sequence(Image(decode=False)))
    return dataset


def _vqa_answer(answer) -> str:
    """One answer: the text, or the most common of VQAv2's answers (strings or `{"answer": ...}` records)."""
    if isinstance(answer, list):
        answers = [item.get("answer") if isinstance(item, dict) else item for item in answer]
        answers = [str(item).strip() for item in answers if item is not None]
        return Counter(answers).most_common(1)[0][0] if answers else ""
    return "" if answer is None else str(answer).strip()


def _vqa_images(value, folder: Path) -> list:
    """A row's images (none, one or a list: paths, `{"bytes", "path"}` records or PIL images), relative paths read
    from `folder`."""
    items = [] if value is None else value if isinstance(value, list) else [value]
    resolved = []
    for item in items:
        if isinstance(item, str):
            item = _resolved(item, folder)
        elif isinstance(item, dict) and item.get("bytes") is None and item.get("path"):
            item = {"bytes": None, "path": _resolved(item["path"], folder)}
        resolved.append(item)
    return resolved


def _resolved(path: str, folder: Path) -> str:
    return path if "://" in path or Path(path).is_absolute() else str(folder / path)


def _question_parts(question: str, images: int) -> list[dict]:
    """Typed parts of a question: its images first, unless it places them with `<image>` (one per image)."""
    if "<image>" not in question:
        return [{"type": "image", "text": None}] * images + [{"type": "text", "text": question}]
    if question.count("<image>") != images:
        raise ValueError(
            f"A VQA question has {question.count('<image>')} <image> marker(s) but its row has {images} image(s): "
            f"{question[:80]!r}. Give each marker an image, or remove the markers (images then go first)."
        )
    return _parts(question)


def _parts(text: str) -> list[dict]:
    parts = []
    for index, piece in enumerate(text.split("<image>")):
        if index:
            parts.append({"type": "image", "text": None})
        piece = piece.strip("\n")
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def find_bad_rows(dataset: Dataset) -> dict[int, str]:
    """Row index -> reason, for rows whose images (or `generation_image` target) are missing or cannot be decoded,
    or whose video clips cannot be read or have no frames."""
    raw = dataset.cast_column("images", Sequence(Image(decode=False)))
    targets = "generation_image" in raw.column_names
    if targets:
        raw = raw.cast_column("generation_image", Image(decode=False))
    bad = {}
    for index, row in enumerate(raw):
        for image in [*row["images"], *([row["generation_image"]] if targets and row["generation_image"] else [])]:
            reason = _image_problem(image)
            if reason:
                bad[index] = reason
                break
    if "videos" in dataset.column_names:
        bad.update(_bad_video_rows(dataset))
    return dict(sorted(bad.items()))


def _bad_video_rows(dataset: Dataset) -> dict[int, str]:
    """Row index -> reason, for rows with a video clip that cannot be read or has no frames (`clip_frames`)."""
    videos, bad = dataset.select_columns(["videos"]), {}
    for index in range(len(videos)):
        try:
            for position, clip in enumerate(videos[index]["videos"] or []):
                clip_frames(clip, position)
        except Exception as error:  # a frame that does not decode raises as the row is read
            bad[index] = f"bad video ({error})"
    return bad


def _image_problem(image: dict) -> str | None:
    try:
        if image.get("bytes") is not None:
            PILImage.open(BytesIO(image["bytes"])).load()
        elif image.get("path") and Path(image["path"]).is_file():
            PILImage.open(image["path"]).load()
        else:
            return f"missing image file {image.get('path')!r}"
    except Exception as error:  # PIL raises several types for corrupt files
        return f"unreadable image {image.get('path') or '(embedded bytes)'}: {error}"
    return None


PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


def load_training_data(spec: "dict | DataSection", bad_rows: str = "stop", layout: str = "conversation") -> Dataset:
    """The recipe's `data` section (a dict, partial or normalised, or a `DataSection`) as a dataset, with bad rows
    skipped or reported (`bad_rows: skip | stop`).

    `layout` is what the trainer reads: `conversation` (`images` + `messages`, SFT), `preference` (`prompt` /
    `chosen` / `rejected`, with `images` for image pairs: DPO; a pair with an empty answer is a bad row), `prompt`
    (`prompt` + `images` and the columns rewards read, GRPO: conversations become prompts, `prompt_rows`) or `any`.
    """
    from ..training.recipe_sections import DataSection  # here: importing training imports this module

    section = DataSection.parse("data", spec)
    dataset = _source_dataset(section)
    if "videos" in dataset.column_names and "images" not in dataset.column_names:  # TRL finds vision data by images
        dataset = dataset.add_column("images", [[] for _ in range(len(dataset))])
    check_layout(dataset, layout)
    if layout in ("preference", "prompt") and "videos" in dataset.column_names:
        trainer = "DPO" if layout == "preference" else "GRPO"
        raise ValueError(
            f"Rows with a `videos` column: {trainer} trains on images only (TRL's {trainer} trainer reads "
            "`images`); train video rows with SFT, or give the rows frames as `images`."
        )
    if layout == "prompt" and "prompt" not in dataset.column_names:
        dataset = prompt_rows(dataset)
    if section.synthetic is not None:  # made here: nothing to check
        return dataset
    bad = find_bad_rows(dataset) if "images" in dataset.column_names else {}
    what = "bad images or videos" if "videos" in dataset.column_names else "bad images"
    if is_preference(dataset):
        bad, what = dict(sorted({**empty_answer_rows(dataset), **bad}.items())), "bad images or empty answers"
    dataset = drop_bad_rows(dataset, bad, bad_rows, what)
    if "images" in dataset.column_names and dataset.features["images"] != Sequence(Image()):
        dataset = dataset.cast_column("images", Sequence(Image()))  # image paths (a json file's) are opened
    return dataset


def prompt_rows(dataset: Dataset) -> Dataset:
    """Conversations as TRL's prompt rows (GRPO): `prompt` is the conversation up to its last assistant turn, and
    `solution` the row's `answer` column, else the text of that turn (a conversation without one is all prompt).
    Every other column stays (rewards read them)."""
    from ..training.rewards import completion_text  # here: importing training imports this module

    def convert(row: dict) -> dict:
        messages = row["messages"]
        last = max((i for i, message in enumerate(messages) if message["role"] == "assistant"), default=None)
        if last is None:
            return {"prompt": messages, "solution": row.get("answer") or ""}
        return {"prompt": messages[:last], "solution": row.get("answer") or completion_text(messages[: last + 1])}

    return dataset.map(convert, remove_columns=["messages"])


def _source_dataset(section: "DataSection") -> Dataset:
    """The rows of a `DataSection`'s one source (the section checked the source, the synthetic task and `task`)."""
    if section.synthetic is not None:
        return make_dataset(
            section.synthetic, n=section.n, split=section.split, image_size=section.image_size, seed=section.seed
        )
    if section.llava_json is not None:
        source = llava_generation_dataset if section.task == "generate" else llava_json_dataset
        return source(section.llava_json, section.image_folder or ".")  # unset: image names relative to here
    dataset = _load_dataset(section.dataset, section.split)
    if is_vqa(dataset):  # unset: image paths relative to the data file's folder
        dataset = vqa_dataset(dataset, section.image_folder or _data_folder(section.dataset))
    return dataset


def _data_folder(name_or_path: str) -> Path:
    """Where a dataset's relative image paths start: the data file's folder, a saved dataset's own, else here."""
    path = Path(name_or_path)
    return path.parent if path.is_file() else path if path.is_dir() else Path(".")


def is_preference(dataset: Dataset) -> bool:
    """Whether `dataset` is in TRL's preference format (`prompt`, `chosen`, `rejected` columns)."""
    return set(PREFERENCE_COLUMNS) <= set(dataset.column_names)


def check_layout(dataset: Dataset, layout: str) -> None:
    """A clear error when the data is not in the format the trainer (or the evaluation, `layout="any"`) reads: it
    names the layouts accepted and their columns."""
    columns = dataset.column_names
    conversation = {"images", "messages"} <= set(columns)
    if layout == "preference" and not is_preference(dataset):
        raise ValueError(
            "Preference data (trainer: dpo) needs `prompt`, `chosen` and `rejected` columns, plus `images` for "
            f"image pairs (TRL's preference format); got {columns}."
        )
    if layout == "conversation" and not conversation:
        hint = " This is preference data: train it with `trainer: dpo`." if is_preference(dataset) else ""
        raise ValueError(
            f"Training data needs `images` and `messages` columns (TRL's conversations), or {OTHER_LAYOUTS}; got "
            f"columns {columns}.{hint}"
        )
    if layout == "prompt" and not (conversation or "prompt" in columns):
        raise ValueError(
            "GRPO data needs a `prompt` column (TRL's prompt format, with `images` for image prompts and the columns "
            f"the rewards read, e.g. `solution`), or conversations (`images` + `messages`); got columns {columns}."
        )
    if layout == "any" and not (conversation or is_preference(dataset)):
        raise ValueError(
            "Evaluation data needs `images` and `messages` columns (TRL's conversations), preference pairs "
            f"(`prompt`, `chosen`, `rejected`), or {OTHER_LAYOUTS}; got columns {columns}."
        )


def load_evaluation_data(spec: "dict | DataSection", bad_rows: str = "stop") -> Dataset:
    """Rows to score by exact match (`answer`, optional `kind`): a `data`-style spec, in any layout the recipes
    train on (VQA rows included); errors speak of evaluation data."""
    dataset = load_training_data(spec, bad_rows=bad_rows, layout="any")
    if "answer" not in dataset.column_names:
        raise ValueError(
            "Evaluation data needs an `answer` column (and `kind` for per-kind accuracy), or VQA rows (`question` + "
            f"`answer` or `answers`); got columns {dataset.column_names}."
        )
    return dataset


def empty_answer_rows(dataset: Dataset) -> dict[int, str]:
    """Row index -> reason, for preference pairs whose chosen or rejected answer has no text."""
    bad = {}
    for index, row in enumerate(dataset.select_columns(["chosen", "rejected"])):
        empty = [column for column in ("chosen", "rejected") if not _answer_text(row[column]).strip()]
        if empty:
            bad[index] = f"an empty {' and '.join(empty)} answer"
    return bad


def _answer_text(answer) -> str:
    """The text of an answer: a string, or the assistant turns' text (string or typed-part content)."""
    if isinstance(answer, str):
        return answer
    texts = []
    for message in answer or []:
        content = message.get("content")
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        texts += [part.get("text") or "" for part in parts if part.get("type") == "text"]
    return "".join(texts)


def drop_bad_rows(dataset: Dataset, bad: dict[int, str], bad_rows: str, what: str) -> Dataset:
    """Stop with the bad rows' indices and reasons (`bad_rows: stop`), or leave them out with a count (`skip`)."""
    if bad and bad_rows == "stop":
        listing = "; ".join(f"row {index}: {reason}" for index, reason in list(bad.items())[:10])
        raise ValueError(f"{len(bad)} row(s) with {what} ({listing}). Fix them, or set `bad_rows: skip`.")
    if bad:
        logger.warning(f"Skipping {len(bad)} row(s) with {what}: rows {sorted(bad)[:20]}")
        dataset = dataset.select([index for index in range(len(dataset)) if index not in bad])
    return dataset


def _load_dataset(name_or_path: str, split: str) -> Dataset:
    path = Path(name_or_path)
    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        loaded = load_from_disk(str(path))
        return loaded[split] if hasattr(loaded, "keys") else loaded
    if path.is_file():
        kind = DATA_FILE_FORMATS.get(path.suffix)
        if kind is None:
            raise ValueError(
                f"{path}: {path.suffix or 'a file without a suffix'} is no data format mmllm reads: give a .json, "
                ".jsonl or .parquet file (or a saved dataset folder; a LLaVA conversation file goes in llava_json)."
            )
        return load_dataset(kind, data_files=str(path), split=split)
    return load_dataset(name_or_path, split=split)


__all__ = [
    "PREFERENCE_COLUMNS",
    "check_layout",
    "prompt_rows",
    "drop_bad_rows",
    "empty_answer_rows",
    "find_bad_rows",
    "is_preference",
    "is_vqa",
    "llava_generation_dataset",
    "llava_json_dataset",
    "load_evaluation_data",
    "load_training_data",
    "vqa_dataset",
]
