"""Time to first token: `mlp` (one token per patch) vs `abstractor` (64 queries) at ViT-L-like patch counts.

Same encoder (CLIP, 336 px / patch 14 -> 576 patches, small widths so it runs on a CPU) and same Llama backbone,
in mPLUG-Owl2's size proportions (backbone ~18x the encoder); only the projector differs. Each variant runs in
its own subprocess, interleaved; prints medians and the ratio.

    python benchmarks/projector_ttft.py [--repeats 3] [--threads 2]
"""

import time

from harness import run_benchmark

PROMPT_TOKENS = 32
ARCH = dict(
    vision_config=dict(
        model_type="clip_vision_model",
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        image_size=336,
        patch_size=14,
        projection_dim=256,
    ),
    # The backbone is ~18x the encoder's size, as LLaMA-2-7B is ~20x ViT-L.
    text_config=dict(
        model_type="llama",
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=32064,
        max_position_embeddings=4096,
    ),
    image_token_id=32000,
)
VARIANTS = {
    "mlp": dict(projector_type="mlp", vision_feature_layer=-2, vision_feature_select_strategy="default"),
    "abstractor": dict(
        projector_type="abstractor",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_feature_layernorm=True,
        projector_config=dict(num_queries=64, num_layers=6, num_heads=8, intermediate_size=704),
    ),
}


def time_to_first_token(variant: str, threads: int) -> dict:
    import torch

    from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = MMLLMConfig(**ARCH, **VARIANTS[variant])
    model = MMLLMForConditionalGeneration(config).eval()
    ids = [1] + [config.image_token_id] * config.image_seq_length + list(range(100, 100 + PROMPT_TOKENS))
    batch = dict(input_ids=torch.tensor([ids]), pixel_values=torch.randn(1, 3, 336, 336))
    with torch.no_grad():
        model(**batch, logits_to_keep=1)  # warm-up
        start = time.perf_counter()
        for _ in range(5):
            model(**batch, logits_to_keep=1)
    return {"seconds": (time.perf_counter() - start) / 5, "sequence": len(ids)}


def main() -> None:
    args, medians = run_benchmark(__file__, __doc__, time_to_first_token, list(VARIANTS))
    print(
        f"time to first token, 1 image (336 px, 576 patches) + {PROMPT_TOKENS}-token prompt | "
        f"median of {args.repeats}, {args.threads} threads"
    )
    for variant, result in medians.items():
        print(f"{variant:<12}{int(result['sequence']):>6} tokens {result['seconds']:>10.4f} s")
    ratio = medians["mlp"]["seconds"] / medians["abstractor"]["seconds"]
    print(f"mlp / abstractor: {ratio:.2f}x (the abstractor is that many times faster)")


if __name__ == "__main__":
    main()
