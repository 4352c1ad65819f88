"""`mmllm serve`: an OpenAI-compatible server for one mmllm folder, built on transformers' own serving code
(`transformers.cli.serving`: FastAPI app, handlers, streaming, the model generating on a thread of its own).

From transformers 5.25 on, the model runs in a process of its own: the server's process holds its config and
processor (an `EngineClient`, made by the `ModelManager`), renders and tokenizes the requests, and sends them to the
model's process, which loads the weights with a `ModelLoader` and generates there. transformers 5.23 and 5.24 loaded
and generated in the server's process (a `GenerateManager` per model): a shim at the end of this module serves on
those.

What transformers' `transformers serve` cannot do for our folders, and this module adds:
- load our classes (it would call `getattr(transformers, architectures[0])`) and pick the chat mode from the
  model's modalities (it reads transformers' built-in model lists);
- list the served model under the id `/v1/chat/completions` accepts, without scanning a Hub cache;
- answer bad requests (an unreadable image, bad base64, more media than placeholders, a prompt over the context)
  with HTTP 400 and a message instead of a 500, and keep serving; cap the new tokens at the room the prompt leaves
  in the context.
"""

import binascii
import os
from functools import cached_property

from jinja2 import TemplateError
from PIL import UnidentifiedImageError
from transformers.cli.serving.chat_completion import ChatCompletionHandler
from transformers.cli.serving.completion import CompletionHandler
from transformers.cli.serving.model_manager import ModelManager
from transformers.cli.serving.response import ResponseHandler
from transformers.cli.serving.server import build_server
from transformers.cli.serving.systemone import SystemOneHandler
from transformers.cli.serving.transcription import TranscriptionHandler
from transformers.cli.serving.utils import Modality

from .context import new_token_budget
from .quantization import load_for_inference, load_processor

try:  # transformers >= 5.25: the model loads, and generates, in a process of its own
    from transformers.cli.serving.model_manager import EngineClient, ModelLoader
    from transformers.cli.serving.utils import canonical_model_id
except ImportError:  # transformers 5.23, 5.24 (see the shim at the end)
    EngineClient = None

    class ModelLoader:
        """Stand-in for transformers 5.25's loader: what `MMLLMModelLoader` takes of it."""

        def __init__(self, device: str = "auto"):
            self.device = int(device) if device.isdigit() else device


# What a request's own content can raise while its media are read and its prompt is built: answered with 400.
BAD_REQUEST_ERRORS = (ValueError, OSError, binascii.Error, UnidentifiedImageError, KeyError, TypeError, TemplateError)
MESSAGE_CHARS = 500  # an error message quoting the request's data (a long base64 string) is cut there


def _split_revision(name: str) -> tuple[str, str | None]:
    """`org/model@rev` -> (`org/model`, `rev`); a local path (which may hold an `@`) has no revision."""
    if os.path.exists(name) or "@" not in name:
        return name, None
    model_id, _, revision = name.rpartition("@")
    return model_id, revision


def served_modality(config) -> Modality:
    """VLM (text, images, videos) or, for models with an audio encoder, MULTIMODAL (audio parts too)."""
    return Modality.MULTIMODAL if config.audio_config is not None else Modality.VLM


def fit_to_context(config, inputs, max_new_tokens: int | None) -> int | None:
    """`max_new_tokens` capped at the room the prompt leaves in the backbone's context (past it a model writes
    garbage); a `ValueError` for a prompt that fills it. It runs before a stream opens, so the client gets a 400
    rather than an error inside a 200 stream."""
    return new_token_budget(config, inputs["input_ids"].shape[-1], max_new_tokens)


class MMLLMModelLoader(ModelLoader):
    """How the server loads one mmllm folder (or Hub id): with our classes, optionally quantized (`int8`: torchao
    through `TorchAoConfig`). transformers 5.25 pickles it into the model's process, which loads there."""

    def __init__(self, quantization: str | None = None, device: str = "cpu"):
        super().__init__(device=device)
        self.mmllm_quantization = quantization

    def load_model_and_processor(self, model_id: str, on_progress=None):
        """`(model, processor)` of `model_id` (`repo@revision`, or a local path)."""
        model_id, revision = _split_revision(model_id)
        model, processor = load_for_inference(model_id, self.mmllm_quantization, revision)
        if self.device not in ("auto", "cpu") and self.mmllm_quantization is None:
            model.to(self.device)
        return model, processor

    def load_processor(self, model_id: str):
        """Our processor, which the server's process templates and tokenizes requests with (the model loads in
        the model's process)."""
        return load_processor(*_split_revision(model_id))


