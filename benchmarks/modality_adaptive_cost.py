"""Cost of the modality-adaptive module: the same model with and without it, one image + a 32-token prompt.

Prefill (time to first token) and decode (tokens/s over 32 new tokens; decoded tokens are text, so they take the
text branch on the whole tensor). Each variant runs in its own subprocess, interleaved; prints medians and ratios.

    python benchmarks/modality_adaptive_cost.py [--repeats 3] [--threads 2]
"""

import time

from harness import run_benchmark

PROMPT_TOKENS, NEW_TOKENS = 32, 32
ARCH = dict(
    vision_config=dict(
        model_type="clip_vision_model",
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        image_size=448,
        patch_size=14,
        projection_dim=256,
        hidden_act="quick_gelu",
    ),
    text_config=dict(
        model_type="llama",
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=32001,
        max_position_embeddings=4096,
    ),
    vision_feature_layer=-1,
    vision_feature_select_strategy="full",
    vision_feature_layernorm=True,
    projector_type="abstractor",
    projector_config=dict(num_queries=64, num_layers=6, num_heads=8, intermediate_size=704),
    image_token_id=32000,
)


def measure(variant: str, threads: int) -> dict:
    import torch

    from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = MMLLMForConditionalGeneration(MMLLMConfig(**ARCH, modality_adaptive=variant == "with")).eval()
    ids = [1] + [32000] * model.config.image_seq_length + list(range(100, 100 + PROMPT_TOKENS))
    batch = dict(input_ids=torch.tensor([ids]), pixel_values=torch.randn(1, 3, 448, 448))
    generate = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    with torch.no_grad():
        model(**batch, logits_to_keep=1)  # warm-up
        start = time.perf_counter()
        for _ in range(5):
            model(**batch, logits_to_keep=1)
        prefill = (time.perf_counter() - start) / 5
        model.generate(**batch, **{**generate, "max_new_tokens": 2, "min_new_tokens": 2})
        start = time.perf_counter()
        model.generate(**batch, **generate)
        total = time.perf_counter() - start
    return {"prefill_s": prefill, "decode_tok_s": NEW_TOKENS / (total - prefill)}


def main() -> None:
    args, medians = run_benchmark(__file__, __doc__, measure, ["without", "with"])
    print(
        f"modality-adaptive module cost | CLIP 448 px + abstractor (65 tokens) + Llama 8 x 768 | "
        f"median of {args.repeats}, {args.threads} threads"
    )
    print(f"{'metric':<16}{'without':>12}{'with':>12}{'with/without':>14}")
    for metric in ("prefill_s", "decode_tok_s"):
        without, with_module = medians["without"][metric], medians["with"][metric]
        print(f"{metric:<16}{without:>12.4f}{with_module:>12.4f}{with_module / without:>14.3f}")


if __name__ == "__main__":
    main()
