"""Synthetic multimodal data, made on the fly and deterministic by seed (library side).

Images of shapes (kind, colour, size, position, count) with captions, questions of five kinds and yes/no questions
(MME's perception categories), plus text-only facts (a tiny "world knowledge" set that stage 0 teaches and stage 2
must not erase). Every dataset is TRL's
conversational format: `images` (list of PIL images) + `messages`, with `kind` and `answer` columns for evaluation.
Train and held-out splits draw from different seeds and share no image.

Image generation (any-to-any): `generate` rows ask for a picture of a scene ("Draw one small red circle on the
left.") and the assistant answers with an image part (which the chat template writes as the signal tokens); their
`generation_caption` is the scene description the generator is conditioned on and `generation_image` the scene
drawn in its canonical layout (no position jitter: a caption-to-image regression can then learn sharp shapes). The
generation splits share no scene: about one scene in seven (`generation_scenes("heldout")`) is only ever asked for
in the held-out split.
"""

import difflib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from datasets import Dataset, Features, Image, Sequence, Value
from PIL import Image as PILImage
from PIL import ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (235, 205, 30)}
SIZES = {"small": 0.19, "large": 0.30}
ROWS = 3  # shapes sit in `count` of three rows of the chosen half
SUPERSAMPLE = 4
GAP = 3  # pixels kept free between stacked shapes, so counts are never ambiguous
POSITIONS = ("left", "right")
NUMBERS = ("zero", "one", "two", "three")
QUESTIONS = {
    "colour": "What colour are the shapes?",
    "shape": "What shape is in the image?",
    "count": "How many shapes are there?",
    "size": "Are the shapes small or large?",
    "position": "Are the shapes on the left or the right?",
}
# Yes/no questions in MME's four perception categories (POPE asks the first): the template, the scene attribute it
# asks about and the values it can name; half are about the scene's own value (yes), half about another (no).
YES_NO_QUESTIONS = {
    "existence": ("Is there a {} in the image?", "shape", SHAPES),
    "color": ("Are the shapes {}?", "colour", tuple(COLOURS)),
    "count": ("Are there {} shapes in the image?", "count", NUMBERS[1:]),
    "position": ("Are the shapes on the {}?", "position", POSITIONS),
}
YES_NO_SUFFIX = " Please answer yes or no."  # MME's; training rows carry it half the time
TEXT_FACTS = (
    ("What is one plus one?", "two"),
    ("What is one plus two?", "three"),
    ("What is two plus one?", "three"),
    ("What comes after one?", "two"),
    ("What comes after two?", "three"),
    ("What comes before two?", "one"),
    ("What is the opposite of left?", "right"),
    ("What is the opposite of right?", "left"),
    ("What is the opposite of small?", "large"),
    ("What is the opposite of large?", "small"),
    ("What colour is grass?", "green"),
    ("What colour is the sky?", "blue"),
    ("What colour is a lemon?", "yellow"),
    ("What colour is blood?", "red"),
    ("How many corners does a triangle have?", "three"),
    ("How many corners does a circle have?", "zero"),
    ("Which shape is round?", "circle"),
    ("Which shape has four equal sides?", "square"),
)
SPLIT_SEEDS = {"train": 0, "heldout": 1_000_003}
# Scene rows of a canonical layout, by count: one shape in the middle row, two in the outer rows, three in all.
CANONICAL_ROWS = {1: (1,), 2: (0, 2), 3: (0, 1, 2)}
GENERATION_PROMPTS = ("Draw {}.", "Make a picture of {}.", "Show me {}.", "Paint {}.", "Generate an image of {}.")
HELDOUT_SCENE_EVERY = 7  # scene `i` of `all_scenes()` is held out for generation when i % 7 == 3
FEATURES = Features(
    {
        "images": Sequence(Image()),
        "messages": [{"role": Value("string"), "content": Value("string")}],
        "kind": Value("string"),
        "answer": Value("string"),
    }
)
# Typed-part messages (`{"type", "text"}`): what rows with an assistant image part need, since a column cannot
# mix string and list content. `generation_*` are None on rows that ask for no image.
PART = {"type": Value("string"), "text": Value("string")}
GENERATION_FEATURES = Features(
    {
        "images": Sequence(Image()),
        "messages": [{"role": Value("string"), "content": [PART]}],
        "kind": Value("string"),
        "answer": Value("string"),
        "generation_caption": Value("string"),
        "generation_image": Image(),
    }
)
# Typed-part conversations with evaluation columns: images interleaved with text in one turn (`multi-image`).
PARTS_FEATURES = Features(
    {
        "images": Sequence(Image()),
        "messages": [{"role": Value("string"), "content": [PART]}],
        "kind": Value("string"),
        "answer": Value("string"),
    }
)
# Video rows: clips as lists of frames (a `videos` column; no input images).
VIDEO_FEATURES = Features({**FEATURES, "videos": Sequence(Sequence(Image()))})
# Preference pairs (TRL's preference format): a user prompt, the chosen and the rejected assistant turn.
TURNS = [{"role": Value("string"), "content": Value("string")}]
PREFERENCE_FEATURES = Features(
    {
        "images": Sequence(Image()),
        "prompt": TURNS,
        "chosen": TURNS,
        "rejected": TURNS,
        "kind": Value("string"),
        "answer": Value("string"),
    }
)
# The values each question kind can have: a wrong answer of the same kind is a plausible one.
ANSWER_VALUES = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "count": NUMBERS[1:],
    "size": tuple(SIZES),
    "position": POSITIONS,
    "yes/no": ("yes", "no"),
}
# The attributes a caption states, by `Scene` field, and their values.
SCENE_VALUES = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": tuple(SIZES),
    "position": POSITIONS,
    "count": (1, 2, 3),
}
# Questions that compare the count with a number (`compare_rows`): (kind, number) -> question. No SFT stage trains
# them; they are a yes/no rule over what the model reads (the count), so a reward can check the answer (GRPO).
COMPARE_QUESTIONS = {
    ("more", 1): "Is there more than one shape in the image?",
    ("more", 2): "Are there more than two shapes in the image?",
    ("fewer", 2): "Are there fewer than two shapes in the image?",
    ("fewer", 3): "Are there fewer than three shapes in the image?",
}
SWATCH_QUESTION = "What colour is it?"
PAIR_QUESTION = "What colour is the {} image?"
ORDER_QUESTION = "What colour appears {}?"
ORDINALS = ("first", "second")
# Audio rows: clips as `{"array", "sampling_rate"}` (plain arrays: no audio decoder needed to read them back).
AUDIO_FEATURES = Features(
    {
        **FEATURES,
        "audio": [{"array": Sequence(Value("float32")), "sampling_rate": Value("int32")}],
    }
)


