"""`mmllm chat`: an interactive chat with a model folder, streamed, with images attached by `/image PATH`."""

import argparse
import sys

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
    turns, pending = [], []
    print("mmllm chat: type a message; /image PATH attaches an image, /reset clears, /quit ends.")
    for line in _input_lines():
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            turns, pending = [], []
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
        turn = {"user": line, "images": pending, "answer": None}
        pending = []
        try:
            turns = _chat_turn(model, processor, streamer, [*turns, turn], args.max_new_tokens)
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


def _chat_turn(model, processor, streamer, turns: list[dict], max_new_tokens: int) -> list[dict]:
    """Answer the last turn (streamed), after dropping the oldest turns that do not fit the context; the turns kept,
    the last one with its answer."""
    from ..configuration_mmllm import backbone_context

    context = backbone_context(model.config)
    turns, inputs = _fit_turns(processor, turns, context, max_new_tokens)
    length = inputs["input_ids"].shape[1]
    room = max_new_tokens if context is None else min(max_new_tokens, context - length)
    if room < max_new_tokens:
        print(f"warning: the context ({context} tokens) leaves room for {room} new tokens after this message.")
    output = model.generate(**inputs, max_new_tokens=room, do_sample=False, streamer=streamer)
    turns[-1]["answer"] = processor.decode(output[0, length:], skip_special_tokens=True).strip()
    return turns


def _fit_turns(processor, turns: list[dict], context: int | None, max_new_tokens: int) -> tuple[list[dict], dict]:
    """The newest turns whose prompt and `max_new_tokens` fit the context (whole exchanges with their images, so an
    image's placeholder span is never cut), with their processor inputs; an error when the last message alone
    leaves no room to answer."""
    for start in range(len(turns)):
        inputs = _chat_inputs(processor, turns[start:])
        length = inputs["input_ids"].shape[1]
        if context is None or length + max_new_tokens <= context:
            break
    if context is not None and length >= context:
        raise ValueError(
            f"this message is {length} tokens with its images and the model's context is {context}: shorten it or "
            "attach fewer images."
        )
    if start:
        dropped = sum(len(turn["images"]) for turn in turns[:start])
        print(
            f"warning: the conversation is longer than the model's context ({context} tokens): dropped the oldest "
            f"{start} exchange(s)" + (f" and their {dropped} image(s)." if dropped else ".")
        )
    return turns[start:], inputs


def _chat_inputs(processor, turns: list[dict]) -> dict:
    """Processor inputs for the turns (each user message with its images, then its answer) and a generation prompt."""
    messages = []
    for turn in turns:
        content = [{"type": "image"}] * len(turn["images"]) + [{"type": "text", "text": turn["user"]}]
        messages.append({"role": "user", "content": content})
        if turn["answer"] is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn["answer"]}]})
    images = [image for turn in turns for image in turn["images"]]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=images or None, text=[prompt], return_tensors="pt")
