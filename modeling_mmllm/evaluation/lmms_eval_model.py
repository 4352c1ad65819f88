"""lmms-eval models for mmllm folders (library side): `python -m lmms_eval --model mmllm --model_args
pretrained=FOLDER_OR_HUB_ID[,device=cpu,dtype=float32,batch_size=8] --tasks ...`.

Registered through the `lmms_eval.models` entry point (`MANIFEST`). `MMLLMChat` (the default) reads the tasks' chat
messages (image, video and audio parts); `MMLLMSimple` (`--force_simple`) reads `doc_to_visual` + the prompt. Both
answer every request type: `generate_until` (greedy unless the task samples; left-padded batches give the answers of
one-by-one requests), `generate_until_multi_round` (the rounds form one conversation) and `loglikelihood` (what
`multiple_choice` tasks ask: how likely a continuation is after the chat prompt).

lmms-eval 0.7.3 quirks worked around here, each marked "quirk" where it is handled:
- `loglikelihood` answers go out as the continuation's negative log-likelihood: lmms-eval's multiple-choice scoring
  picks the choice with the *smallest* value (`argmin`, its own models return a loss), so a log-probability would
  pick the least likely choice;
- a `(value, is_greedy)` tuple from `loglikelihood` is stringified by the evaluator, which then fails on
  multiple-choice scoring: the pair goes out wrapped in `GenerationResult(text=...)`;
- chat models get `multiple_choice` tasks only as loglikelihood requests of the simple shape
  `(context, continuation, doc_to_visual, doc_id, task, split)` (chat tasks build generation requests only; our
  offline multiple-choice task is a simple `ConfigurableTask` for that reason), and mutual-information scoring adds
  bare `(context, continuation)` pairs: `loglikelihood` takes all three shapes;
- `batch_size` arrives as a string from the command line.
"""

import os
from collections.abc import Callable

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from lmms_eval.protocol import ChatMessages
from PIL import Image
from tqdm.auto import tqdm

MANIFEST = ModelManifest(
    model_id="mmllm",
    chat_class_path=f"{__name__}.MMLLMChat",
    simple_class_path=f"{__name__}.MMLLMSimple",
)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tiff", ".webp"}
AUDIO_EXTENSIONS = {".wav", ".mp3", ".m4a", ".aac", ".flac", ".ogg", ".opus"}
GREEDY = {"do_sample": False, "num_beams": 1}


