"""Modality Generators: turn conditioning sequences (what the output projector emits) into images.

Every generator has the same small interface, so training and `generate()` never branch on the type:

- `encode_prompt(captions, tokenizer)` -> `[batch, condition_length, condition_width]`: the generator's own text
  encoding of captions, the target the output projector is aligned to (NExT-GPT's alignment loss);
- `generate(conditioning)` -> images `[batch, 3, H, W]` in `[0, 1]`;
- `image_loss(conditioning, images)`: a loss through the frozen generator against target images (the denoising
  loss of a diffusion model, the reconstruction loss of the built-in decoder).

Settings live in the config's `modality_generator` dict (never a field named `generator`: transformers reads that
as the text model). `{"type": "builtin", ...}` is a small decoder that trains on a CPU in minutes; its weights are
part of the model's safetensors.
"""

import torch
import torch.nn.functional as F
from torch import nn


class BuiltinImageGenerator(nn.Module):
    """A small text-to-image model: a caption encoder (embeddings + one transformer layer, like a tiny CLIP text
    encoder, output `[condition_length, condition_width]`) and a convolutional decoder from that sequence to an image.

    It stands in for Stable Diffusion where there is no GPU: trained on (caption, image) pairs first, then frozen
    while the LLM side learns to produce its conditioning.
    """

    DEFAULTS = {"condition_length": 8, "condition_width": 64, "image_size": 32, "channels": 64, "num_heads": 4,
                "vocab_size": None}

    def __init__(self, settings: dict, vocab_size: int):
        super().__init__()
        self.length, width = settings["condition_length"], settings["condition_width"]
        size, channels = settings["image_size"], settings["channels"]
        self.start_size = 4
        self.num_upsamples = (size // self.start_size).bit_length() - 1
        if self.start_size * 2**self.num_upsamples != size:
            raise ValueError(f"modality_generator.image_size={size}: the built-in decoder needs 4 x a power of two "
                             "(16, 32, 64, ...).")
        self.embed_tokens = nn.Embedding(settings["vocab_size"] or vocab_size, width)
        self.embed_positions = nn.Embedding(self.length, width)
        self.encoder = nn.TransformerEncoderLayer(width, settings["num_heads"], 4 * width, 0.0, activation="gelu",
                                                  batch_first=True, norm_first=True)
        self.encoder_norm = nn.LayerNorm(width)
        self.to_grid = nn.Linear(self.length * width, channels * self.start_size**2)
        self.upsample = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, channels, 3, padding=1),
                          nn.GroupNorm(8, channels), nn.SiLU())
            for _ in range(self.num_upsamples)
        )
        self.to_rgb = nn.Conv2d(channels, 3, 3, padding=1)

    def encode_prompt(self, captions: list[str], tokenizer) -> torch.Tensor:
        """Captions -> conditioning `[batch, condition_length, condition_width]` (padded/cut to the length)."""
        device = self.embed_tokens.weight.device
        ids = torch.full((len(captions), self.length), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(captions), self.length, dtype=torch.bool)
        for row, caption in enumerate(captions):
            tokens = tokenizer(caption, add_special_tokens=False)["input_ids"][: self.length]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = True
        ids, mask = ids.to(device), mask.to(device)
        hidden = self.embed_tokens(ids) + self.embed_positions.weight
        return self.encoder_norm(self.encoder(hidden, src_key_padding_mask=~mask))

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        """Conditioning -> image logits `[batch, 3, H, W]` (`generate` squashes them to `[0, 1]`)."""
        grid = self.to_grid(conditioning.flatten(1)).view(conditioning.shape[0], -1, self.start_size, self.start_size)
        for block in self.upsample:
            grid = block(grid)
        return self.to_rgb(grid)

    @torch.no_grad()
    def generate(self, conditioning: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.sigmoid(self(conditioning.to(self.to_grid.weight.dtype))).float()

    def image_loss(self, conditioning: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction loss against target images in `[0, 1]` (resized to the decoder's size)."""
        logits = self(conditioning)
        images = F.interpolate(images.to(logits.dtype), size=logits.shape[-2:], mode="area")
        return F.binary_cross_entropy_with_logits(logits, images)


GENERATORS = {"builtin": BuiltinImageGenerator}


def generator_settings(settings: dict) -> dict:
    """A `modality_generator` dict with the type's defaults filled in; unknown types and keys are errors."""
    kind = settings.get("type")
    if kind not in GENERATORS:
        raise ValueError(f"Unknown modality_generator type {kind!r}: choose one of {sorted(GENERATORS)}.")
    defaults = GENERATORS[kind].DEFAULTS
    unknown = set(settings) - set(defaults) - {"type"}
    if unknown:
        raise ValueError(f"modality_generator has keys {sorted(unknown)} that the {kind!r} generator does not use; "
                         f"its settings are {sorted(defaults)}.")
    missing = [key for key in ("condition_length", "condition_width") if {**defaults, **settings}.get(key) is None]
    if missing:
        raise ValueError(f"modality_generator needs {missing} (the shape of the generator's conditioning).")
    return {"type": kind, **defaults, **settings}


def build_modality_generator(config) -> nn.Module | None:
    """The generator of `config.modality_generator` (None for text-only output)."""
    settings = config.modality_generator
    if settings is None:
        return None
    settings = generator_settings(settings)
    return GENERATORS[settings["type"]]({k: v for k, v in settings.items() if k != "type"},
                                        config.text_config.vocab_size)


__all__ = ["GENERATORS", "BuiltinImageGenerator", "build_modality_generator", "generator_settings"]
