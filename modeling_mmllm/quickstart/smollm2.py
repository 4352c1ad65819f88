"""`mmllm quickstart --llm smollm2`: the embedded default's task on a real pretrained LLM (library side).

SmolLM2-135M-Instruct (fetched once, `builders.real_llm`) learns to see and keeps its language. No pretrained vision
weights can be had offline, so the vision side is the one the default quickstart trains: its encoder, and its
abstractor's queries and layers (they work at the encoder's width); the abstractor's output layer and end token (the
LLM's width) are new. Then mPLUG-Owl2's first stage (recipe `quickstart-smollm2`): the LLM stays frozen, the
abstractor and the modality-adaptive image branches (K/V and norms per layer) train. Text tokens never pass through an
image branch, so text-only behaviour is the original LLM's by construction; `text/agreement` and `text/kl` measure it
against SmolLM2 alone all the same (`evaluation.text_retention`).
"""

import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..builders.real_llm import smollm2_folder
from ..data.synthetic import make_dataset
from ..evaluation.metrics import answer_questions, exact_match
from ..evaluation.text_retention import (
    GENERAL_PROMPTS,
    agreement,
    english_passages,
    greedy_chat_answers,
    text_divergence,
)
from ..export.saving import save_model_folder
from ..modeling_mmllm import MMLLMForConditionalGeneration
from ..processing_mmllm import MMLLMProcessor
from .run import PASS_MARK, draw_report, reload_and_answer, run_stage, run_stages, write_summary

RECIPE = "quickstart-smollm2"
TEXT_PASS_MARK = 0.80  # share of held-out text prompts answered exactly as SmolLM2 alone answers them
CHAT = """
import json, sys
sys.modules["modeling_mmllm"] = None  # only the folder's own code may run
from PIL import Image
from transformers import pipeline
folder, image_path, question = sys.argv[1:4]
pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
greedy = {"max_new_tokens": 24, "do_sample": False}
chats = [[{"role": "user", "content": [{"type": "image", "image": Image.open(image_path)},
                                       {"type": "text", "text": question}]}],
         [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]]
answers = [pipe(text=chat, generate_kwargs=greedy, return_full_text=False)[0]["generated_text"] for chat in chats]
text_question = chats[1][0]["content"][0]["text"]
print(json.dumps({"answer": answers[0].strip(), "text_question": text_question, "text_answer": answers[1].strip()}))
"""


def compose_base(stage2: Path, output: Path, modality_adaptive: bool = True) -> Path:
    """SmolLM2 + the default quickstart's vision encoder and abstractor (output layer new), with mPLUG-Owl2's
    module or without it, saved as `output`."""
    tiny = MMLLMForConditionalGeneration.from_pretrained(stage2)
    tiny_processor = MMLLMProcessor.from_pretrained(stage2)
    vision = output.parent / "vision-encoder"
    tiny.model.vision_tower.save_pretrained(vision)
    tiny_processor.image_processor.save_pretrained(vision)
    settings = tiny.config
    model, processor = MMLLMForConditionalGeneration.from_components(
        vision=str(vision),
        text=str(smollm2_folder()),
        projector=settings.projector_type,
        projector_config=settings.projector_config,
        vision_feature_layer=settings.vision_feature_layer,
        vision_feature_select_strategy=settings.vision_feature_select_strategy,
        vision_feature_layernorm=settings.vision_feature_layernorm,
        modality_adaptive=modality_adaptive,
        modality_adaptive_modalities=[1],
    )
    projector = model.model.multi_modal_projector
    shapes = {name: tensor.shape for name, tensor in projector.state_dict().items()}
    trained = tiny.model.multi_modal_projector.state_dict()
    projector.load_state_dict({k: v for k, v in trained.items() if shapes.get(k) == v.shape}, strict=False)
    processor.pad_to_square = tiny_processor.pad_to_square  # the images it was trained on
    return save_model_folder(model, processor, output, replace=True)