if EngineClient is not None:  # transformers >= 5.25

    class MMLLMEngineClient(EngineClient):
        """transformers' client of the model's process, with our chat mode, and the context checked before a
        request goes to the model (on every endpoint)."""

        @cached_property
        def modality(self) -> Modality:
            return served_modality(self.model_config)

        def cap_new_tokens(self, inputs: dict, generation_kwargs: dict) -> None:
            """`fit_to_context` on the request's `max_new_tokens`, in place (the handler reads it back for the
            finish reason)."""
            max_new_tokens = generation_kwargs.get("max_new_tokens")
            generation_kwargs["max_new_tokens"] = fit_to_context(self.model_config, inputs, max_new_tokens)

        def generate_streaming(self, inputs: dict, generation_kwargs: dict, response_parser=None):
            self.cap_new_tokens(inputs, generation_kwargs)
            return super().generate_streaming(inputs, generation_kwargs, response_parser)

        async def generate_non_streaming(self, inputs: dict, generation_kwargs: dict):
            self.cap_new_tokens(inputs, generation_kwargs)
            return await super().generate_non_streaming(inputs, generation_kwargs)

    class MMLLMModelManager(ModelManager):
        """transformers' model manager, pinned to one mmllm folder (or Hub id), whose process it starts now (and
        stops with the server). `/v1/models` lists the folder alone, under the name it was given (transformers'
        listing of a pinned server)."""

        def __init__(self, model: str, quantization: str | None = None, device: str = "cpu"):
            super().__init__(MMLLMModelLoader(quantization, device), force_model=model)

        def preload_engine(self, force_model: str, engine_connection: tuple | None = None) -> None:
            engine = MMLLMEngineClient(canonical_model_id(force_model), self.loader, self.generation_state)
            self.engines[engine.model_id] = engine
            engine.start()


class MMLLMChatCompletionHandler(ChatCompletionHandler):
    """`/v1/chat/completions`, with mistakes in the request answered by a 4xx in OpenAI's error format
    (`{"error": {"message": ...}}`, which the `openai` client shows), never a 500."""

    async def handle_request(self, body: dict, request_id: str):
        from fastapi import HTTPException

        try:
            return await super().handle_request(body, request_id)
        except HTTPException as error:  # transformers' own checks (unknown fields)
            return openai_error(error.status_code, str(error.detail))
        except BAD_REQUEST_ERRORS as error:  # another model than the served one too (a ValueError from 5.25 on)
            return openai_error(400, str(error).strip() or type(error).__name__)

    def _check_prompt_length(self, engine, inputs: dict) -> None:
        """transformers >= 5.25 checks the prompt's length itself, before the engine: with our message (its own
        names `--max-model-len`, which `mmllm serve` has not)."""
        fit_to_context(engine.model_config, inputs, None)


