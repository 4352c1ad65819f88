"""Helpers shared by the tests: tiny configs and models, images, the tiny Stable Diffusion stand-in, and the hub-set
stack check behind the deprecation net (fixtures live in conftest.py)."""

import inspect
import json
import logging
import string
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    GPT2Config,
    IdeficsConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    SiglipVisionConfig,
)

from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration
from modeling_mmllm.export.hub_card import hub_set_files

VOCAB = 512
CONDITION_LENGTH, CONDITION_WIDTH, IMAGE_SIZE = 16, 32, 32  # the tiny Stable Diffusion stand-in's conditioning
TESTS = Path(__file__).parent  # the tests' root: helpers, fixtures, conftest
ROOT = TESTS.parent
FIXTURES = TESTS / "fixtures"
QUICKSTART_THREADS = 2  # the torch threads the README's quickstart figures were measured with


HUB_FILES = {Path(path).name for path in hub_set_files()}
PACKAGE = Path(hub_set_files()[0]).parent


def hub_code_on_stack(frame) -> bool:
    """Whether a hub-set file (the package's own or a folder's remote-code copy) is among the calling frames."""
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path.name in HUB_FILES and (path.parent == PACKAGE or "transformers_modules" in path.parts):
            return True
        frame = frame.f_back
    return False


# Deprecations transformers triggers itself, through our overrides: its assisted decoding calls the assistant's
# `generate` (ours, passing through) with a generation config and loose arguments together.
UPSTREAM_DEPRECATIONS = ("Passing `generation_config` together with generation-related arguments",)


class DeprecatedFromHubSet(logging.Handler):
    """transformers logs some deprecations instead of warning (the 5.24 cache rename): those count too."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if (
            "deprecat" in message
            and not message.startswith(UPSTREAM_DEPRECATIONS)
            and hub_code_on_stack(sys._getframe())
        ):
            raise FutureWarning(f"the hub set uses a deprecated transformers API: {message}")


def tiny_vision_config(kind: str = "clip", **overrides):
    common = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
    )
    if kind == "clip":
        return CLIPVisionConfig(**{**common, "projection_dim": 32, **overrides})
    if kind == "siglip":
        return SiglipVisionConfig(**{**common, **overrides})
    raise ValueError(kind)


def tiny_text_config(kind: str = "llama", **overrides):
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    if kind in classes:
        return classes[kind](**{**common, **overrides})
    if kind == "gpt2":
        fields = dict(
            n_embd=64,
            n_layer=2,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=256,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=None,
        )
        return GPT2Config(**{**fields, **overrides})
    raise ValueError(kind)


def make_images(n: int, seed: int = 0, size=(40, 48)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]


def seeded_model(config: MMLLMConfig, seed: int = 0) -> MMLLMForConditionalGeneration:
    torch.manual_seed(seed)
    model = MMLLMForConditionalGeneration(config).eval()
    # Untrained tiny models have near-uniform logits; scale the head so greedy choices are well separated.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


def tiny_idefics_config(vocab_size: int = 100, interval: int = 1, qk_layer_norms: bool = False) -> IdeficsConfig:
    """A tiny IDEFICS (transformers' Flamingo): perceiver resampler, 4 LLaMA layers, IDEFICS-9B's two extra tokens
    (<fake_token_around_image>, <image>) after the vocabulary."""
    return IdeficsConfig(
        vocab_size=vocab_size,
        additional_vocab_size=2,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        cross_layer_interval=interval,
        qk_layer_norms=qk_layer_norms,
        use_resampler=True,
        max_position_embeddings=128,
        vision_config=dict(
            embed_dim=24, image_size=16, intermediate_size=48, patch_size=8, num_attention_heads=4, num_hidden_layers=2
        ),
        perceiver_config=dict(
            use_resampler=True,
            resampler_n_latents=4,
            resampler_depth=2,
            resampler_n_heads=2,
            resampler_head_dim=8,
            qk_layer_norms_perceiver=qk_layer_norms,
        ),
    )


def open_gates(model, seed: int = 0):
    """Give every gated cross-attention block non-zero gates (fresh blocks are closed: tanh(0) = 0)."""
    from modeling_mmllm.gated_cross_attention import cross_attention_blocks

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in cross_attention_blocks(model):
            for alpha in (block.alpha_cross_attn, block.alpha_dense):
                alpha.copy_(torch.rand(alpha.shape, generator=generator) + 0.5)
    return model


def perturb_branches(model, modality: int = 1, seed: int = 0) -> None:
    """Move one modality's modality-adaptive branches away from the text branch (so routing shows in outputs)."""
    from modeling_mmllm.modality_adaptive import multiway_branches

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for branch in multiway_branches(model, modality):
            for parameter in branch.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)


