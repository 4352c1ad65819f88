"""AnyRes cost: soft tokens per image and time to first token at 1x1, 2x1 and 2x2 grids, `mlp` vs `abstractor`.

The encoder and backbone of `projector_ttft.py` (CLIP 336 px / patch 14, a Llama ~18x the encoder), with
LLaVA-NeXT's tiling (`image_grid_pinpoints` 336x336, 336x672, 672x672): an image the size of each grid becomes a
global view plus 1, 2 or 4 tiles. `mlp` packs the tiles' patches (unpadded, a newline per row); the `abstractor`
gives every view its 64 queries. Each variant runs in its own subprocess, interleaved; prints medians and ratios.

    python benchmarks/anyres_cost.py [--repeats 3] [--threads 2]
"""

import time

from harness import run_benchmark
from projector_ttft import ARCH, PROMPT_TOKENS, VARIANTS

GRIDS = {"1x1": (336, 336), "2x1": (336, 672), "2x2": (672, 672)}  # (height, width) of the image
PINPOINTS = [list(size) for size in GRIDS.values()]


def time_to_first_token(variant: str, threads: int) -> dict:
    import torch
    from PIL import Image

    from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration
    from modeling_mmllm.anyres import num_image_tokens
    from modeling_mmllm.builders.presets import image_processor_for

    projector, grid = variant.split("/")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = MMLLMConfig(**ARCH, **VARIANTS[projector], image_grid_pinpoints=PINPOINTS)
    model = MMLLMForConditionalGeneration(config).eval()
    height, width = GRIDS[grid]
    pixels = image_processor_for(config.vision_config, PINPOINTS)(
        Image.new("RGB", (width, height)), return_tensors="pt"
    )
    tokens = num_image_tokens((height, width), PINPOINTS, 336, config.image_seq_length, projector == "mlp")
    ids = [1] + [config.image_token_id] * tokens + list(range(100, 100 + PROMPT_TOKENS))
    batch = dict(input_ids=torch.tensor([ids]), **pixels)
    with torch.no_grad():
        model(**batch, logits_to_keep=1)  # warm-up
        start = time.perf_counter()
        for _ in range(3):
            model(**batch, logits_to_keep=1)
    return {
        "seconds": (time.perf_counter() - start) / 3,
        "tokens": tokens,
        "views": int(pixels["pixel_values"].shape[1]),
    }


def main() -> None:
    variants = [f"{projector}/{grid}" for projector in ("mlp", "abstractor") for grid in GRIDS]
    args, medians = run_benchmark(__file__, __doc__, time_to_first_token, variants)
    print(f"AnyRes: one image + {PROMPT_TOKENS}-token prompt | median of {args.repeats}, {args.threads} threads")
    header = f"{'grid':<6}{'views':>6}{'mlp tokens':>12}{'mlp TTFT':>11}{'abstractor tokens':>19}{'abstr. TTFT':>13}"
    print(f"{header}{'ratio':>8}")
    for grid in GRIDS:
        mlp, abstractor = medians[f"mlp/{grid}"], medians[f"abstractor/{grid}"]
        ratio = mlp["seconds"] / abstractor["seconds"]
        print(
            f"{grid:<6}{int(mlp['views']):>6}{int(mlp['tokens']):>12}{mlp['seconds']:>10.3f}s"
            f"{int(abstractor['tokens']):>19}{abstractor['seconds']:>12.3f}s{ratio:>7.2f}x"
        )
    print("ratio: mlp TTFT / abstractor TTFT at the same grid (the abstractor is that many times faster)")


if __name__ == "__main__":
    main()
