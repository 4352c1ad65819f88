"""Modality Generators: turn conditioning sequences (what the output projector emits) into images.

Every generator has the same small interface, so training and `generate()` never branch on the type:

- `encode_prompt(captions, tokenizer)` -> `[batch, condition_length, condition_width]`: the generator's own text
  encoding of captions, the target the output projector is aligned to (NExT-GPT's alignment loss);
- `generate(conditioning)` -> images `[batch, 3, H, W]` in `[0, 1]`;
- `image_loss(conditioning, images)`: a loss through the frozen generator against target images (the denoising
  loss of a diffusion model, the reconstruction loss of the built-in decoder).

Settings live in the config's `modality_generator` dict (never a field named `generator`: transformers reads that
as the text model). `{"type": "builtin", ...}` is a small decoder that trains on a CPU in minutes; its weights are
part of the model's safetensors. `{"type": "diffusers", "pretrained": ...}` is a Stable Diffusion-family pipeline
(optional dependency: `pip install mmllm[generation]`); it is referenced, not part of the model's weights, and a saved
model carries a local pipeline in its `modality_generator/` sub-folder.
"""

import json
import os
import shutil

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import cached_file

from .component_settings import GENERATOR_DEFAULTS, checked_generator_settings

# Sub-folder of a saved model that holds a local diffusers pipeline (`pretrained` is then this relative name).
PIPELINE_FOLDER = "modality_generator"
INSTALL_HINT = "pip install mmllm[generation]"
# generate() keywords of diffusion generators; the built-in decoder accepts and ignores them.
SAMPLING_KEYWORDS = ("num_inference_steps", "guidance_scale", "seed", "generator")


