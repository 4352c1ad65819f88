"""Serving (library side): the OpenAI-compatible server (`mmllm serve`), the Gradio demo (`mmllm demo`) and the
quantized loading both share with `mmllm generate` / `mmllm chat` (`--quantization`)."""