@dataclass(frozen=True)
class Scene:
    """What an image shows."""

    shape: str
    colour: str
    size: str
    position: str
    count: int

    def describe(self) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        return f"{NUMBERS[self.count]} {self.size} {self.colour} {noun} on the {self.position}"

    def answer(self, kind: str) -> str:
        return {
            "colour": self.colour,
            "shape": self.shape,
            "count": NUMBERS[self.count],
            "size": self.size,
            "position": self.position,
        }[kind]

    @classmethod
    def from_description(cls, text: str) -> "Scene":
        """The scene `describe()` wrote ("two large red circles on the left")."""
        number, size, colour, noun, *_, position = text.split()
        return cls(
            shape=noun.removesuffix("s"), colour=colour, size=size, position=position, count=NUMBERS.index(number)
        )


def all_scenes() -> list[Scene]:
    """Every scene of the space (3 shapes x 4 colours x 2 sizes x 2 positions x 3 counts = 144), in a fixed order."""
    return [Scene(*values) for values in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS, (1, 2, 3))]


def generation_scenes(split: str) -> list[Scene]:
    """The scenes image-generation rows of `split` ask for: the held-out ones are new combinations of attribute
    values every one of which the train split also shows (each shape-colour pair keeps most of its scenes)."""
    heldout = split == "heldout"
    return [scene for index, scene in enumerate(all_scenes()) if (index % HELDOUT_SCENE_EVERY == 3) == heldout]


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=list(COLOURS)[rng.integers(len(COLOURS))],
        size=list(SIZES)[rng.integers(len(SIZES))],
        position=POSITIONS[rng.integers(len(POSITIONS))],
        count=int(rng.integers(1, 4)),
    )


