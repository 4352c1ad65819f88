"""Batched throughput: 8 left-padded requests of different prompt lengths and image counts (0-3), 64 new tokens each.

Variants on the same weights (mmllm's are converted from LLaVA's with `from_llava`): transformers' LLaVA, mmllm, and
mmllm with the modality-adaptive module on every layer (its branches copies of the text branch, so all three decode
the same tokens). Each runs eager (dynamic cache) and compiled: `generate(cache_implementation="static",
compile_config=...)`, transformers' own path, which compiles the decode step with `fullgraph=True` (on a GPU it does
this by itself for a static cache; on CPU the compile config is told to, as transformers' tests do). Each variant
runs in its own subprocess (each builds both models, so their memory starts alike), interleaved; compile time is
excluded (a warm-up generation first, then the fastest of three timed ones). Prints requests/s, tokens/s and the
ratios.

    python benchmarks/throughput.py [--repeats 3] [--threads 2]
"""

import time

from harness import run_benchmark
from vs_llava import ARCH as VS_LLAVA_ARCH
from vs_llava import IMAGE_TOKEN

PAD = 0
REQUESTS, NEW_TOKENS = 8, 64
TIMED = 3  # generations timed per process (the fastest counts: others were slowed by the machine), after a warm-up
IMAGE_COUNTS = [1, 0, 2, 1, 3, 0, 1, 2]
PROMPT_LENGTHS = [12, 40, 8, 24, 16, 56, 32, 20]
# vs_llava.py's architecture at 112 px (64 tokens per image), so that a batch of requests stays quick on a CPU.
ARCH = {
    **VS_LLAVA_ARCH,
    "vision_config": {**VS_LLAVA_ARCH["vision_config"], "image_size": 112},
    "text_config": {**VS_LLAVA_ARCH["text_config"], "pad_token_id": PAD},
    "image_seq_length": 64,
}
VARIANTS = [f"{model}-{mode}" for mode in ("eager", "compiled") for model in ("llava", "mmllm", "mmllm+module")]


def build(name: str):
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from modeling_mmllm.builders.conversion import from_llava

    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(LlavaConfig(**ARCH)).eval()
    mmllm = from_llava(llava).eval()
    if name == "mmllm+module":
        mmllm.enable_modality_adaptive()
    return llava if name == "llava" else mmllm


def requests():
    """Left-padded batch: row i has IMAGE_COUNTS[i] images (64 tokens each) before PROMPT_LENGTHS[i] text tokens."""
    import torch

    generator = torch.Generator().manual_seed(0)
    rows = []
    for images, length in zip(IMAGE_COUNTS, PROMPT_LENGTHS):
        text = torch.randint(100, 30000, (length,), generator=generator).tolist()
        rows.append([1] + [IMAGE_TOKEN] * (64 * images) + text)
    width = max(map(len, rows))
    return dict(
        input_ids=torch.tensor([[PAD] * (width - len(row)) + row for row in rows]),
        attention_mask=torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows]),
        pixel_values=torch.randn(sum(IMAGE_COUNTS), 3, 112, 112, generator=generator),
    )


def measure(variant: str, threads: int) -> dict:
    import torch
    from transformers import CompileConfig

    torch.set_num_threads(threads)
    name, mode = variant.rsplit("-", 1)
    model, batch = build(name), requests()
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=PAD)
    if mode == "compiled":
        compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
        compile_config._compile_all_devices = True  # compile on CPU too (a GPU does it unasked)
        settings.update(cache_implementation="static", compile_config=compile_config)
    times = []
    with torch.no_grad():
        model.generate(**batch, **settings)  # warm-up: compiles the decode step
        for _ in range(TIMED):
            start = time.perf_counter()
            output = model.generate(**batch, **settings)
            times.append(time.perf_counter() - start)
    seconds = min(times)
    new = output[:, batch["input_ids"].shape[1] :]
    assert new.shape == (REQUESTS, NEW_TOKENS)
    return {
        "requests_s": REQUESTS / seconds,
        "tokens_s": REQUESTS * NEW_TOKENS / seconds,
        "tokens_like_llava_eager": float((new == reference_tokens(batch)).float().mean()) if name != "llava" else 1.0,
    }


def reference_tokens(batch):
    """LLaVA's eager greedy tokens for the same batch (the agreement column)."""
    import torch

    with torch.no_grad():
        output = build("llava").generate(
            **batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=PAD
        )
    return output[:, batch["input_ids"].shape[1] :]


def main() -> None:
    args, medians = run_benchmark(__file__, __doc__, measure, VARIANTS)
    print(
        f"batched throughput | {REQUESTS} left-padded requests, images per request {IMAGE_COUNTS}, "
        f"{NEW_TOKENS} new tokens | CLIP 4 layers 112 px + Llama 4 x 512 | median of {args.repeats}, "
        f"{args.threads} threads"
    )
    print(f"{'variant':<24}{'requests/s':>12}{'tokens/s':>12}{'same tokens as LLaVA eager':>30}")
    for variant in VARIANTS:
        row = medians[variant]
        print(f"{variant:<24}{row['requests_s']:>12.3f}{row['tokens_s']:>12.1f}{row['tokens_like_llava_eager']:>30.1%}")
    ratios = [
        ("mmllm / LLaVA, eager", "mmllm-eager", "llava-eager"),
        ("mmllm / LLaVA, compiled", "mmllm-compiled", "llava-compiled"),
        ("mmllm compiled / LLaVA eager", "mmllm-compiled", "llava-eager"),
        ("module / without, eager", "mmllm+module-eager", "mmllm-eager"),
        ("module / without, compiled", "mmllm+module-compiled", "mmllm-compiled"),
        ("compiled / eager, mmllm", "mmllm-compiled", "mmllm-eager"),
    ]
    print(f"{'ratio (tokens/s)':<32}{'value':>8}")
    for label, numerator, denominator in ratios:
        print(f"{label:<32}{medians[numerator]['tokens_s'] / medians[denominator]['tokens_s']:>8.3f}")


if __name__ == "__main__":
    main()