def tiny_clip_tokenizer(folder):
    """A CLIP BPE tokenizer from a hand-written vocab.json / merges.txt (characters plus a few merges)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits + ".,!?'":
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(f"{char}</w>", len(vocab))
    merges = ["t h", "th e</w>", "r e", "re d</w>", "s e", "se a</w>"]
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=CONDITION_LENGTH)


def save_tiny_stable_diffusion(root: Path) -> Path:
    """A tiny random StableDiffusionPipeline (CLIP text encoder, UNet, VAE, DDIM; 32x32 images), built from configs
    offline and saved with diffusers' `save_pretrained` (safetensors) into `root / "pipeline"`."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_clip_tokenizer(root / "vocab")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=CONDITION_WIDTH,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CONDITION_LENGTH,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            projection_dim=CONDITION_WIDTH,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CONDITION_WIDTH,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=IMAGE_SIZE,
        norm_num_groups=32,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(root / "pipeline", safe_serialization=True)
    return root / "pipeline"


# --- a real browser (Debian's chromium, driven by Playwright) for the demo tests --------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = ROOT / "test-artifacts"  # screenshots the tests save (git-ignored)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server a test starts)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(command: list[str], url: str, cwd=None, seconds: float = 180):
    """A server (`mmllm serve`, `mmllm demo`) in a child process, returned once `url` answers 200."""
    import os
    import subprocess
    import time

    import httpx

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{command} exited with {process.returncode}: {process.stdout.read()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise AssertionError(f"{url} did not answer within {seconds} s")


def stop_service(process) -> None:
    import subprocess

    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def ask_in_browser(url: str, files: list[Path], prompt: str, screenshot: Path, settle: float = 2.0) -> str:
    """Open the demo at `url` in a fresh headless Chromium, attach `files`, send `prompt`, wait for the streamed
    answer to settle, save a screenshot, and return the answer's text as the page shows it."""
    import tempfile
    import time

    from playwright.sync_api import sync_playwright

    assert CHROMIUM.is_file(), "the demo tests need Debian's chromium: `./run tests` installs it (apt-get)"
    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        browser = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1000, "height": 900},
        )
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector("#message textarea", timeout=60_000)
            if files:
                page.set_input_files("#message input[type=file]", [str(path) for path in files])
                page.wait_for_function(f"document.querySelectorAll('#message img').length >= {len(files)}")
            page.fill("#message textarea", prompt)
            page.press("#message textarea", "Enter")
            answer, stable_since, deadline = "", time.monotonic(), time.monotonic() + 120
            while time.monotonic() < deadline:
                bots = page.query_selector_all("#chat [data-testid=bot]")
                text = bots[-1].inner_text() if bots else ""
                if text != answer:
                    answer, stable_since = text, time.monotonic()
                elif answer and time.monotonic() - stable_since > settle:
                    break
                time.sleep(0.2)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
            return answer
        finally:
            browser.close()


def cache_key(language_model) -> str:
    """The backbone's cache keyword: `cache` from transformers 5.24 on, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(language_model.forward).parameters else "past_key_values"


def run_python(code: str, *args: str, timeout: float = 600) -> str:
    """`code` in a fresh Python process with `args` (sys.argv[1:]); its stdout, once it exited 0."""
    import subprocess

    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def typed(chat: list[dict]) -> list[dict]:
    """The same chat with typed text parts in every role (as transformers' processors and TRL write them)."""
    return [{**message, "content": [{"type": "text", "text": message["content"]}]} for message in chat]


def original_answers(folder, chats, new_tokens: int = 8) -> list[list[int]]:
    """Greedy answers of the LLM alone, through its own tokenizer and template."""
    lm = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    answers = []
    for chat in chats:
        inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        out = lm.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        answers.append(out[0, inputs["input_ids"].shape[1] :].tolist())
    return answers


def composed_answers(model, processor, chats, new_tokens: int = 8) -> list[list[int]]:
    """Greedy answers of the composed model through its own processor (typed parts, as pipelines send them)."""
    answers = []
    for chat in chats:
        inputs = processor.apply_chat_template(
            typed(chat), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        answers.append(out[0, inputs["input_ids"].shape[1] :].tolist())
    return answers


FRESH_PROCESS_ANSWERS = """
import json, sys
sys.modules["modeling_mmllm"] = None  # the folder's own code only
sys.modules["gguf"] = None  # a folder composed from a GGUF file is plain safetensors
from transformers import AutoModelForImageTextToText, AutoProcessor
folder, chats = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
answers = []
for chat in chats:
    inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=int(sys.argv[3]), do_sample=False)
    answers.append(out[0, inputs["input_ids"].shape[1]:].tolist())
print("ANSWERS", json.dumps(answers))
"""


def fresh_process_answers(folder, chats, new_tokens: int = 8) -> list[list[int]]:
    """Greedy answers of a saved folder, loaded in a fresh process where neither mmllm nor gguf can be imported."""
    out = run_python(FRESH_PROCESS_ANSWERS, str(folder), json.dumps([typed(chat) for chat in chats]), str(new_tokens))
    return json.loads(out.split("ANSWERS", 1)[1])


def shorter_reward(completions: list, **kwargs) -> list[float]:
    """A GRPO reward (TRL's signature) that differs between an untrained model's completions, so its gradient is not
    zero: the shorter the answer, the better. Recipes name it `helpers:shorter_reward`."""
    return [-float(len(completion[0]["content"])) / 10 for completion in completions]
