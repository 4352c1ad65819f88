"""NExT-GPT's output side of [`MMLLMForConditionalGeneration`]: adding signal tokens, an output projector and a
modality generator to a model, and `generate(generation_mode="image")`, which answers as text, then turns the hidden
states at the signal tokens into an image."""

import copy

import torch

from .modality_generator import build_modality_generator, resolve_generator_settings
from .output_projector import build_output_projector

# Model inputs that carry media (kept for the image-generation pass after text generation).
MEDIA_INPUTS = ("pixel_values", "image_sizes", "pixel_values_videos", "input_features", "input_features_mask")


class ImageGenerationMixin:
    """Image output for a model with `self.model` (an `MMLLMModel`) and `self.lm_head`; text generation is
    transformers' `GenerationMixin.generate`; the model's one `generate` calls `_generate_images` for images."""

    @property
    def output_modalities(self) -> tuple[str, ...]:
        """`("image", "text")` with an output projector and a generator (any-to-any pipelines read it)."""
        return ("image", "text") if self.config.image_generation else ("text",)

    def enable_image_generation(
        self,
        processor,
        modality_generator: dict | None = None,
        output_projector_type: str = "transformer",
        num_signal_tokens: int = 4,
        output_projector_config: dict | None = None,
    ) -> None:
        """Add NExT-GPT's output side to this model: signal tokens `<gen_img_0..k-1>` in `processor`'s tokenizer
        (embeddings and LM head resized), an output projector and a modality generator (default: the built-in
        image decoder). New modules start untrained; train them with an any-to-any recipe."""
        if self.config.image_generation:
            raise ValueError("Image generation is already on for this model.")
        if not hasattr(processor, "tokenizer"):
            raise ValueError(
                f"enable_image_generation needs the model's MMLLMProcessor (its tokenizer gets the signal "
                f"tokens), not {type(processor).__name__}."
            )
        if isinstance(num_signal_tokens, bool) or not isinstance(num_signal_tokens, int) or num_signal_tokens < 1:
            raise ValueError(
                f"num_signal_tokens={num_signal_tokens!r}: an image needs a whole number (>= 1) of signal "
                "tokens; NExT-GPT uses 4."
            )
        if modality_generator is not None and not isinstance(modality_generator, dict):
            raise ValueError(
                f"modality_generator={modality_generator!r}: pass a dict such as {{'type': 'builtin'}} or "
                "{'type': 'diffusers', 'pretrained': ID_OR_FOLDER}."
            )
        # Check every setting (building the new modules on the meta device, without touching the random state)
        # before the tokenizer, the embeddings or the config change.
        trial = copy.deepcopy(self.config)
        trial.signal_token_ids = list(range(num_signal_tokens))  # stand-ins for the ids the tokens will get
        trial.output_projector_type, trial.output_projector_config = output_projector_type, output_projector_config
        trial.modality_generator = resolve_generator_settings(modality_generator or {"type": "builtin"})
        trial._check_image_generation()
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            build_output_projector(trial), build_modality_generator(trial)
        tokens = [f"<gen_img_{index}>" for index in range(num_signal_tokens)]
        processor.tokenizer.add_tokens(tokens, special_tokens=True)
        if len(processor.tokenizer) > self.config.text_config.vocab_size:
            self.resize_token_embeddings(len(processor.tokenizer), mean_resizing=True)
        self.config.signal_token_ids = processor.tokenizer.convert_tokens_to_ids(tokens)
        self.config.output_projector_type = output_projector_type
        self.config.output_projector_config = output_projector_config
        self.config.modality_generator = trial.modality_generator
        self.config._check_image_generation()
        parameter = self.lm_head.weight
        self.model.output_projector = build_output_projector(self.config).to(parameter.device, parameter.dtype)
        self.model.modality_generator = build_modality_generator(self.config).to(parameter.device, parameter.dtype)

    def decode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """`generate(generation_mode="image")` already returns pixels `[B, 3, H, W]` in `[0, 1]`: passed through."""
        return images

    @torch.no_grad()
    def _generate_images(self, *args, generator_kwargs: dict | None = None, **kwargs) -> torch.Tensor:
        """`generate(generation_mode="image")`: images `[B, 3, H, W]` in `[0, 1]`.

        The LLM first answers as text; the hidden states at the signal tokens it emitted (appended after the prompt
        when it emitted none) go through the output projector to the modality generator (`generator_kwargs` go to
        the generator, e.g. `num_inference_steps` for diffusers).
        """
        if not self.config.image_generation:
            raise ValueError(
                "This model cannot generate images: it has no output projector and modality generator "
                "(see enable_image_generation and the any-to-any recipes)."
            )
        if kwargs.get("return_dict_in_generate"):
            raise ValueError(
                "generation_mode='image' returns images, not a generation dict: drop return_dict_in_generate."
            )
        input_ids = args[0] if args else kwargs["input_ids"]
        sequences = super().generate(*args, **kwargs)  # GenerationMixin's: the model's checks already ran
        media = {key: kwargs[key] for key in MEDIA_INPUTS if kwargs.get(key) is not None}
        per_prompt = len(sequences) // len(input_ids)  # num_return_sequences: consecutive rows share a prompt
        images = [
            self._draw(
                sequences[draw::per_prompt],
                input_ids.shape[1],
                kwargs.get("attention_mask"),
                media,
                generator_kwargs or {},
            )
            for draw in range(per_prompt)
        ]
        return torch.stack(images, dim=1).flatten(0, 1)

    def _draw(
        self,
        sequences: torch.LongTensor,
        prompt_length: int,
        attention_mask: torch.Tensor | None,
        media: dict,
        generator_kwargs: dict,
    ) -> torch.Tensor:
        """One image per prompt row from its generated `sequences` (one row each, in prompt order)."""
        ids, mask = self._image_sequences(sequences, prompt_length, attention_mask)
        hidden_states = self.model(
            input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), **media
        ).last_hidden_state
        # Each row ends with the signal group of its new image; groups earlier in the prompt (images of previous
        # turns) only condition the text.
        k = len(self.config.signal_token_ids)
        conditioning = self.model.get_generation_conditioning(hidden_states[:, -k:])
        return self.model.modality_generator.generate(conditioning, **generator_kwargs)

    def _image_sequences(
        self, sequences: torch.LongTensor, prompt_length: int, attention_mask: torch.Tensor | None
    ) -> tuple[torch.LongTensor, torch.LongTensor]:
        """Each row's prompt and answer up to its first complete signal group (or the prompt + the signal tokens
        when the answer has none), left-padded: every row then ends with its k signal tokens."""
        signal = torch.tensor(self.config.signal_token_ids, device=sequences.device)
        k, rows = len(signal), []
        for index, sequence in enumerate(sequences):
            prompt, answer = sequence[:prompt_length], sequence[prompt_length:]
            if attention_mask is not None:
                prompt = prompt[attention_mask[index].bool()]
            starts = [start for start in range(len(answer) - k + 1) if torch.equal(answer[start : start + k], signal)]
            rows.append(torch.cat([prompt, answer[: starts[0] + k] if starts else signal]))
        width = max(len(row) for row in rows)
        pad = self.config.text_config.pad_token_id or 0
        ids = sequences.new_full((len(rows), width), pad)
        mask = torch.zeros_like(ids)
        for index, row in enumerate(rows):
            ids[index, width - len(row) :], mask[index, width - len(row) :] = row, 1
        return ids, mask


__all__ = ["ImageGenerationMixin", "MEDIA_INPUTS"]
