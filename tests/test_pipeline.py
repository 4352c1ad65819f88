"""pipeline("image-text-to-text") on saved folders (token fusion, and Flamingo's cross-attention fusion): chat
messages and plain prompts, single and batched."""

import pytest
from transformers import pipeline

pytestmark = pytest.mark.hub

GENERATE = {"max_new_tokens": 6, "do_sample": False}


@pytest.fixture(scope="module", params=["saved_folder", "fusion_folder"])
def pipe(request):
    folder = request.getfixturevalue(request.param)
    return pipeline("image-text-to-text", model=str(folder), trust_remote_code=True)


def _messages(image, question):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def test_chat_messages_single_and_batched(pipe, images):
    conversations = [_messages(images[0], "What colour?"), _messages(images[1], "How many shapes are there?")]
    one_by_one = [pipe(text=c, generate_kwargs=GENERATE)[0]["generated_text"] for c in conversations]
    batched = [out[0]["generated_text"] for out in pipe(text=conversations, batch_size=2, generate_kwargs=GENERATE)]
    assert batched == one_by_one
    assert one_by_one[0][-1]["role"] == "assistant" and one_by_one[0][-1]["content"]


def test_plain_prompts_with_images_single_and_batched(pipe, images):
    prompts = ["<image>What colour?", "Describe <image> briefly please"]
    kwargs = dict(generate_kwargs=GENERATE, return_full_text=False)
    one_by_one = [pipe(images=[images[i]], text=p, **kwargs)[0]["generated_text"] for i, p in enumerate(prompts)]
    outputs = pipe(images=[[images[0]], [images[1]]], text=prompts, batch_size=2, **kwargs)
    batched = [out["generated_text"] for out in outputs]
    assert batched == one_by_one
    assert all(isinstance(answer, str) and answer for answer in one_by_one)
