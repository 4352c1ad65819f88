"""An independent judge of generated shape images: what shape and colour does an image show? (library side)

A tiny CNN trained on the synthetic renderer's own images (the shapes data, jittered and canonical layouts, some
blurred), never on generated ones, and sharing no weights with any generator; plus a pixel-statistics colour
reading (the mean hue of the saturated pixels) that needs no training at all. Both take images `[B, 3, H, W]` in
`[0, 1]`, what `generate(generation_mode="image")` returns.
"""

import functools
import time

import numpy as np
import torch
from PIL import ImageFilter
from torch import nn
from torch.nn import functional as F

from ..data.synthetic import COLOURS, SHAPES, SPLIT_SEEDS, random_scene, render

JUDGE_SIZE = 32
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS)}
CHANCE = {name: 1 / len(values) for name, values in ATTRIBUTES.items()}


class ShapeColourJudge(nn.Module):
    """Three conv blocks and one head per attribute: images `[B, 3, H, W]` in `[0, 1]` (resized to 32 x 32) ->
    `{"shape": logits [B, 3], "colour": logits [B, 4]}`."""

    def __init__(self, channels: int = 16):
        super().__init__()
        layers, width = [], 3
        for out in (channels, 2 * channels, 2 * channels):
            layers += [nn.Conv2d(width, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            width = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({name: nn.Linear(width, len(values)) for name, values in ATTRIBUTES.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = F.interpolate(images.float(), size=(JUDGE_SIZE, JUDGE_SIZE), mode="area")
        features = self.features(images * 2 - 1)
        return {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def judge(self, images: torch.Tensor) -> list[dict[str, str]]:
        """The shape and colour each image shows."""
        self.eval()
        logits = self(images)
        picks = {name: values.argmax(-1).tolist() for name, values in logits.items()}
        return [{name: ATTRIBUTES[name][picks[name][index]] for name in ATTRIBUTES} for index in range(len(images))]


def judge_data(n: int, split: str = "train", seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`n` rendered scenes (half jittered, half canonical; a third of the training ones blurred) at the judge's
    size, with their shape and colour labels."""
    rng = np.random.default_rng(SPLIT_SEEDS[split] + seed + 31)
    images, labels = [], {name: [] for name in ATTRIBUTES}
    for index in range(n):
        scene = random_scene(rng)
        image = render(scene, rng, 64, jitter=bool(index % 2))
        if split == "train" and index % 3 == 0:  # generators draw softer edges than the renderer
            image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
        images.append(np.asarray(image.resize((JUDGE_SIZE, JUDGE_SIZE), resample=3), dtype=np.float32) / 255)
        labels["shape"].append(SHAPES.index(scene.shape))
        labels["colour"].append(list(COLOURS).index(scene.colour))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return pixels, {name: torch.tensor(values) for name, values in labels.items()}


@functools.lru_cache(maxsize=2)
def train_judge(
    n: int = 2000,
    steps: int = 300,
    batch_size: int = 64,
    learning_rate: float = 5e-3,
    seed: int = 0,
    heldout: int = 600,
) -> tuple[ShapeColourJudge, dict[str, float]]:
    """Train the judge on rendered scenes; returns it and its accuracy per attribute on `heldout` real images of
    the held-out split (plus `seconds`). Training is deterministic, so a process trains each judge once: later
    calls with the same arguments return the same (judge, scores) — use the judge, don't train it further."""
    start = time.time()
    torch.manual_seed(seed)
    images, labels = judge_data(n, "train", seed)
    judge = ShapeColourJudge()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps)
    random = torch.Generator().manual_seed(seed)
    judge.train()
    for _ in range(steps):
        batch = torch.randint(len(images), (batch_size,), generator=random)
        flip = torch.rand(batch_size, generator=random) < 0.5  # shapes are left-right symmetric
        pixels = torch.where(flip[:, None, None, None], images[batch].flip(-1), images[batch])
        logits = judge(pixels)
        loss = sum(F.cross_entropy(logits[name], labels[name][batch]) for name in ATTRIBUTES)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    test_images, test_labels = judge_data(heldout, "heldout", seed)
    return judge, {**judge_accuracy(judge, test_images, test_labels), "seconds": round(time.time() - start, 1)}


def judge_accuracy(judge: ShapeColourJudge, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Accuracy per attribute of the judge's readings against label indices."""
    readings = judge.judge(images)
    return {
        name: float(
            np.mean(
                [ATTRIBUTES[name].index(reading[name]) == int(label) for reading, label in zip(readings, labels[name])]
            )
        )
        for name in ATTRIBUTES
    }


def pixel_colours(images: torch.Tensor, min_saturation: float = 0.25) -> list[str | None]:
    """The colour name nearest to the mean of each image's saturated pixels (the shapes; the background is grey);
    None when no pixel is saturated."""
    pixels = images.float().clamp(0, 1).permute(0, 2, 3, 1)
    saturation = pixels.amax(-1) - pixels.amin(-1)
    references = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255
    names = []
    for image, saturated in zip(pixels, saturation > min_saturation):
        if not saturated.any():
            names.append(None)
            continue
        mean = image[saturated].mean(0)
        names.append(list(COLOURS)[int((references - mean).norm(dim=-1).argmin())])
    return names


__all__ = ["CHANCE", "ShapeColourJudge", "judge_accuracy", "judge_data", "pixel_colours", "train_judge"]
