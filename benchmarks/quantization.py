"""Quantized CPU inference (`--quantization int8` / `int4`, torchao through transformers' `TorchAoConfig`) against
fp32 on the same saved folder: weight memory, logit error, greedy agreement, decode speed.

A mid-size model (CLIP 448 px + abstractor + Llama 8 x 768, 32k vocabulary: 114M parameters), saved once; each
variant loads it in its own subprocess, interleaved. Logit error: max |quantized - fp32| over max |fp32| on one
image + 32-token prompt; agreement: share of positions whose arg-max token is fp32's. `int4-cpu` is torchao's only
int4 that runs on a CPU here (`IntxWeightOnlyConfig`, groups of 32): it shows why `--quantization int4` is refused.

    python benchmarks/quantization.py [--repeats 3] [--threads 2]
"""

import sys
import tempfile
import time
from pathlib import Path

from harness import run_benchmark
from modality_adaptive_cost import ARCH, NEW_TOKENS, PROMPT_TOKENS

FOLDER = Path(tempfile.gettempdir()) / "mmllm-benchmark-quantization"
VARIANTS = ["fp32", "int8", "int4-cpu"]


def save_folder() -> None:
    """The benchmark's model, saved once (seeded: the same weights on every machine)."""
    import torch

    from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration

    if not (FOLDER / "model.safetensors").is_file():
        torch.manual_seed(0)
        MMLLMForConditionalGeneration(MMLLMConfig(**ARCH)).save_pretrained(FOLDER)


def tensor_bytes(tensor) -> int:
    """Bytes a weight holds, through torchao's tensor subclasses (their quantized data, scales and zero points)."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def config(variant: str):
    """`--quantization int8`'s config, or torchao's CPU int4 (unpacked) that `--quantization int4` refuses."""
    import torch
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from transformers import TorchAoConfig

    from modeling_mmllm.serving.quantization import quantization_config

    if variant == "int8":
        return quantization_config("int8")
    return TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))


def measure(variant: str, threads: int) -> dict:
    import torch

    from modeling_mmllm import MMLLMForConditionalGeneration

    torch.set_num_threads(threads)
    reference = MMLLMForConditionalGeneration.from_pretrained(FOLDER).eval()
    kwargs = {} if variant == "fp32" else {"quantization_config": config(variant)}
    model = MMLLMForConditionalGeneration.from_pretrained(FOLDER, **kwargs).eval()
    torch.manual_seed(1)
    ids = [1] + [32000] * model.config.image_seq_length + list(range(100, 100 + PROMPT_TOKENS))
    batch = dict(input_ids=torch.tensor([ids]), pixel_values=torch.randn(1, 3, 448, 448))
    generate = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    with torch.no_grad():
        expected, logits = reference(**batch).logits, model(**batch).logits
        model.generate(**batch, **{**generate, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        start = time.perf_counter()
        model.generate(**batch, **generate)
        seconds = time.perf_counter() - start
    return {
        "weights_MB": sum(tensor_bytes(p) for p in model.parameters()) / 2**20,
        "logit_error": float((logits - expected).abs().max() / expected.abs().max()),
        "top1_agreement": float((logits.argmax(-1) == expected.argmax(-1)).float().mean()),
        "decode_tok_s": NEW_TOKENS / seconds,
    }


def main() -> None:
    if "--child" not in sys.argv:
        save_folder()
    args, medians = run_benchmark(__file__, __doc__, measure, VARIANTS)
    print(f"quantized CPU inference (torchao) | {ARCH['text_config']['num_hidden_layers']} x 768 Llama + CLIP 448 px "
          f"| median of {args.repeats}, {args.threads} threads")  # fmt: skip
    print(f"{'metric':<16}" + "".join(f"{variant:>12}" for variant in VARIANTS) + f"{'int8/fp32':>12}{'int4/fp32':>12}")
    for metric in ("weights_MB", "logit_error", "top1_agreement", "decode_tok_s"):
        row = [medians[variant][metric] for variant in VARIANTS]
        ratios = "".join(f"{value / row[0]:>12.3f}" if row[0] else f"{'-':>12}" for value in row[1:])
        print(f"{metric:<16}" + "".join(f"{value:>12.4f}" for value in row) + ratios)


if __name__ == "__main__":
    main()