def render(scene: Scene, rng: np.random.Generator, size: int = 64, jitter: bool = True) -> PILImage.Image:
    """Draw the scene: `count` shapes in as many of three rows of the chosen half, with jitter and background noise.

    Shapes are drawn at `SUPERSAMPLE` times the size and scaled down, so edges are anti-aliased as in a photo and a
    small circle still looks round. `jitter=False` is the canonical layout (rows by count, centred in their slot and
    half): the image is then a function of the description, up to background noise and colour shade.
    """
    background = rng.integers(200, 240, (size, size, 3), dtype=np.uint8)
    layer = PILImage.new("RGBA", (size * SUPERSAMPLE, size * SUPERSAMPLE))
    draw = ImageDraw.Draw(layer)
    side = int(SIZES[scene.size] * size)
    slot = size // ROWS
    half = range(2, size // 2 - side - 1) if scene.position == "left" else range(size // 2 + 1, size - side - 2)
    rows = sorted(rng.choice(ROWS, scene.count, replace=False)) if jitter else CANONICAL_ROWS[scene.count]
    for row in rows:
        x = int(rng.choice(half)) if jitter else half[len(half) // 2]
        free = max(1, slot - side - GAP)
        y = int(row) * slot + (int(rng.integers(0, free)) if jitter else free // 2)
        x, y, s = x * SUPERSAMPLE, y * SUPERSAMPLE, side * SUPERSAMPLE
        colour = tuple(int(c) for c in np.clip(np.array(COLOURS[scene.colour]) + rng.integers(-15, 16, 3), 0, 255))
        if scene.shape == "circle":
            draw.ellipse((x, y, x + s, y + s), fill=colour)
        elif scene.shape == "square":
            draw.rectangle((x, y, x + s, y + s), fill=colour)
        else:
            draw.polygon([(x + s // 2, y), (x, y + s), (x + s, y + s)], fill=colour)
    image = PILImage.fromarray(background).convert("RGBA")
    image.alpha_composite(layer.resize((size, size), PILImage.Resampling.BOX))
    return image.convert("RGB")


def _conversation(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def image_rows(n: int, split: str, task: str, image_size: int = 64, seed: int = 0) -> list[dict]:
    """`n` image rows: `task="caption"` (describe the image) or `"vqa"` (one question of a random kind)."""
    rng = task_rng("caption" if task == "caption" else "vqa", split, seed)
    rows = []
    for _ in range(n):
        scene = random_scene(rng)
        image = render(scene, rng, image_size)
        if task == "caption":
            kind, question, answer = "caption", "Describe the image.", scene.describe()
        else:
            kind = list(QUESTIONS)[rng.integers(len(QUESTIONS))]
            question, answer = QUESTIONS[kind], scene.answer(kind)
        rows.append({"images": [image], "messages": _conversation(question, answer), "kind": kind, "answer": answer})
    return rows


def yes_no_question(scene: Scene, category: str, true: bool, rng: np.random.Generator) -> str:
    """A yes/no question of a `YES_NO_QUESTIONS` category about `scene`, answered yes when `true`."""
    template, attribute, values = YES_NO_QUESTIONS[category]
    actual = scene.answer(attribute)
    others = [value for value in values if value != actual]
    return template.format(actual if true else others[rng.integers(len(others))])


def yes_no_rows(n: int, split: str, image_size: int = 64, seed: int = 0) -> list[dict]:
    """`n` image rows with a yes/no question (kind `yes/no`) of a random category, yes and no equally often."""
    rng = task_rng("yes-no", split, seed)
    rows = []
    for _ in range(n):
        scene = random_scene(rng)
        image = render(scene, rng, image_size)
        category, true = list(YES_NO_QUESTIONS)[rng.integers(len(YES_NO_QUESTIONS))], bool(rng.integers(2))
        question = yes_no_question(scene, category, true, rng) + (YES_NO_SUFFIX if rng.integers(2) else "")
        answer = "yes" if true else "no"
        rows.append(
            {"images": [image], "messages": _conversation(question, answer), "kind": "yes/no", "answer": answer}
        )
    return rows


def text_rows(repeats: int = 1) -> list[dict]:
    """The text-only facts as conversations (no images), `repeats` times each."""
    return [
        {"images": [], "messages": _conversation(q, a), "kind": "text", "answer": a}
        for _ in range(repeats)
        for q, a in TEXT_FACTS
    ]


def text_corpus_rows(n: int, seed: int = 0) -> list[dict]:
    """Text-only pre-training: scene descriptions as sentences and the facts (stage 0 has no pretrained LLM)."""
    rng = task_rng("text", None, seed)
    rows = [
        {
            "images": [],
            "messages": _conversation("Say something.", f"I see {random_scene(rng).describe()}."),
            "kind": "corpus",
            "answer": "",
        }
        for _ in range(n)
    ]
    return rows + text_rows(repeats=max(1, n // (4 * len(TEXT_FACTS))))


def generation_rows(n: int, split: str = "train", image_size: int = 64, seed: int = 0) -> list[dict]:
    """`n` rows asking for a picture of a scene of `split` (a random phrasing); the assistant's answer is an image
    part, `generation_caption` the scene description and `generation_image` the scene in its canonical layout."""
    rng = task_rng("generate", split, seed)
    scenes = generation_scenes(split)
    rows = []
    for _ in range(n):
        scene = scenes[rng.integers(len(scenes))]
        prompt = GENERATION_PROMPTS[rng.integers(len(GENERATION_PROMPTS))].format(scene.describe())
        rows.append(
            {
                "images": [],
                "messages": [
                    {"role": "user", "content": [_text(prompt)]},
                    {"role": "assistant", "content": [{"type": "image", "text": None}]},
                ],
                "kind": "generate",
                "answer": scene.describe(),
                "generation_caption": scene.describe(),
                "generation_image": render(scene, rng, image_size, jitter=False),
            }
        )
    return rows


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _as_parts(row: dict) -> dict:
    """A string-content row in the typed-part form of generation datasets (image placeholders first, as TRL puts
    them), with no generation target."""
    images = [{"type": "image", "text": None}] * len(row["images"])
    messages = [
        {"role": message["role"], "content": [*(images if index == 0 else []), _text(message["content"])]}
        for index, message in enumerate(row["messages"])
    ]
    return {**row, "messages": messages, "generation_caption": None, "generation_image": None}


def wrong_answer(row: dict, rng: np.random.Generator) -> str:
    """A plausible wrong answer to a question row: another value of the same kind, or for a caption the scene
    with one attribute changed (a hallucinated colour, shape, size, side or count)."""
    if row["kind"] == "caption":
        scene = Scene.from_description(row["answer"])
        attribute = list(SCENE_VALUES)[rng.integers(len(SCENE_VALUES))]
        others = [value for value in SCENE_VALUES[attribute] if value != getattr(scene, attribute)]
        return replace(scene, **{attribute: others[rng.integers(len(others))]}).describe()
    others = [value for value in ANSWER_VALUES[row["kind"]] if value != row["answer"]]
    return others[rng.integers(len(others))]


def preference_pair(row: dict, rng: np.random.Generator) -> dict:
    """A question row as a preference pair: its answer chosen over a plausible wrong one (`wrong_answer`)."""
    return {
        "images": row["images"],
        "prompt": [{"role": "user", "content": row["messages"][0]["content"]}],
        "chosen": [{"role": "assistant", "content": row["answer"]}],
        "rejected": [{"role": "assistant", "content": wrong_answer(row, rng)}],
        "kind": row["kind"],
        "answer": row["answer"],
    }


def swatch(colour: str, rng: np.random.Generator, size: int = 32) -> PILImage.Image:
    """A `size x size` image of one colour with a little noise."""
    noise = rng.integers(-20, 21, (size, size, 3))
    return PILImage.fromarray(np.clip(np.array(COLOURS[colour]) + noise, 0, 255).astype(np.uint8))


def swatch_rows(n: int, split: str = "train", image_size: int = 32, seed: int = 0) -> list[dict]:
    """`n` rows asking the colour of a swatch (one colour, a little noise) (kind `colour`)."""
    rng = task_rng("swatch-preference", split, seed)
    rows = []
    for _ in range(n):
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        rows.append(
            {
                "images": [swatch(colour, rng, image_size)],
                "messages": _conversation(SWATCH_QUESTION, colour),
                "kind": "colour",
                "answer": colour,
            }
        )
    return rows


def _ordinal_question(index: int, rng: np.random.Generator) -> tuple[str, tuple[str, str], str]:
    """Row `index` of a two-colour task: which one it asks for (`first` / `second`, alternating), two different
    colours, and the answer."""
    names = list(COLOURS)
    first = names[rng.integers(len(names))]
    second = names[(names.index(first) + rng.integers(1, len(names))) % len(names)]
    kind = ORDINALS[index % 2]
    return kind, (first, second), first if kind == "first" else second


def pair_rows(n: int, split: str = "train", image_size: int = 32, seed: int = 0) -> list[dict]:
    """`n` rows about two swatches of different colours interleaved with text in one turn ("First: <image> Second:
    <image> What colour is the second image?"), asking the first image's colour or the second's (kind `first` /
    `second`, alternating): one image alone answers half of them at best."""
    rng = task_rng("multi-image", split, seed)
    rows = []
    for index in range(n):
        kind, (first, second), answer = _ordinal_question(index, rng)
        image = {"type": "image", "text": None}
        content = [_text("First:"), image, _text("Second:"), image, _text(PAIR_QUESTION.format(kind))]
        rows.append(
            {
                "images": [swatch(first, rng, image_size), swatch(second, rng, image_size)],
                "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": [_text(answer)]}],
                "kind": kind,
                "answer": answer,
            }
        )
    return rows


def order_clip(colours: tuple[str, str], rng: np.random.Generator, size: int = 32, frames: int = 8) -> list:
    """`frames` frames: the first half a swatch of `colours[0]`, the second half one of `colours[1]` (each frame its
    own noise). A frame alone shows one colour; only their order in time says which came first."""
    return [swatch(colours[index * 2 // frames], rng, size) for index in range(frames)]


def order_rows(n: int, split: str = "train", image_size: int = 32, seed: int = 0) -> list[dict]:
    """`n` video rows asking which colour appears first or second in a clip of two colours (kind `first` / `second`,
    alternating)."""
    rng = task_rng("video-order", split, seed)
    rows = []
    for index in range(n):
        kind, (first, second), answer = _ordinal_question(index, rng)
        rows.append(
            {
                "images": [],
                "videos": [order_clip((first, second), rng, image_size)],
                "messages": _conversation(ORDER_QUESTION.format(kind), answer),
                "kind": kind,
                "answer": answer,
            }
        )
    return rows


def preference_rows(rows: list[dict], split: str, seed: int = 0) -> list[dict]:
    """Question rows as preference pairs (`preference_pair`), the wrong answers drawn by seed."""
    rng = task_rng("preference", split, seed)
    return [preference_pair(row, rng) for row in rows]


SAMPLING_RATE = 16000
PITCHES = {"low": 440.0, "high": 1760.0}
AUDIO_QUESTIONS = {"beeps": "How many beeps are there?", "pitch": "Is the sound low or high?"}


@dataclass(frozen=True)
class Sound:
    """What an audio clip holds: `count` beeps of one pitch."""

    count: int
    pitch: str

    def answer(self, kind: str) -> str:
        return NUMBERS[self.count] if kind == "beeps" else self.pitch


def random_sound(rng: np.random.Generator) -> Sound:
    return Sound(count=int(rng.integers(1, 4)), pitch=list(PITCHES)[rng.integers(len(PITCHES))])


def synthesize(sound: Sound, rng: np.random.Generator) -> np.ndarray:
    """A 0.8-1.4 s clip at 16 kHz: `count` beeps (0.12-0.18 s, frequency within 10% of the pitch) in noise."""
    length = int(rng.uniform(0.8, 1.4) * SAMPLING_RATE)
    waveform = rng.normal(0, 0.02, length).astype(np.float32)
    slot = length // sound.count
    for index in range(sound.count):
        duration = int(rng.uniform(0.12, 0.18) * SAMPLING_RATE)
        start = index * slot + int(rng.integers(0, max(1, slot - duration)))
        frequency = PITCHES[sound.pitch] * rng.uniform(0.9, 1.1)
        time = np.arange(duration) / SAMPLING_RATE
        waveform[start : start + duration] += 0.5 * np.sin(2 * np.pi * frequency * time) * np.hanning(duration)
    return waveform


def audio_rows(n: int, split: str = "train", seed: int = 0) -> list[dict]:
    """`n` audio question rows (`audio`: one `{"array", "sampling_rate"}` clip; kinds `beeps` and `pitch`)."""
    rng = task_rng("audio", split, seed)
    rows = []
    for _ in range(n):
        sound = random_sound(rng)
        kind = list(AUDIO_QUESTIONS)[rng.integers(len(AUDIO_QUESTIONS))]
        rows.append(
            {
                "images": [],
                "audio": [{"array": synthesize(sound, rng), "sampling_rate": SAMPLING_RATE}],
                "messages": _conversation(AUDIO_QUESTIONS[kind], sound.answer(kind)),
                "kind": kind,
                "answer": sound.answer(kind),
            }
        )
    return rows


DETAIL_QUESTION = "What colour is the small square?"


def detail_image(colour: str, rng: np.random.Generator, size: int = 32) -> PILImage.Image:
    """A wide `3 size x size` image of grey noise with one small square (`size / 4` px) of `colour` in its left or
    right third: one encoder-sized view (centre-cropped, or shrunk to a third) loses it, AnyRes tiles keep it."""
    pixels = np.repeat(rng.integers(70, 186, (size, 3 * size, 1)), 3, axis=2).astype(np.uint8)
    side = max(2, size // 4)
    left = int(rng.integers(0, size - side)) + (0 if rng.integers(2) else 2 * size)
    top = int(rng.integers(0, size - side))
    pixels[top : top + side, left : left + side] = COLOURS[colour]
    return PILImage.fromarray(pixels)


def detail_rows(n: int, split: str = "train", image_size: int = 32, seed: int = 0) -> list[dict]:
    """`n` rows asking the colour of a small square in a wide image (kind `detail`): a task that needs resolution."""
    rng = task_rng("detail", split, seed)
    rows = []
    for _ in range(n):
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        rows.append(
            {
                "images": [detail_image(colour, rng, image_size)],
                "messages": _conversation(DETAIL_QUESTION, colour),
                "kind": "detail",
                "answer": colour,
            }
        )
    return rows


def compare_rows(n: int, split: str = "train", image_size: int = 64, seed: int = 0) -> list[dict]:
    """`n` image rows asking whether there are more (kind `more`) or fewer (`fewer`) shapes than a number
    (`COMPARE_QUESTIONS`), answered yes or no: a computed answer that a reward can verify."""
    rng = task_rng("count-compare", split, seed)
    rows = []
    for _ in range(n):
        scene = random_scene(rng)
        image = render(scene, rng, image_size)
        kind, number = list(COMPARE_QUESTIONS)[rng.integers(len(COMPARE_QUESTIONS))]
        true = scene.count > number if kind == "more" else scene.count < number
        answer = "yes" if true else "no"
        question = COMPARE_QUESTIONS[kind, number]
        rows.append({"images": [image], "messages": _conversation(question, answer), "kind": kind, "answer": answer})
    return rows


def _joint_rows(n: int, split: str, image_size: int, seed: int) -> list[dict]:
    rows = image_rows(n, split, "vqa", image_size, seed) + yes_no_rows(n // 5, split, image_size, seed)
    return rows + text_rows(repeats=max(1, n // (5 * len(TEXT_FACTS))))


def _generate_joint_rows(n: int, split: str, image_size: int, seed: int) -> list[dict]:
    rows = generation_rows(n // 2, split, image_size, seed)
    return rows + [_as_parts(row) for row in make_dataset("joint", n - n // 2, split, image_size, seed)]


def _preference_source_rows(n: int, split: str, image_size: int, seed: int) -> list[dict]:
    """Half `vqa` questions, half captions as preference pairs; the captions draw from `seed + 1` (caption and vqa
    share stream 0: at one seed the two halves would start from the same scene)."""
    questions = image_rows(n - n // 2, split, "vqa", image_size, seed)
    return preference_rows(questions + image_rows(n // 2, split, "caption", image_size, seed + 1), split, seed)


@dataclass(frozen=True)
class SyntheticTask:
    """One synthetic task of `SYNTHETIC_TASKS`: how its rows are made and what they hold."""

    description: str  # a few words for help texts (`task_menu`): no commas or parentheses
    rows: Callable[[int, str, int, int], list[dict]]  # (n, split, image_size, seed) -> rows, in order
    features: Features  # FEATURES, GENERATION_FEATURES, AUDIO_FEATURES or PREFERENCE_FEATURES
    # The offset this task's own random numbers start from: its rows draw from `SPLIT_SEEDS[split] + seed + stream`
    # (`task_rng`). Each task has its own stream so that tasks given the same seed draw different numbers: `joint`
    # mixes vqa and yes-no rows, the preference tasks draw wrong answers beside their questions, and a stage trained
    # on one task is evaluated on another; with one stream they would open with the same scenes. The values are
    # historical (picked by hand, derived from nothing) and must never change: a task's rows are a function of its
    # stream, and the trained accuracies the tests assert and the README reports were measured on those rows
    # (tests/training/test_synthetic_registry.py pins them). A new task takes an offset no task uses. None: the task
    # draws nothing itself (it mixes other tasks' rows, each from its own stream, or has no randomness).
    stream: int | None = None
    preference: bool = False  # TRL's preference pairs (`prompt` / `chosen` / `rejected`: DPO), not conversations


# Every synthetic task, by the name recipes give (`data: {synthetic: NAME}`) and `make_dataset` takes.
SYNTHETIC_TASKS: dict[str, SyntheticTask] = {
    "text": SyntheticTask(
        "stage 0 text: scene sentences and the facts without images",
        lambda n, split, image_size, seed: text_corpus_rows(n, seed),
        features=FEATURES,
        stream=7,
    ),
    "caption": SyntheticTask(
        "stage 1: describe the image",
        lambda n, split, image_size, seed: image_rows(n, split, "caption", image_size, seed),
        features=FEATURES,
        stream=0,
    ),
    "vqa": SyntheticTask(
        "an image question of a random kind: colour/shape/count/size/position",
        lambda n, split, image_size, seed: image_rows(n, split, "vqa", image_size, seed),
        features=FEATURES,
        stream=0,  # vqa and caption never mix at one seed (`preference` moves its captions to seed + 1)
    ),
    "yes-no": SyntheticTask(
        "yes/no image questions of MME's perception categories",
        lambda n, split, image_size, seed: yes_no_rows(n, split, image_size, seed),
        features=FEATURES,
        stream=41,
    ),
    "joint": SyntheticTask(
        "stage 2: vqa plus a fifth as many yes-no rows and the text facts",
        _joint_rows,  # vqa's and yes-no's streams
        features=FEATURES,
    ),
    "text-eval": SyntheticTask(
        "the text facts once each for evaluation",
        lambda n, split, image_size, seed: text_rows(),
        features=FEATURES,
    ),
    "audio": SyntheticTask(
        "questions about synthetic beeps with an `audio` column",
        lambda n, split, image_size, seed: audio_rows(n, split, seed),
        features=AUDIO_FEATURES,
        stream=11,
    ),
    "multi-image": SyntheticTask(
        "two swatches of different colours in one turn: the colour of the first or the second",
        lambda n, split, image_size, seed: pair_rows(n, split, image_size, seed),
        features=PARTS_FEATURES,
        stream=71,
    ),
    "video-order": SyntheticTask(
        "video clips of two colours one after the other: which appears first or second",
        lambda n, split, image_size, seed: order_rows(n, split, image_size, seed),
        features=VIDEO_FEATURES,
        stream=79,
    ),
    "count-compare": SyntheticTask(
        "whether an image has more or fewer shapes than a number: a yes/no answer a reward can check",
        lambda n, split, image_size, seed: compare_rows(n, split, image_size, seed),
        features=FEATURES,
        stream=83,
    ),
    "detail": SyntheticTask(
        "the colour of a small square in a wide image: needs resolution",
        lambda n, split, image_size, seed: detail_rows(n, split, image_size, seed),
        features=FEATURES,
        stream=31,
    ),
    "generate": SyntheticTask(
        "requests to draw a scene: answered with an image",
        lambda n, split, image_size, seed: generation_rows(n, split, image_size, seed),
        features=GENERATION_FEATURES,
        stream=23,
    ),
    "generate-joint": SyntheticTask(
        "n // 2 generate rows mixed with joint rows",
        _generate_joint_rows,  # generate's stream, then joint's
        features=GENERATION_FEATURES,
    ),
    "preference": SyntheticTask(
        "vqa questions and captions: the right answer over a plausible wrong one",
        _preference_source_rows,
        features=PREFERENCE_FEATURES,
        stream=61,  # the wrong answers (`preference_rows`), in both preference tasks
        preference=True,
    ),
    "swatch-preference": SyntheticTask(
        "a swatch's colour: the right colour over another",
        lambda n, split, image_size, seed: preference_rows(swatch_rows(n, split, image_size, seed), split, seed),
        features=PREFERENCE_FEATURES,
        stream=53,  # the swatches; the wrong answers draw from preference's stream
        preference=True,
    ),
}


def synthetic_task(name: str) -> SyntheticTask:
    """The registry's entry for `name`, or a clear error naming every task."""
    if name in SYNTHETIC_TASKS:
        return SYNTHETIC_TASKS[name]
    close = difflib.get_close_matches(str(name), list(SYNTHETIC_TASKS), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"Unknown synthetic task {name!r}{hint}: use one of {', '.join(SYNTHETIC_TASKS)}.")


def task_rng(task: str, split: str | None, seed: int) -> np.random.Generator:
    """The random numbers of `task`'s own rows: `SPLIT_SEEDS[split] + seed + stream` (a task without splits: None)."""
    return np.random.default_rng((SPLIT_SEEDS[split] if split is not None else 0) + seed + SYNTHETIC_TASKS[task].stream)


def check_split(split: str) -> None:
    """A clear error for a split the synthetic tasks do not have."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split {split!r} is no split of the synthetic tasks: use {' or '.join(SPLIT_SEEDS)}.")


def task_menu() -> str:
    """Every synthetic task with its description, for help texts: what the registry holds."""
    conversations = [f"{name} ({task.description})" for name, task in SYNTHETIC_TASKS.items() if not task.preference]
    pairs = [f"{name} ({task.description})" for name, task in SYNTHETIC_TASKS.items() if task.preference]
    return ", ".join(conversations) + "; preference pairs (DPO): " + ", ".join(pairs)


def make_dataset(task: str, n: int = 512, split: str = "train", image_size: int = 64, seed: int = 0) -> Dataset:
    """A synthetic dataset of a `SYNTHETIC_TASKS` task (`task_menu` lists them), shuffled by `seed`.

    Conversations are TRL's `images` + `messages` (with `kind` and `answer` for evaluation; `audio` rows add an
    `audio` column, the generation tasks `generation_caption` and `generation_image`); the preference tasks give TRL's
    `images` + `prompt` / `chosen` / `rejected` pairs, for DPO. Train and held-out splits share no image.
    """
    entry = synthetic_task(task)
    check_split(split)
    return Dataset.from_list(entry.rows(n, split, image_size, seed), features=entry.features).shuffle(seed=seed)


__all__ = [
    "ANSWER_VALUES",
    "AUDIO_QUESTIONS",
    "COLOURS",
    "COMPARE_QUESTIONS",
    "DETAIL_QUESTION",
    "GENERATION_PROMPTS",
    "PREFERENCE_FEATURES",
    "QUESTIONS",
    "SAMPLING_RATE",
    "SCENE_VALUES",
    "SHAPES",
    "SWATCH_QUESTION",
    "SYNTHETIC_TASKS",
    "TEXT_FACTS",
    "YES_NO_QUESTIONS",
    "YES_NO_SUFFIX",
    "Scene",
    "Sound",
    "SyntheticTask",
    "all_scenes",
    "check_split",
    "audio_rows",
    "compare_rows",
    "detail_image",
    "detail_rows",
    "generation_rows",
    "generation_scenes",
    "make_dataset",
    "preference_pair",
    "preference_rows",
    "random_scene",
    "random_sound",
    "render",
    "swatch_rows",
    "synthetic_task",
    "task_menu",
    "task_rng",
    "wrong_answer",
    "synthesize",
    "yes_no_question",
    "yes_no_rows",
]
