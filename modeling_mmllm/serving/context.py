"""The backbone's context, shared by the server and the demo: past it a model writes garbage, so a prompt that
fills it is refused and the new tokens are capped at what is left. The limit itself is `backbone_context`, which
`generate`, the processor and the chat read too."""

from ..configuration_mmllm import backbone_context


def new_token_budget(model, prompt_tokens: int, max_new_tokens: int | None) -> int | None:
    """`max_new_tokens` capped at the room the prompt leaves in the context; a `ValueError` that says so for a
    prompt that leaves none. Models whose backbone names no context length are left as they are.

    `model` is a model or its config (the server's process holds only the config from transformers 5.25 on: the
    weights live in the model's own process)."""
    context = backbone_context(getattr(model, "config", model))
    if context is None:
        return max_new_tokens
    if prompt_tokens >= context:
        raise ValueError(
            f"The prompt is {prompt_tokens} tokens, and this model's context is {context}: shorten the messages "
            "(or send fewer images, or start a new conversation)."
        )
    return context - prompt_tokens if max_new_tokens is None else min(max_new_tokens, context - prompt_tokens)


__all__ = ["new_token_budget"]
