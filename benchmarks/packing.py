"""Packing and padding-free SFT against TRL's padded batches: the same model, the same rows, the same steps' worth of
data; tokens per second of training (forward, backward, optimizer step, with TRL's fused LM head as SFTTrainer
runs it), the share of padding, and the loss over the same rows.

Rows are mixed as SFT data is: 0 to 3 images and 8 to 200 text tokens each. `padded` is TRL's vision collator (every
batch padded to its longest row, 16 rows); `padding_free` puts a batch's 16 rows back to back in one sequence;
`packed` puts whole rows into packs of at most 512 tokens (TRL's best-fit decreasing), as many packs a step as
make the padded run's number of steps. Each variant runs in its own subprocess, interleaved; prints medians and
ratios.

    python benchmarks/packing.py [--repeats 3] [--threads 2]
"""

import random
import time

from harness import run_benchmark

ROWS, ROWS_PER_BATCH, PACK_LENGTH = 128, 16, 512
TEXT = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "vocab_size": 4096,
}
WORDS = "red blue green small large circle square triangle left right top bottom near far one two three".split()


def rows(count: int, seed: int = 0) -> list[dict]:
    """`count` SFT rows: 0-3 images (32 px), a question of 8-200 text tokens, a short answer."""
    from PIL import Image

    rng = random.Random(seed)
    made = []
    for _ in range(count):
        images = [
            Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3))) for _ in range(rng.randint(0, 3))
        ]
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 100)))  # about 2 tokens a word
        content = [*({"type": "image"} for _ in images), {"type": "text", "text": question}]
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        made.append(
            {
                "images": images,
                "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}],
            }
        )
    return made


def batches(variant: str, collator, data: list[dict], lengths: list[int]) -> list[dict]:
    """The variant's batches over `data` (rows of `lengths` tokens), collated once, before the clock starts."""
    from modeling_mmllm.training.packing import pack_rows

    if variant != "packed":
        collator.padding_free = variant == "padding_free"
        return [
            collator.torch_call(data[start : start + ROWS_PER_BATCH]) for start in range(0, len(data), ROWS_PER_BATCH)
        ]
    packs = pack_rows(lengths, PACK_LENGTH)["pack"]
    collator.padding_free, collator.packed_rows = True, data
    per_step = -(-len(packs) // -(-len(data) // ROWS_PER_BATCH))  # as many steps as the padded run takes
    return [
        collator.torch_call([{"pack": pack} for pack in packs[start : start + per_step]])
        for start in range(0, len(packs), per_step)
    ]


def measure(variant: str, threads: int) -> dict:
    import torch
    from trl.trainer.utils import add_fused_lm_head

    from modeling_mmllm.training.collator import MultimodalCollator
    from modeling_mmllm.training.model_setup import build_model
    from modeling_mmllm.training.packing import row_lengths

    torch.set_num_threads(threads)
    model, processor = build_model({"preset": "owl2-tiny", "overrides": {"text_config": TEXT}})
    add_fused_lm_head(model)  # TRL's LM head: only labelled positions are projected, as in SFTTrainer
    collator = MultimodalCollator(processor=processor, max_length=None, assistant_only_loss=True)
    data = rows(ROWS)
    lengths = row_lengths(collator, data)
    real = sum(lengths)  # the rows' own tokens, the same in every variant
    steps = batches(variant, collator, data, lengths)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    computed = sum(batch["input_ids"].numel() for batch in steps)
    losses, labelled = [], 0
    start = time.perf_counter()
    for batch in steps:
        outputs = model(**batch, use_cache=False, fused_lm_head=True)  # as SFTTrainer computes its loss
        tokens = int(outputs.label_mask.sum())
        loss = -outputs.log_probs.sum() / tokens
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item() * tokens)
        labelled += tokens
    elapsed = time.perf_counter() - start
    return {
        "tokens_per_s": real / elapsed,
        "padding": 1 - real / computed,
        "loss": sum(losses) / labelled,
        "steps": len(steps),
    }


def main() -> None:
    args, medians = run_benchmark(__file__, __doc__, measure, ["padded", "padding_free", "packed"])
    print(
        f"packing | owl2-tiny vision + Llama 4 x 256 | rows with 0-3 images and 8-200 text tokens | "
        f"median of {args.repeats}, {args.threads} threads"
    )
    print(f"{'variant':<14}{'tokens/s':>10}{'padding':>10}{'loss':>8}{'steps':>7}{'vs padded':>11}")
    for variant, result in medians.items():
        ratio = result["tokens_per_s"] / medians["padded"]["tokens_per_s"]
        print(
            f"{variant:<14}{result['tokens_per_s']:>10.0f}{result['padding']:>10.1%}{result['loss']:>8.3f}"
            f"{result['steps']:>7.0f}{ratio:>10.2f}x"
        )


if __name__ == "__main__":
    main()
