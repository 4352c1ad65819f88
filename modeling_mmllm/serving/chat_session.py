"""A conversation with a model, shared by `mmllm chat` and `mmllm demo`: the messages in the processor's chat format
(typed parts), the media each user turn attached, and how the conversation fits the backbone's context
(`backbone_context`, the one source of the limit; `new_token_budget`, the room it leaves)."""

from dataclasses import dataclass, replace

from ..configuration_mmllm import backbone_context
from .context import new_token_budget

FILE_KINDS = {"image": "images", "video": "videos", "audio": "audio"}  # content part type -> processor argument


@dataclass(frozen=True)
class Exchange:
    """One user turn (its text and media, in order) and the model's answer (typed parts), once given."""

    text: str
    media: tuple[tuple[str, object], ...] = ()  # (kind, item): a PIL image, or a video / audio file path
    answer: tuple[dict, ...] | None = None

    def messages(self) -> list[dict]:
        parts = [{"type": kind} for kind, _ in self.media] + (
            [{"type": "text", "text": self.text}] if self.text else []
        )
        user = [{"role": "user", "content": parts}]
        return user + ([{"role": "assistant", "content": list(self.answer)}] if self.answer is not None else [])


@dataclass(frozen=True)
class ChatSession:
    """The exchanges so far. Each change returns a new session, so a turn that fails (an unreadable file, a message
    too long for the context) leaves the conversation as it was."""

    exchanges: tuple[Exchange, ...] = ()

    def with_user_turn(self, text: str, media: list[tuple[str, object]]) -> "ChatSession":
        return ChatSession((*self.exchanges, Exchange(text, tuple(media))))

    def with_answer(self, parts: list[dict]) -> "ChatSession":
        """The last turn answered with `parts` (`[{"type": "text", "text": ...}]`, an `{"type": "image"}` drawn)."""
        return ChatSession((*self.exchanges[:-1], replace(self.exchanges[-1], answer=tuple(parts))))

    @property
    def images(self) -> int:
        return sum(kind == "image" for exchange in self.exchanges for kind, _ in exchange.media)

    def inputs(self, processor):
        """The processor's inputs for the whole conversation, with the generation prompt."""
        messages = [message for exchange in self.exchanges for message in exchange.messages()]
        media = {argument: [] for argument in FILE_KINDS.values()}
        for exchange in self.exchanges:
            for kind, item in exchange.media:
                media[FILE_KINDS[kind]].append(item)
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        return processor(text=[prompt], return_tensors="pt", **{key: items or None for key, items in media.items()})

    def fit(self, processor, config, max_new_tokens: int, drop_oldest: bool = False):
        """`(session, inputs, room, dropped)`: the conversation's inputs and the new tokens the context has room for
        (at most `max_new_tokens`). With `drop_oldest` (`mmllm chat`), the oldest whole exchanges, with their media,
        are dropped until the prompt and `max_new_tokens` fit (`dropped` of them); without it (the demo) the whole
        conversation is kept. A `ValueError` when what is kept leaves no room to answer."""
        context = backbone_context(config)
        for dropped in range(len(self.exchanges) if drop_oldest else 1):
            kept = ChatSession(self.exchanges[dropped:])
            inputs = kept.inputs(processor)
            length = inputs["input_ids"].shape[1]
            if context is None or length + max_new_tokens <= context:
                break
        if drop_oldest and context is not None and length >= context:
            raise ValueError(
                f"this message is {length} tokens with its images and the model's context is {context}: shorten it "
                "or attach fewer images."
            )
        return kept, inputs, new_token_budget(config, length, max_new_tokens), dropped


__all__ = ["FILE_KINDS", "ChatSession", "Exchange"]