def openai_error(status: int, message: str):
    """An OpenAI-style error response; a message quoting the request's data (a long base64 string) is cut."""
    from fastapi.responses import JSONResponse

    message = message if len(message) <= MESSAGE_CHARS else message[:MESSAGE_CHARS] + " ..."
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def build_app(model: str, quantization: str | None = None, device: str = "cpu"):
    """The FastAPI app serving `model` (a folder or Hub id, loaded now) at `/v1/models` and `/v1/chat/completions`
    (and transformers' other routes)."""
    if EngineClient is None:
        return _build_app_before_5_25(model, quantization, device)
    manager = MMLLMModelManager(model, quantization=quantization, device=device)
    state = manager.generation_state
    return build_server(
        manager,
        MMLLMChatCompletionHandler(manager, state),
        CompletionHandler(manager, state),
        ResponseHandler(manager, state),
        TranscriptionHandler(manager),
        SystemOneHandler(manager, state),
    )


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, quantization: str | None = None) -> None:
    """Load `model` and serve it with uvicorn until interrupted."""
    import uvicorn

    app = build_app(model, quantization=quantization)
    print(
        f"serving {model} as model '{model}' at http://{host}:{port}/v1 (OpenAI-compatible; Ctrl-C stops)", flush=True
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")


# --- transformers 5.23 and 5.24: the model loads and generates in the server's process ---------------------------

if EngineClient is None:
    from transformers.cli.serving.utils import GenerateManager, GenerationState

    class MMLLMModelManager(ModelManager):
        """transformers' model manager, pinned to one mmllm folder (or Hub id), loaded now with `MMLLMModelLoader`."""

        def __init__(self, model: str, quantization: str | None = None, device: str = "cpu"):
            self.loader = MMLLMModelLoader(quantization, device)
            super().__init__(device=device, force_model=model)

        @staticmethod
        def process_model_name(model_id: str) -> str:
            """transformers 5.24's naming on every version: a local folder keeps its path (5.23 appended `@main`,
            and replies then named the model otherwise than `/v1/models` lists it); a Hub id gets `@main` unless it
            has a revision."""
            return model_id if os.path.exists(model_id) or "@" in model_id else f"{model_id}@main"

        def _load_processor(self, model_id_and_revision: str, gguf_file: str | None = None):
            return self.loaded_pair(model_id_and_revision)[1]

        def _load_model(self, model_id_and_revision: str, tqdm_class=None, progress_callback=None, gguf_file=None):
            return self.loaded_pair(model_id_and_revision)[0]

        def loaded_pair(self, model_id_and_revision: str):
            """Model and processor, loaded together once (the base class asks for them one after the other)."""
            if getattr(self, "_pair", None) is None:
                self._pair = self.loader.load_model_and_processor(model_id_and_revision)
            return self._pair

        @staticmethod
        def get_model_modality(model, processor=None) -> Modality:
            return served_modality(model.config)

        def served_models(self, cache_dir: str | None = None) -> list[dict]:
            """`/v1/models`: the one served model, under the id requests name it by."""
            status = {"value": "loaded" if self.loaded_models else "unloaded"}
            return [{"id": self.force_model, "object": "model", "created": 0, "owned_by": "mmllm", "status": status}]

        list_models = served_models  # transformers 5.24
        get_gen_models = served_models  # transformers 5.23

    class ContextCheckedGenerateManager(GenerateManager):
        """transformers' sequential generate manager, checking the context (`fit_to_context`) first."""

        def generate_streaming(self, model, processor, inputs, gen_config, request_id, response_parser=None):
            gen_config.max_new_tokens = fit_to_context(model.config, inputs, gen_config.max_new_tokens)
            return super().generate_streaming(model, processor, inputs, gen_config, request_id, response_parser)

        async def generate_non_streaming(self, model, processor, inputs, gen_config, request_id):
            gen_config.max_new_tokens = fit_to_context(model.config, inputs, gen_config.max_new_tokens)
            return await super().generate_non_streaming(model, processor, inputs, gen_config, request_id)

    class MMLLMGenerationState(GenerationState):
        """Generation state whose per-model managers check the context."""

        def get_manager(self, model_id: str, use_cb: bool = False):
            if model_id not in self._generate_managers:
                self._generate_managers[model_id] = ContextCheckedGenerateManager()
            return self._generate_managers[model_id]

    def _build_app_before_5_25(model: str, quantization: str | None, device: str):
        manager = MMLLMModelManager(model, quantization=quantization, device=device)
        state = MMLLMGenerationState()
        return build_server(
            manager,
            MMLLMChatCompletionHandler(manager, state),
            CompletionHandler(manager, state),
            ResponseHandler(manager, state),
            TranscriptionHandler(manager, state),
            SystemOneHandler(manager, state),
            state,
        )


__all__ = ["MMLLMChatCompletionHandler", "MMLLMModelLoader", "MMLLMModelManager", "build_app", "serve"]
