"""Loading a folder for inference, optionally quantized on the fly by torchao through transformers' `TorchAoConfig`
(`--quantization int8` / `int4` of `mmllm serve`, `demo`, `generate` and `chat`)."""

from pathlib import Path

QUANTIZATIONS = ("int8", "int4")
INT4_GROUP_SIZE = 32


def quantization_config(name: str):
    """transformers' `TorchAoConfig` for a `--quantization` name: `int8` is torchao's int8 weight-only
    quantization (per-channel scales), `int4` its int4 weight-only one in groups of 32 input features (torchao's
    `IntxWeightOnlyConfig`, which runs on a CPU; the tinygemm int4 kernels need a CUDA GPU)."""
    if name not in QUANTIZATIONS:
        raise ValueError(f"--quantization {name}: use one of {', '.join(QUANTIZATIONS)}.")
    try:
        import torch
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup
        from transformers import TorchAoConfig
    except ImportError:
        raise ImportError(
            '--quantization needs torchao: pip install "mmllm[serve]" (or pip install torchao).'
        ) from None
    if name == "int8":
        return TorchAoConfig(Int8WeightOnlyConfig())
    return TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP_SIZE)))


def load_for_inference(model_id: str | Path, quantization: str | None = None, **kwargs):
    """`(model, processor)` of a saved folder or Hub id, in eval mode, quantized when `quantization` is given.

    A model whose layers torchao cannot quantize (int4 needs input widths divisible by 32) is refused with a
    `ValueError` that names the quantization that fails and the one to try instead."""
    from ..modeling_mmllm import MMLLMForConditionalGeneration
    from ..processing_mmllm import MMLLMProcessor

    if quantization is not None:
        kwargs["quantization_config"] = quantization_config(quantization)
    try:
        model = MMLLMForConditionalGeneration.from_pretrained(model_id, **kwargs)
    except RuntimeError as error:
        if quantization is None or "conversion" not in str(error):
            raise
        raise ValueError(
            f"--quantization {quantization}: torchao cannot quantize this model's layers ({error}); use "
            + ("int8, or no --quantization." if quantization == "int4" else "no --quantization.")
        ) from None
    return model.eval(), MMLLMProcessor.from_pretrained(model_id)


__all__ = ["QUANTIZATIONS", "load_for_inference", "quantization_config"]