class BuiltinImageGenerator(nn.Module):
    """A small text-to-image model: a caption encoder (embeddings + one transformer layer, like a tiny CLIP text
    encoder, output `[condition_length, condition_width]`) and a convolutional decoder from that sequence to an image.

    It stands in for Stable Diffusion where there is no GPU: trained on (caption, image) pairs first, then frozen
    while the LLM side learns to produce its conditioning.
    """

    DEFAULTS = GENERATOR_DEFAULTS["builtin"]

    def __init__(self, settings: dict, vocab_size: int):
        super().__init__()
        self.length, width = settings["condition_length"], settings["condition_width"]
        size, channels = settings["image_size"], settings["channels"]
        self.start_size = 4
        self.num_upsamples = (size // self.start_size).bit_length() - 1
        if self.start_size * 2**self.num_upsamples != size:
            raise ValueError(
                f"modality_generator.image_size={size}: the built-in decoder needs 4 x a power of two "
                "(16, 32, 64, ...)."
            )
        self.embed_tokens = nn.Embedding(settings["vocab_size"] or vocab_size, width)
        self.embed_positions = nn.Embedding(self.length, width)
        self.encoder = nn.TransformerEncoderLayer(
            width, settings["num_heads"], 4 * width, 0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder_norm = nn.LayerNorm(width)
        self.to_grid = nn.Linear(self.length * width, channels * self.start_size**2)
        self.upsample = nn.ModuleList(
            nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(channels, channels, 3, padding=1),
                nn.GroupNorm(8, channels),
                nn.SiLU(),
            )
            for _ in range(self.num_upsamples)
        )
        self.to_rgb = nn.Conv2d(channels, 3, 3, padding=1)

    @classmethod
    def from_config(cls, settings: dict, config) -> "BuiltinImageGenerator":
        """The decoder of `settings` (defaults filled, no `type`); its vocabulary defaults to the backbone's."""
        return cls(settings, config.text_config.vocab_size)

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
        """Conditioning -> images `[batch, 3, H, W]` in `[0, 1]`. The decoder is deterministic: a diffusion
        generator's sampling keywords (`SAMPLING_KEYWORDS`) are accepted, so one call serves every generator, and
        have no effect; any other keyword is an error."""
        unknown = sorted(set(kwargs) - set(SAMPLING_KEYWORDS))
        if unknown:
            raise ValueError(
                f"The built-in image generator takes no {unknown} (generator_kwargs): it accepts only "
                f"{list(SAMPLING_KEYWORDS)}, which it does not need."
            )
        return torch.sigmoid(self(conditioning.to(self.to_grid.weight.dtype))).float()

    def image_loss(self, conditioning: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction loss against target images in `[0, 1]` (resized to the decoder's size)."""
        logits = self(conditioning)
        images = F.interpolate(images.to(logits.dtype), size=logits.shape[-2:], mode="area")
        return F.binary_cross_entropy_with_logits(logits, images)


def import_diffusers():
    """The `diffusers` module, imported on first use (importing it costs seconds), or an error naming the fix.

    The import sits in a `try` block: transformers' `check_imports` skips those, so a saved folder still loads (and
    generates text) where diffusers is not installed.
    """
    try:
        import diffusers
    except ImportError as error:
        raise ImportError(
            "The 'diffusers' modality generator needs the diffusers library, which is not importable here "
            f"({error}). Install it with `{INSTALL_HINT}` (or `pip install 'diffusers>=0.30'`); without it the "
            "model still loads and generates text."
        ) from error
    return diffusers


def _download_subfolder(repo_id: str, subfolder: str) -> str:
    """Local copy of one sub-folder of a Hub repository (a saved model pushed with its pipeline)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise ImportError(f"Loading {repo_id}/{subfolder} from the Hub needs huggingface_hub ({error}).") from error
    return os.path.join(snapshot_download(repo_id, allow_patterns=[f"{subfolder}/*"]), subfolder)


def _read_json(pretrained: str, subfolder: str, name: str) -> dict:
    if not os.path.isdir(pretrained) and (
        os.path.isabs(pretrained) or pretrained.startswith(".") or pretrained.count("/") > 1
    ):
        raise ValueError(
            f"modality_generator pretrained={pretrained!r}: no such pipeline folder (and not a Hub id "
            "such as 'stable-diffusion-v1-5/stable-diffusion-v1-5')."
        )
    with open(cached_file(pretrained, name, subfolder=subfolder), encoding="utf-8") as file:
        return json.load(file)


def diffusers_generator_settings(pretrained: str, **settings) -> dict:
    """A `{"type": "diffusers", ...}` generator dict for the pipeline at `pretrained` (local folder or Hub id),
    with the conditioning shape read from its configs: `condition_length` is the tokenizer's `model_max_length`,
    `condition_width` the text encoder's `hidden_size` (the shape of the pipeline's `prompt_embeds`).

    Only the two JSON files are read, so this works without diffusers installed. `settings` override or add keys.
    """
    try:
        tokenizer = _read_json(pretrained, "tokenizer", "tokenizer_config.json")
        text_encoder = _read_json(pretrained, "text_encoder", "config.json")
    except OSError as error:
        raise ValueError(
            f"Cannot read the conditioning shape of the diffusers pipeline {pretrained!r} ({error}). Give a Stable "
            "Diffusion-family pipeline folder or Hub id (with tokenizer/ and text_encoder/), or set condition_length "
            "and condition_width in modality_generator yourself."
        ) from None
    length = tokenizer.get("model_max_length") or text_encoder.get("max_position_embeddings")
    shape = {"condition_length": length, "condition_width": text_encoder["hidden_size"]}
    return {"type": "diffusers", "pretrained": pretrained, **shape, **settings}


class DiffusersImageGenerator:
    """A Stable Diffusion-family text-to-image pipeline (UNet2DConditionModel + VAE + scheduler + CLIP text encoder)
    conditioned through `prompt_embeds`: NExT-GPT's image generator.

    Not an `nn.Module`: the pipeline is referenced (its weights stay out of the model's safetensors), loaded on first
    use, frozen, and moved to the device and dtype of the conditioning it is given. `pretrained` is a local folder
    or a Hub id; a relative path is looked up in the model's folder first, so a saved model can carry its pipeline
    in the `modality_generator/` sub-folder.
    """

    DEFAULTS = GENERATOR_DEFAULTS["diffusers"]

    def __init__(self, settings: dict, model_folder: str | None = None):
        self.settings = {**self.DEFAULTS, **settings}
        if not self.settings["pretrained"]:
            raise ValueError(
                "modality_generator type 'diffusers' needs 'pretrained': a local pipeline folder or a "
                "Hub id (e.g. a Stable Diffusion 1.x/2.x pipeline)."
            )
        self.model_folder = str(model_folder or "")
        self.source = self._local_source(self.settings["pretrained"], self.model_folder)
        self._pipeline = None
        self._noise_scheduler = None
        self._target: tuple[torch.device | None, torch.dtype | None] = (None, None)

    @classmethod
    def from_config(cls, settings: dict, config) -> "DiffusersImageGenerator":
        """The adapter of `settings`; a relative `pretrained` resolves against the model's folder (`name_or_path`)."""
        return cls(settings, model_folder=getattr(config, "name_or_path", None))

    @classmethod
    def complete_settings(cls, settings: dict) -> dict:
        """Fill a missing conditioning shape from the pipeline's configs (`diffusers_generator_settings`); the
        settings are checked already (`pretrained` is set)."""
        if settings.get("condition_length") is not None and settings.get("condition_width") is not None:
            return settings
        given = {key: value for key, value in settings.items() if value is not None}
        return {**diffusers_generator_settings(settings["pretrained"]), **given}

    @staticmethod
    def _local_source(pretrained: str, model_folder: str) -> str:
        """`pretrained` as an absolute path when it is a local folder (the model's sub-folder first, then the
        working directory); otherwise unchanged (a Hub id, or a sub-folder of a model loaded from the Hub)."""
        candidates = [pretrained] if os.path.isabs(pretrained) else [os.path.join(model_folder, pretrained), pretrained]
        for candidate in candidates:
            if os.path.isdir(candidate):
                return os.path.abspath(candidate)
        return pretrained

    def _resolved_source(self) -> str:
        """A local folder or a pipeline's Hub id. Under a model loaded from the Hub, a relative name without "/" is
        that repository's sub-folder (what `save_pretrained` writes), downloaded here."""
        hub_model = self.model_folder and not os.path.isdir(self.model_folder)
        if hub_model and not os.path.isdir(self.source) and "/" not in self.source:
            self.source = _download_subfolder(self.model_folder, self.source)
        return self.source

    @property
    def pipeline(self):
        """The diffusers pipeline, loaded (and frozen) on first access."""
        if self._pipeline is None:
            # Loaded as stored, then moved to the model's device and dtype (diffusers renamed its dtype argument).
            pipeline = import_diffusers().DiffusionPipeline.from_pretrained(self._resolved_source())
            self._check_pipeline(pipeline)
            for component in pipeline.components.values():
                if isinstance(component, nn.Module):
                    component.requires_grad_(False).eval()
            pipeline.set_progress_bar_config(disable=True)
            self._pipeline = pipeline
            self._move(*self._target)
        return self._pipeline

    def _check_pipeline(self, pipeline) -> None:
        """A single-text-encoder SD pipeline whose `prompt_embeds` have the configured conditioning shape."""
        components = pipeline.components
        required = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
        missing = [name for name in required if components.get(name) is None]
        if missing or components.get("text_encoder_2") is not None or not hasattr(pipeline, "encode_prompt"):
            raise ValueError(
                f"{self.source!r} is a {type(pipeline).__name__}: the 'diffusers' generator takes a Stable Diffusion "
                "1.x/2.x-style text-to-image pipeline (unet, vae, scheduler, one CLIP text_encoder and tokenizer)."
            )
        length, width = pipeline.tokenizer.model_max_length, pipeline.text_encoder.config.hidden_size
        cross_attention = pipeline.unet.config.cross_attention_dim
        expected = (self.settings["condition_length"], self.settings["condition_width"])
        if expected != (length, width) or width != cross_attention:
            raise ValueError(
                f"modality_generator has condition_length={expected[0]}, condition_width={expected[1]}, but the "
                f"pipeline {self.source!r} takes prompt_embeds of [{length}, {width}] (UNet cross-attention width "
                f"{cross_attention}): build the settings with diffusers_generator_settings(pretrained)."
            )

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> "DiffusersImageGenerator":
        """Where the pipeline should run (applied now if loaded, else at load); returns self like `nn.Module.to`."""
        device = torch.device(device) if device is not None else self._target[0]
        self._target = (device, dtype or self._target[1])
        if self._pipeline is not None:
            self._move(*self._target)
        return self

    def _move(self, device: torch.device | None, dtype: torch.dtype | None) -> None:
        pipeline = self._pipeline
        if (device is not None and pipeline.device != device) or (dtype is not None and pipeline.dtype != dtype):
            pipeline.to(device=device, dtype=dtype)

    def _follow(self, conditioning: torch.Tensor):
        """The pipeline on the conditioning's device and in its dtype (the model's, at generate and train time)."""
        pipeline = self.pipeline
        self.to(conditioning.device, conditioning.dtype)
        return pipeline

    def image_size(self) -> int:
        """Side of the generated images: `image_size`, or the pipeline's native resolution."""
        pipeline = self.pipeline
        return self.settings["image_size"] or pipeline.unet.config.sample_size * pipeline.vae_scale_factor

    @torch.no_grad()
    def encode_prompt(self, captions: list[str], tokenizer=None) -> torch.Tensor:
        """Captions -> the pipeline's own `prompt_embeds` `[batch, condition_length, condition_width]` (the
        alignment target). `tokenizer` is ignored: the pipeline's tokenizer and text encoder are the reference."""
        pipeline = self.pipeline
        prompt_embeds, _ = pipeline.encode_prompt(list(captions), pipeline.device, 1, False)
        return prompt_embeds

    @torch.no_grad()
    def generate(
        self,
        conditioning: torch.Tensor,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Conditioning -> images `[batch, 3, H, W]` in `[0, 1]`.

        Classifier-free guidance (`guidance_scale > 1`) contrasts with the encoding of the empty prompt. `seed` makes
        a CPU `torch.Generator` (the same noise on every device); other keywords go to the pipeline's `__call__`.
        """
        pipeline = self._follow(conditioning)
        guidance_scale = self.settings["guidance_scale"] if guidance_scale is None else guidance_scale
        if generator is None and seed is not None:
            generator = torch.Generator("cpu").manual_seed(seed)
        negative = self.encode_prompt([""] * len(conditioning)) if guidance_scale > 1 else None
        size = self.image_size()
        images = pipeline(
            prompt_embeds=conditioning,
            negative_prompt_embeds=negative,
            height=size,
            width=size,
            num_inference_steps=num_inference_steps or self.settings["num_inference_steps"],
            guidance_scale=guidance_scale,
            generator=generator,
            output_type="pt",
            **kwargs,
        ).images
        return images.float()

    @property
    def noise_scheduler(self):
        """The training noise schedule (DDPM with the pipeline scheduler's betas and `prediction_type`)."""
        if self._noise_scheduler is None:
            self._noise_scheduler = import_diffusers().DDPMScheduler.from_config(self.pipeline.scheduler.config)
        return self._noise_scheduler

    def image_loss(
        self, conditioning: torch.Tensor, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The denoising loss through the frozen UNet against target images in `[0, 1]` (resized to the
        pipeline's resolution): gradients reach `conditioning` only."""
        pipeline = self._follow(conditioning)
        device, dtype = conditioning.device, conditioning.dtype
        size = self.image_size()
        images = images.to(device, dtype)
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        vae = pipeline.vae
        with torch.no_grad():
            latents = vae.encode(images * 2 - 1).latent_dist.sample(generator)
            latents = (latents - (getattr(vae.config, "shift_factor", None) or 0)) * vae.config.scaling_factor
        scheduler = self.noise_scheduler
        noise = import_diffusers().utils.torch_utils.randn_tensor(latents.shape, generator, device=device, dtype=dtype)
        random_device = generator.device if generator is not None else device
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator, device=random_device
        ).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = pipeline.unet(noisy, timesteps, encoder_hidden_states=conditioning).sample
        kind = scheduler.config.prediction_type
        targets = {
            "epsilon": lambda: noise,
            "sample": lambda: latents,
            "v_prediction": lambda: scheduler.get_velocity(latents, noise, timesteps),
        }
        if kind not in targets:
            raise ValueError(
                f"The pipeline's scheduler predicts {kind!r}; the 'diffusers' generator's image_loss "
                f"supports {sorted(targets)}."
            )
        return F.mse_loss(prediction.float(), targets[kind]().float())

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True) -> str:
        """Write a local pipeline into `save_directory/modality_generator/` (diffusers' safetensors; a plain copy
        without diffusers) and return the `pretrained` the saved config carries: that sub-folder, or the Hub id."""
        source = self._resolved_source()
        if not os.path.isdir(source):
            return self.settings["pretrained"]  # a pipeline on the Hub stays a reference
        target = os.path.join(save_directory, PIPELINE_FOLDER)
        if not is_main_process or (os.path.isdir(target) and os.path.samefile(source, target)):
            return PIPELINE_FOLDER
        try:
            import_diffusers()
        except ImportError:
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            self.pipeline.save_pretrained(target, safe_serialization=True)
        return PIPELINE_FOLDER

    def __repr__(self) -> str:
        state = "loaded" if self._pipeline is not None else "not loaded yet"
        return f"{type(self).__name__}(pretrained={self.settings['pretrained']!r}, {state})"


GENERATORS = {"builtin": BuiltinImageGenerator, "diffusers": DiffusersImageGenerator}


def resolve_generator_settings(settings: dict) -> dict:
    """The settings of a generator being attached: checked as the config checks them
    (`component_settings.checked_generator_settings`: types, keys, defaults, a built-in decoder's shape), then a
    diffusers pipeline's missing conditioning shape read from its configs (the only step that reads files)."""
    settings = checked_generator_settings(settings)
    complete = getattr(GENERATORS[settings["type"]], "complete_settings", None)
    return settings if complete is None else {**settings, **complete(settings)}


def build_modality_generator(config) -> nn.Module | DiffusersImageGenerator | None:
    """The generator of `config.modality_generator` (None for text-only output). A diffusers pipeline is loaded
    on first use, so building it inside `from_pretrained` (meta device, no weight init) stays cheap."""
    settings = config.modality_generator
    if settings is None:
        return None
    settings = resolve_generator_settings(settings)
    return GENERATORS[settings["type"]].from_config({k: v for k, v in settings.items() if k != "type"}, config)


def save_modality_generator(
    generator, settings: dict | None, save_directory: str | os.PathLike, is_main_process: bool = True
) -> dict | None:
    """Write a referenced generator's files next to a saved model and return the `modality_generator` settings the
    saved config carries (a local diffusers pipeline becomes the relative `modality_generator` sub-folder)."""
    if not isinstance(generator, DiffusersImageGenerator):
        return settings
    return {**settings, "pretrained": generator.save_pretrained(save_directory, is_main_process)}


__all__ = [
    "GENERATORS",
    "PIPELINE_FOLDER",
    "BuiltinImageGenerator",
    "DiffusersImageGenerator",
    "build_modality_generator",
    "diffusers_generator_settings",
    "resolve_generator_settings",
    "import_diffusers",
    "save_modality_generator",
]
