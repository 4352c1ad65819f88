"""`mmllm demo`: a Gradio chat app for one model — text, several images per turn, audio (and video) files for
models that take them, streamed answers, images drawn by any-to-any models, a generation-settings panel.

The conversation is a `ChatSession` (`chat_session.py`), the one `mmllm chat` keeps: the processor's chat format
(typed parts), so each turn is exactly what `processor.apply_chat_template` + `model.generate` see in `mmllm
generate` and `mmllm chat`.
"""

import mimetypes
import tempfile
from pathlib import Path
from threading import Thread

import gradio as gr
from PIL import Image, UnidentifiedImageError
from transformers import TextIteratorStreamer

from .chat_session import FILE_KINDS, ChatSession


def file_kind(path: str, accepted: tuple[str, ...]) -> str:
    """`image`, `video` or `audio` by the file's type; a clear error for a file this model cannot take."""
    kind = (mimetypes.guess_type(path)[0] or "").split("/")[0]
    if kind not in accepted:
        raise gr.Error(f"{Path(path).name}: this model takes {', '.join(accepted)} files, not this one.")
    return kind


def _open_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError):
        raise gr.Error(f"{Path(path).name} is not an image that can be read.") from None


def user_turn(session: ChatSession, text: str, files: list[str], accepted: tuple[str, ...]) -> ChatSession:
    """`session` with the new turn: each file opened as its kind (images read now, so a bad one fails here)."""
    kinds = [file_kind(path, accepted) for path in files]
    return session.with_user_turn(
        text, [(kind, _open_image(path) if kind == "image" else path) for path, kind in zip(files, kinds)]
    )


def fitted_inputs(session: ChatSession, processor, model, max_new_tokens: int):
    """The processor's inputs for the whole conversation and the new tokens the context has room for."""
    try:
        _, inputs, room, _ = session.fit(processor, model.config, max_new_tokens)
    except ValueError as error:
        raise gr.Error(str(error)) from None
    return inputs, room


def generation_settings(max_new_tokens: int, temperature: float, top_p: float) -> dict:
    """`generate` arguments of the settings panel; temperature 0 is greedy decoding (as `mmllm generate`)."""
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
    return {"max_new_tokens": int(max_new_tokens), "do_sample": False, **sampling}


def build_demo(model, processor, title: str = "mmllm") -> gr.Blocks:
    """The Gradio app (not launched) chatting with `model`."""
    accepted = tuple(kind for kind in FILE_KINDS if kind in model.input_modalities)
    draws = "image" in model.output_modalities
    signal_ids = set(model.config.signal_token_ids or [])
    drawings = Path(tempfile.mkdtemp(prefix="mmllm-demo-"))

    def answer(message: dict, history: list, session: ChatSession, max_new_tokens, temperature, top_p):
        """Stream the model's answer to the new turn (text and files) into the chat."""
        text, files = (message.get("text") or "").strip(), list(message.get("files") or [])
        if not text and not files:
            raise gr.Error("Type a message or attach a file.")
        session = user_turn(session, text, files, accepted)
        settings = generation_settings(max_new_tokens, temperature, top_p)
        inputs, settings["max_new_tokens"] = fitted_inputs(session, processor, model, settings["max_new_tokens"])
        history = history + [{"role": "user", "content": {"path": path}} for path in files]
        history = history + ([{"role": "user", "content": text}] if text else [])
        history.append({"role": "assistant", "content": ""})
        streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result = {}

        def run():
            result["ids"] = model.generate(**inputs, **settings, streamer=streamer)

        worker = Thread(target=run)
        worker.start()
        for chunk in streamer:
            history[-1]["content"] += chunk
            yield gr.MultimodalTextbox(value=None), history, session
        worker.join()
        answer_ids = result["ids"][0, inputs["input_ids"].shape[1] :]
        reply = history[-1]["content"] = processor.decode(answer_ids, skip_special_tokens=True).strip()
        parts = [{"type": "text", "text": reply}]
        if draws and set(answer_ids.tolist()) & signal_ids:  # the model answered with an image: draw it
            pixels = model.generate(**inputs, **settings, generation_mode="image")
            drawing = processor.post_process_multimodal_output(pixels, generation_mode="image")[0]
            drawing.save(path := drawings / f"drawing-{len(list(drawings.iterdir()))}.png")
            history.append({"role": "assistant", "content": {"path": str(path)}})
            parts.append({"type": "image"})
        yield gr.MultimodalTextbox(value=None), history, session.with_answer(parts)

    def clear():
        return [], ChatSession()

    kinds = " and ".join(accepted)
    with gr.Blocks(title=f"mmllm demo: {title}") as demo:
        gr.Markdown(f"## {title}\nAsk about {kinds} files (attach several per turn) or chat in text.")
        chatbot = gr.Chatbot(label="Chat", elem_id="chat", render_markdown=False, height=420)
        box = gr.MultimodalTextbox(
            label="Message",
            elem_id="message",
            file_types=list(accepted),
            file_count="multiple",
            placeholder=f"Type a question; attach {kinds} files with the clip",
        )
        with gr.Accordion("Generation settings", open=False):
            max_new_tokens = gr.Slider(1, 512, value=64, step=1, label="Max new tokens")
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0: greedy)")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p (with temperature > 0)")
        reset = gr.Button("Clear the conversation")
        session = gr.State(ChatSession())
        box.submit(answer, [box, chatbot, session, max_new_tokens, temperature, top_p], [box, chatbot, session])
        reset.click(clear, None, [chatbot, session])
    return demo


def launch_demo(model, processor, title: str = "mmllm", host: str = "127.0.0.1", port: int = 7860, share=False):
    """Build the app and serve it until interrupted (`share=True`: also a public gradio.live link)."""
    demo = build_demo(model, processor, title)
    demo.queue().launch(server_name=host, server_port=port, share=share)


__all__ = ["build_demo", "launch_demo"]
