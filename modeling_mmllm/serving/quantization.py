"""Loading a folder for inference, optionally quantized on the fly by torchao through transformers' `TorchAoConfig`
(`--quantization int8` of `mmllm serve`, `demo`, `generate` and `chat`)."""

from pathlib import Path

QUANTIZATIONS = ("int8", "int4")  # int4 is named so that asking for it gets the reason it is refused on a CPU


def quantization_config(name: str):
    """transformers' `TorchAoConfig` for a `--quantization` name: `int8` is torchao's int8 weight-only
    quantization (per-channel scales) of every linear layer except the LM head (transformers keeps it, as it keeps
    the embeddings). `int4` is refused with the reason (measured in benchmarks/quantization.py)."""
    if name == "int4":
        raise ValueError(
            "--quantization int4: torchao's 4-bit weights need its packed int4 kernels (a CUDA GPU, or the mslk "
            "package); on a CPU its int4 is stored unpacked, one int8 per weight, so it saves nothing over int8 "
            "and loses accuracy. Use --quantization int8."
        )
    if name not in QUANTIZATIONS:
        raise ValueError(f"--quantization {name}: use int8.")
    try:
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig
    except ImportError:
        raise ImportError(
            '--quantization needs torchao: pip install "mmllm[serve]" (or pip install torchao).'
        ) from None
    return TorchAoConfig(Int8WeightOnlyConfig())


def load_processor(model_id: str | Path, revision: str | None = None):
    """The `MMLLMProcessor` of a saved folder or Hub id (at `revision`)."""
    from ..processing_mmllm import MMLLMProcessor

    return MMLLMProcessor.from_pretrained(model_id, revision=revision)


def load_for_inference(model_id: str | Path, quantization: str | None = None, revision: str | None = None):
    """`(model, processor)` of a saved folder or Hub id (at `revision`), in eval mode, quantized when `quantization`
    is given."""
    from ..modeling_mmllm import MMLLMForConditionalGeneration

    kwargs = {} if quantization is None else {"quantization_config": quantization_config(quantization)}
    model = MMLLMForConditionalGeneration.from_pretrained(model_id, revision=revision, **kwargs)
    processor = load_processor(model_id, revision)
    processor.check_config(model.config)  # a hand-edited processor_config.json: refused here, not after generating
    return model.eval(), processor


__all__ = ["QUANTIZATIONS", "load_for_inference", "load_processor", "quantization_config"]