class MMLLMLmms(lmms):
    """The shared part: loading, batched generation and loglikelihood over chat conversations.

    A conversation is a list of chat messages whose content parts are `{"type": "text", "text"}` or
    `{"type": "image" | "video" | "audio", "item": ...}` (the item goes to the processor, the part to the template).
    """

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_new_tokens: int = 64,
        attn_implementation: str | None = None,
        revision: str | None = None,
        **unused,
    ) -> None:
        super().__init__()
        unused = {key: value for key, value in unused.items() if key != "max_batch_size" or value is not None}
        if unused:
            raise ValueError(
                f"Unknown model_args for --model mmllm: {', '.join(sorted(unused))}. Known: pretrained, device, dtype, "
                "batch_size, max_new_tokens, attn_implementation, revision."
            )
        from ..modeling_mmllm import MMLLMForConditionalGeneration
        from ..processing_mmllm import MMLLMProcessor

        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        load = {"revision": revision} if revision else {}
        self.model = MMLLMForConditionalGeneration.from_pretrained(
            pretrained, dtype=dtype, attn_implementation=attn_implementation, **load
        )
        self.model.to(self._device).eval()
        self.processor = MMLLMProcessor.from_pretrained(pretrained, **load)
        self.batch_size = int(batch_size)  # quirk: a string from the command line
        self.max_new_tokens = int(max_new_tokens)

    @property
    def device(self) -> torch.device:
        return self._device

    # -- inputs --------------------------------------------------------------------------------------------------
    def _inputs(self, conversations: list[list[dict]], add_generation_prompt: bool = True, suffixes=None):
        """Processor inputs of a left-padded batch of conversations (each prompt + its suffix, when given)."""
        suffixes = suffixes or [""] * len(conversations)
        texts, items = [], {"image": [], "video": [], "audio": []}
        for conversation, suffix in zip(conversations, suffixes):
            template = [
                {**message, "content": [_template_part(part) for part in message["content"]]}
                for message in conversation
            ]
            texts.append(self.processor.apply_chat_template(template, add_generation_prompt=add_generation_prompt))
            texts[-1] += suffix
            for message in conversation:
                for part in message["content"]:
                    if part["type"] != "text":
                        items[part["type"]].append(part["item"])
        kwargs = {"images": items["image"], "videos": items["video"], "audio": items["audio"]}
        return self.processor(text=texts, padding=True, return_tensors="pt", **kwargs).to(self.device), texts

    def _batches(self, requests: list, key: Callable = lambda request: 0):
        """`(indices, requests)` chunks of at most `batch_size`, each of one `key` (e.g. the generation settings)."""
        groups: dict = {}
        for index, request in enumerate(requests):
            groups.setdefault(key(request), []).append(index)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                yield chunk, [requests[index] for index in chunk]

    # -- generation ----------------------------------------------------------------------------------------------
    def _generate(self, conversations: list[list[dict]], gen_kwargs: dict) -> list[str]:
        """Answers to a batch of conversations, cut at the task's stop strings (`until`)."""
        settings = dict(gen_kwargs)
        until = settings.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        sampling = settings.pop("do_sample", False) or (settings.get("temperature") or 0) > 0
        options = {"max_new_tokens": int(settings.pop("max_new_tokens", self.max_new_tokens))}
        if sampling:
            options.update(do_sample=True, temperature=settings.get("temperature") or 1.0, top_p=settings.get("top_p"))
        else:
            options.update(GREEDY, num_beams=int(settings.get("num_beams") or 1))
        inputs, _ = self._inputs(conversations)
        with torch.no_grad():
            output = self.model.generate(**inputs, **options, pad_token_id=self.processor.tokenizer.pad_token_id)
        texts = self.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [_cut(text, until).strip() for text in texts]

    def _conversation_of(self, request: Instance) -> list[dict]:
        """The conversation a generation request asks about (its first round)."""
        raise NotImplementedError

    def _gen_kwargs_of(self, request: Instance) -> dict:
        raise NotImplementedError

    def _next_turn(self, request: Instance, round_idx: int, outputs: list[str], info):
        """`(new turns, round info)` of a multi-round request's next round, or None after its last."""
        raise NotImplementedError

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = [""] * len(requests)
        progress = tqdm(total=len(requests), desc="mmllm generating", disable=self.rank != 0)
        for indices, chunk in self._batches(requests, key=lambda request: repr(self._gen_kwargs_of(request))):
            texts = self._generate([self._conversation_of(request) for request in chunk], self._gen_kwargs_of(chunk[0]))
            for index, request, text in zip(indices, chunk, texts):
                answers[index] = text
                self.cache_hook.add_partial("generate_until", (request.args[0], self._gen_kwargs_of(request)), text)
            progress.update(len(chunk))
        progress.close()
        return answers

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        return [self._multi_round(request) for request in tqdm(requests, desc="mmllm rounds", disable=self.rank != 0)]

    def _multi_round(self, request: Instance) -> list[str]:
        """Rounds of one request as one conversation: each round's new turns, then the model's answer."""
        conversation, outputs, info = list(self._conversation_of(request)), [], None
        while True:
            outputs.append(self._generate([conversation], self._gen_kwargs_of(request))[0])
            conversation.append({"role": "assistant", "content": [{"type": "text", "text": outputs[-1]}]})
            turn = self._next_turn(request, len(outputs), list(outputs), info)
            if turn is None:
                return outputs
            turns, info = turn
            conversation += turns

    # -- loglikelihood -------------------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list:
        """`(negative log-likelihood, is_greedy)` of each continuation after its context's chat prompt (lower is more
        likely; whether greedy decoding would produce it), in left-padded batches: the continuation is then the last
        tokens of every row."""
        results = [None] * len(requests)
        progress = tqdm(total=len(requests), desc="mmllm loglikelihood", disable=self.rank != 0)
        for indices, chunk in self._batches(requests):
            conversations = [self._context_conversation(request) for request in chunk]
            continuations = [request.args[1] for request in chunk]
            context, _ = self._inputs(conversations)
            inputs, _ = self._inputs(conversations, suffixes=continuations)
            lengths = inputs["attention_mask"].sum(1) - context["attention_mask"].sum(1)
            with torch.no_grad():
                logits = self.model(**inputs).logits.float()
            log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
            targets = inputs["input_ids"][:, 1:]
            for row, (index, length) in enumerate(zip(indices, lengths.tolist())):
                if length < 1:
                    raise ValueError(f"Request {index}: the continuation {continuations[row]!r} adds no tokens.")
                scores, target = log_probs[row, -length:], targets[row, -length:]
                loss = -scores.gather(-1, target[:, None]).sum().item()  # quirk: lmms-eval takes the argmin
                greedy = bool((scores.argmax(-1) == target).all())
                results[index] = GenerationResult(text=(loss, greedy))  # quirk: a bare tuple is stringified
                self.cache_hook.add_partial("loglikelihood", chunk[row].args[:2], (loss, greedy))
            progress.update(len(chunk))
        progress.close()
        return results

    def _context_conversation(self, request: Instance) -> list[dict]:
        """The user turn of a loglikelihood request (quirk: simple-shaped for chat models, bare pairs for
        mutual-information scoring)."""
        if len(request.args) == 2:
            return [_user_turn([], request.args[0])]
        context, _, doc_to_visual, doc_id, task, split = request.args[:6]
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        return [_user_turn(visuals or [], context)]