def text_retention(model, processor, fast: bool) -> tuple[dict, list[tuple[str, str, str]]]:
    """`text/agreement` and `text/kl` against SmolLM2 alone, and (prompt, original, tuned) answers to show."""
    original_folder = smollm2_folder()
    original = AutoModelForCausalLM.from_pretrained(original_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(original_folder)
    prompts = GENERAL_PROMPTS[:6] if fast else GENERAL_PROMPTS
    reference = greedy_chat_answers(original, tokenizer, prompts)
    tuned = greedy_chat_answers(model, processor, prompts)
    passages = english_passages(4 if fast else 32)
    divergence = text_divergence(original, model, tokenizer, passages)
    figures = {"text/agreement": agreement(reference, tuned), "text/kl": divergence["kl"]}
    return {**figures, "text/perplexity": divergence["perplexity"]}, list(zip(prompts, reference, tuned))


def add_text_panel(path: Path, examples: list[tuple[str, str, str]]) -> None:
    """Text prompts with SmolLM2's answer and the tuned model's, side by side, under the report."""
    with Image.open(path) as top:
        canvas = Image.new("RGB", (top.width, top.height + 30 + 46 * len(examples)), "white")
        canvas.paste(top, (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = top.height + 8
    draw.text((10, y), "text prompts: SmolLM2 alone (left) | after multimodal tuning (right)", fill=(0, 0, 0))
    for prompt, original, tuned in examples:
        original, tuned = (" ".join(answer.split()) for answer in (original, tuned))  # one line each
        y += 46
        colour = (0, 130, 0) if original == tuned else (200, 0, 0)
        draw.text((10, y - 24), prompt[:110], fill=(60, 60, 60))
        draw.text((10, y - 10), original[:75], fill=(0, 0, 0))
        draw.text((canvas.width // 2, y - 10), tuned[:75], fill=colour)
    canvas.save(path)


def run_smollm2_quickstart(output: Path, default_output: Path, fast: bool = False, overwrite: bool = False) -> dict:
    """The default quickstart's stages (kept when finished), then SmolLM2 learns the same task; held-out exact
    match per question kind and text retention go to `output/summary.json`. Raises SystemExit(2) when image
    accuracy or text agreement is below the pass mark."""
    start = time.time()
    output.mkdir(parents=True, exist_ok=True)
    stage2, curves = run_stages(default_output, fast)
    print(f"\n== SmolLM2-135M-Instruct: composed with the vision side of {stage2} ==", flush=True)
    base = compose_base(stage2, output / "base")
    print(f"\n== stage: {RECIPE} (LLM frozen; abstractor and image branches train) ==", flush=True)
    folder = run_stage(RECIPE, output / "stage", fast, curves, model=base, overwrite=overwrite)
    print("\n== evaluation on held-out data ==", flush=True)
    model, processor = (
        MMLLMForConditionalGeneration.from_pretrained(folder).eval(),
        MMLLMProcessor.from_pretrained(folder),
    )
    heldout = make_dataset("vqa", 20 if fast else 200, split="heldout")
    image_accuracy = exact_match(model, processor, heldout, batch_size=16)
    retention, examples = text_retention(model, processor, fast)
    sample = list(heldout.select(range(16)))
    draw_report(curves, sample, answer_questions(model, processor, sample), output / "quickstart.png")
    add_text_panel(output / "quickstart.png", examples[:6])
    print("\n== chat with the saved folder in a fresh process ==", flush=True)
    demo = reload_and_answer(folder, output, script=CHAT)
    print(f"new image:   {demo['image']} ({demo['description']})")
    print(f"question:    {demo['question']}")
    print(f"answer:      {demo['answer']}")
    print(f"question:    {demo['text_question']}")
    print(f"answer:      {demo['text_answer']}")
    summary = {**{f"image/{k}": v for k, v in image_accuracy.items()}, **retention}
    write_summary(output, summary, demo, folder, image_accuracy)
    print(f"  text agreement with SmolLM2 {retention['text/agreement'] * 100:6.1f}%  ({len(examples)} prompts)")
    print(f"  text KL(SmolLM2 || tuned)   {retention['text/kl']:.4f} nats/token")
    print(f"  model folder                {folder}")
    print(f"  report                      {output / 'quickstart.png'}")
    print(f"  time                        {time.time() - start:.0f} s")
    print(f"accuracy: {image_accuracy['overall'] * 100:.1f}%")
    if not fast and (image_accuracy["overall"] < PASS_MARK or retention["text/agreement"] < TEXT_PASS_MARK):
        print(
            f"error: held-out image accuracy {image_accuracy['overall'] * 100:.1f}% (pass mark "
            f"{PASS_MARK * 100:.0f}%) or text agreement {retention['text/agreement'] * 100:.1f}% (pass mark "
            f"{TEXT_PASS_MARK * 100:.0f}%) is too low.",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return summary


__all__ = ["run_smollm2_quickstart"]
