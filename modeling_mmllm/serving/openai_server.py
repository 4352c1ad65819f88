"""`mmllm serve`: an OpenAI-compatible server for one mmllm folder, built on transformers' own serving code
(`transformers.cli.serving`: FastAPI app, handlers, streaming, one inference thread per model).

What transformers' `transformers serve` cannot do for our folders, and this module adds:
- load our classes (it would call `getattr(transformers, architectures[0])`) and pick the chat mode from the
  model's modalities (it reads transformers' built-in model lists);
- list the served model under the id `/v1/chat/completions` accepts, without scanning a Hub cache;
- answer bad requests (an unreadable image, bad base64, more media than placeholders, a prompt over the context)
  with HTTP 400 and a message instead of a 500, and keep serving.
"""

import binascii
import os

from jinja2 import TemplateError
from PIL import UnidentifiedImageError
from transformers.cli.serving.chat_completion import ChatCompletionHandler
from transformers.cli.serving.completion import CompletionHandler
from transformers.cli.serving.model_manager import ModelManager
from transformers.cli.serving.response import ResponseHandler
from transformers.cli.serving.server import build_server
from transformers.cli.serving.systemone import SystemOneHandler
from transformers.cli.serving.transcription import TranscriptionHandler
from transformers.cli.serving.utils import GenerateManager, GenerationState, Modality

from .context import new_token_budget
from .quantization import load_for_inference

# What a request's own content can raise while its media are read and its prompt is built: answered with 400.
BAD_REQUEST_ERRORS = (ValueError, OSError, binascii.Error, UnidentifiedImageError, KeyError, TypeError, TemplateError)
MESSAGE_CHARS = 500  # an error message quoting the request's data (a long base64 string) is cut there


def _split_revision(name: str) -> tuple[str, str | None]:
    """`org/model@rev` -> (`org/model`, `rev`); a local path (which may hold an `@`) has no revision."""
    if os.path.exists(name) or "@" not in name:
        return name, None
    model_id, _, revision = name.rpartition("@")
    return model_id, revision


class MMLLMModelManager(ModelManager):
    """transformers' model manager, pinned to one mmllm folder (or Hub id), loaded with our classes, optionally
    quantized (`int8`, `int4`: torchao through `TorchAoConfig`)."""

    def __init__(self, model: str, quantization: str | None = None, device: str = "cpu"):
        self.mmllm_quantization = quantization
        super().__init__(device=device, force_model=model)

    @staticmethod
    def process_model_name(model_id: str) -> str:
        """transformers 5.24's naming on every version: a local folder keeps its path (5.23 appended `@main`, and
        replies then named the model otherwise than `/v1/models` lists it); a Hub id gets `@main` unless it has a
        revision."""
        return model_id if os.path.exists(model_id) or "@" in model_id else f"{model_id}@main"

    def _load_processor(self, model_id_and_revision: str, gguf_file: str | None = None):
        return self.loaded_pair(model_id_and_revision)[1]

    def _load_model(self, model_id_and_revision: str, tqdm_class=None, progress_callback=None, gguf_file=None):
        return self.loaded_pair(model_id_and_revision)[0]

    def loaded_pair(self, model_id_and_revision: str):
        """Model and processor, loaded together once (the base class asks for them one after the other)."""
        if getattr(self, "_pair", None) is None:
            model_id, revision = _split_revision(model_id_and_revision)
            kwargs = {"revision": revision} if revision else {}
            self._pair = load_for_inference(model_id, self.mmllm_quantization, **kwargs)
            if self.device not in ("auto", "cpu") and self.mmllm_quantization is None:
                self._pair[0].to(self.device)
        return self._pair

    @staticmethod
    def get_model_modality(model, processor=None) -> Modality:
        """VLM (text, images, videos) or, for models with an audio encoder, MULTIMODAL (audio parts too)."""
        return Modality.MULTIMODAL if "audio" in model.input_modalities else Modality.VLM

    def served_models(self, cache_dir: str | None = None) -> list[dict]:
        """`/v1/models`: the one served model, under the id requests name it by."""
        status = "loaded" if self.loaded_models else "unloaded"
        return [
            {"id": self.force_model, "object": "model", "created": 0, "owned_by": "mmllm", "status": {"value": status}}
        ]

    list_models = served_models  # transformers >= 5.24
    get_gen_models = served_models  # transformers 5.23


class ContextCheckedGenerateManager(GenerateManager):
    """transformers' sequential generate manager, refusing a prompt that fills the backbone's context and capping
    `max_new_tokens` at what is left of it (past the context a model writes garbage; the length check runs before
    a stream opens, so the client gets a 400 rather than an error inside a 200 stream)."""

    @staticmethod
    def fit_to_context(model, inputs, gen_config) -> None:
        prompt = inputs["input_ids"].shape[-1]
        gen_config.max_new_tokens = new_token_budget(model, prompt, gen_config.max_new_tokens)

    def generate_streaming(self, model, processor, inputs, gen_config, request_id, response_parser=None):
        self.fit_to_context(model, inputs, gen_config)
        return super().generate_streaming(model, processor, inputs, gen_config, request_id, response_parser)

    async def generate_non_streaming(self, model, processor, inputs, gen_config, request_id):
        self.fit_to_context(model, inputs, gen_config)
        return await super().generate_non_streaming(model, processor, inputs, gen_config, request_id)


class MMLLMGenerationState(GenerationState):
    """Generation state whose per-model managers check the context."""

    def get_manager(self, model_id: str, use_cb: bool = False):
        if model_id not in self._generate_managers:
            self._generate_managers[model_id] = ContextCheckedGenerateManager()
        return self._generate_managers[model_id]


class MMLLMChatCompletionHandler(ChatCompletionHandler):
    """`/v1/chat/completions`, with mistakes in the request answered by a 4xx in OpenAI's error format
    (`{"error": {"message": ...}}`, which the `openai` client shows), never a 500."""

    async def handle_request(self, body: dict, request_id: str):
        from fastapi import HTTPException

        try:
            return await super().handle_request(body, request_id)
        except HTTPException as error:  # transformers' own checks (unknown fields, another model)
            return openai_error(error.status_code, str(error.detail))
        except BAD_REQUEST_ERRORS as error:
            return openai_error(400, str(error).strip() or type(error).__name__)


def openai_error(status: int, message: str):
    """An OpenAI-style error response; a message quoting the request's data (a long base64 string) is cut."""
    from fastapi.responses import JSONResponse

    message = message if len(message) <= MESSAGE_CHARS else message[:MESSAGE_CHARS] + " ..."
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def build_app(model: str, quantization: str | None = None, device: str = "cpu"):
    """The FastAPI app serving `model` (a folder or Hub id, loaded now) at `/v1/models` and `/v1/chat/completions`
    (and transformers' other routes)."""
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


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, quantization: str | None = None) -> None:
    """Load `model` and serve it with uvicorn until interrupted."""
    import uvicorn

    app = build_app(model, quantization=quantization)
    print(
        f"serving {model} as model '{model}' at http://{host}:{port}/v1 (OpenAI-compatible; Ctrl-C stops)", flush=True
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")


__all__ = ["MMLLMChatCompletionHandler", "MMLLMModelManager", "build_app", "serve"]