class MMLLMChat(MMLLMLmms):
    """Chat-message requests: `(context, doc_to_messages, gen_kwargs, doc_id, task, split)`."""

    is_simple = False

    def _messages(self, request: Instance, **round_kwargs):
        _, doc_to_messages, _, doc_id, task, split = request.args
        return doc_to_messages(self.task_dict[task][split][doc_id], **round_kwargs)

    def _conversation_of(self, request: Instance) -> list[dict]:
        return _conversation(self._messages(request))

    def _gen_kwargs_of(self, request: Instance) -> dict:
        return request.args[2]

    def _next_turn(self, request: Instance, round_idx: int, outputs: list[str], info):
        """lmms-eval's multi-round protocol: `doc_to_messages` with the round's state returns `(messages, terminal,
        _, round info)`."""
        payload = self._messages(request, round_idx=round_idx, previous_output=outputs, previous_round_info=info)
        if not (isinstance(payload, tuple) and len(payload) == 4) or payload[1]:
            return None
        return _conversation(payload[0]), payload[3]


class MMLLMSimple(MMLLMLmms):
    """Simple requests: `(context, gen_kwargs, doc_to_visual, doc_id, task, split)`."""

    is_simple = True

    def _conversation_of(self, request: Instance) -> list[dict]:
        context, _, doc_to_visual, *where = request.args
        doc_id, task, split = where[-3:]
        return [_user_turn(doc_to_visual(self.task_dict[task][split][doc_id]) or [], context)]

    def _gen_kwargs_of(self, request: Instance) -> dict:
        return request.args[1]

    def _next_turn(self, request: Instance, round_idx: int, outputs: list[str], info):
        """lmms-eval's simple multi-round protocol: `doc_to_text` with the round's state returns `(visuals, text,
        terminal, _, round info)`."""
        _, _, _, doc_to_text, doc_id, task, split = request.args
        doc = self.task_dict[task][split][doc_id]
        visuals, text, terminal, _, info = doc_to_text(
            doc, round_idx=round_idx, previous_output=outputs, previous_round_info=info
        )
        return None if terminal else ([_user_turn(visuals or [], text)], info)


def _cut(text: str, until: list[str]) -> str:
    """`text` up to the first stop string."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def _part(visual) -> dict:
    """A content part for one task visual: an image, an audio clip (`{"array", "sampling_rate"}` or an audio file)
    or a video (anything else: a file, a frame list)."""
    if isinstance(visual, Image.Image):
        return {"type": "image", "item": visual}
    if isinstance(visual, dict) and "array" in visual:
        return {"type": "audio", "item": visual}
    if isinstance(visual, str):
        extension = os.path.splitext(visual)[1].lower()
        kind = "image" if extension in IMAGE_EXTENSIONS else "audio" if extension in AUDIO_EXTENSIONS else "video"
        return {"type": kind, "item": visual}
    return {"type": "video", "item": visual}


def _template_part(part: dict) -> dict:
    """What the chat template sees of a part: the text, or the placeholder's type."""
    return part if part["type"] == "text" else {"type": part["type"]}


def _user_turn(visuals: list, text: str) -> dict:
    return {"role": "user", "content": [_part(visual) for visual in visuals] + [{"type": "text", "text": text}]}


def _conversation(raw_messages: list[dict]) -> list[dict]:
    """lmms-eval chat messages (parts with `url`) as a conversation (parts with `item`)."""
    conversation = []
    for message in ChatMessages(messages=raw_messages).messages:
        parts = [
            {"type": "text", "text": part.text} if part.type == "text" else {"type": part.type, "item": part.url}
            for part in message.content
        ]
        conversation.append({"role": message.role, "content": parts})
    return conversation


__all__ = ["MANIFEST", "MMLLMChat", "MMLLMLmms", "MMLLMSimple"]
