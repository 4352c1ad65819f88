"""`mmllm chat`: an interactive chat with a model folder, streamed, with images attached by `/image PATH`."""

import argparse
import sys

from ..configuration_mmllm import backbone_context
from ..serving.chat_session import ChatSession
from .common import USER_ERRORS, load_folder, open_image, quantization_option

NAME = "chat"
HELP = "interactive chat with a model folder (/image PATH attaches)"
DESCRIPTION = None
NOT_UTF8 = "error: that line is not valid UTF-8 text (is the terminal set to UTF-8?): type it again."


def add_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("model", help="model folder")
    command.add_argument("--max-new-tokens", type=int, default=128)
    quantization_option(command)


def run(args: argparse.Namespace) -> None:
    """Interactive chat with streaming output; `/image PATH` attaches an image, `/reset` clears, `/quit` ends.

    A conversation longer than the model's context loses its oldest exchanges (with their images); a mistake in one
    message (an image that cannot be read, a message too long on its own) is reported and the chat goes on."""
    from transformers import TextStreamer

    model, processor = load_folder(args.model, args.quantization)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    session, pending = ChatSession(), []
    print("mmllm chat: type a message; /image PATH attaches an image, /reset clears, /quit ends.")
    for line in _input_lines():
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            session, pending = ChatSession(), []
            continue
        if line.startswith("/image"):
            try:
                pending.append(open_image(line[len("/image") :].strip()))
                print(f"[image attached: {pending[-1].size[0]}x{pending[-1].size[1]}]")
            except USER_ERRORS as error:
                print(f"error: {error}")
            continue
        if not line:
            continue
        turn = session.with_user_turn(line, [("image", image) for image in pending])
        pending = []
        try:
            session = _chat_turn(model, processor, streamer, turn, args.max_new_tokens)
        except USER_ERRORS as error:
            print(f"error: {error}")


def _input_lines():
    """Lines typed at a `> ` prompt (or piped in), stripped, until end of input. A line that is not valid UTF-8 is
    reported and skipped: the chat goes on."""
    if hasattr(sys.stdin, "reconfigure"):  # undecodable bytes arrive as one bad line, not lost with their whole chunk
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            return
        except UnicodeDecodeError:
            print(NOT_UTF8)
            continue
        if not _is_utf8(line):
            print(NOT_UTF8)
            continue
        yield line.strip()


def _is_utf8(line: str) -> bool:
    """Whether `line` came from valid UTF-8 (undecodable bytes become lone surrogates, which do not encode)."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _chat_turn(model, processor, streamer, session: ChatSession, max_new_tokens: int) -> ChatSession:
    """Answer the last turn (streamed), after dropping the oldest exchanges that do not fit the context; the
    session kept, its last turn answered."""
    kept, inputs, room, dropped = session.fit(processor, model.config, max_new_tokens, drop_oldest=True)
    context = backbone_context(model.config)
    if dropped:
        images = session.images - kept.images
        print(
            f"warning: the conversation is longer than the model's context ({context} tokens): dropped the oldest "
            f"{dropped} exchange(s)" + (f" and their {images} image(s)." if images else ".")
        )
    if room < max_new_tokens:
        print(f"warning: the context ({context} tokens) leaves room for {room} new tokens after this message.")
    output = model.generate(**inputs, max_new_tokens=room, do_sample=False, streamer=streamer)
    answer = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    return kept.with_answer([{"type": "text", "text": answer}])
