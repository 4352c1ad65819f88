"""PEFT's usual LoRA targets on modality-adaptive models: through PEFT, TRL's SFTTrainer and DPOTrainer; every
branch of a targeted projection gets its own adapter, which saves small, reloads over the remote-code base and
merges into a folder that loads without the package."""

import json
import subprocess
import sys
import tempfile

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForImageTextToText
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from helpers import make_images, perturb_branches, seeded_model
from modeling_mmllm import MMLLMConfig, MMLLMProcessor
from modeling_mmllm.saving import save_model_folder

pytestmark = pytest.mark.hub

USUAL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # LLaVA's and mPLUG-Owl2's recipes, PEFT's docs
PROMPT = "<image>What colour is it?"
TRAINING = dict(
    max_steps=2,
    per_device_train_batch_size=2,
    use_cpu=True,
    bf16=False,
    report_to=[],
    max_length=None,
    learning_rate=1e-2,
    gradient_checkpointing=False,
    save_strategy="no",
    dataloader_num_workers=0,
    logging_steps=1,
)

# A fresh process where the package cannot be imported: the merged folder's own code answers.
LOGITS = """
import json, sys
sys.modules["modeling_mmllm"] = None
import numpy as np, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
with torch.no_grad():
    logits = model(**processor(images=[image], text=[sys.argv[2]], return_tensors="pt")).logits
print(json.dumps(logits[0, -4:].tolist()))
"""


def _config() -> MMLLMConfig:
    return MMLLMConfig.from_preset("owl2-tiny")


@pytest.fixture(scope="module")
def processor() -> MMLLMProcessor:
    return MMLLMProcessor.from_preset("owl2-tiny")


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory, processor):
    model = seeded_model(_config())
    perturb_branches(model)  # the image branch differs from the text branch, as after training
    return save_model_folder(model, processor, tmp_path_factory.mktemp("peft") / "base")


@pytest.fixture(scope="module")
def inputs(processor):
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    return processor(images=[image], text=[PROMPT], return_tensors="pt")


def _remote_base(folder):
    return AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()


def _adapted(model) -> set[str]:
    """Names (under the LLM) of the modules that carry a LoRA adapter."""
    return {
        name.split("language_model.", 1)[1]
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "language_model." in name
    }


def _branch_names(config: MMLLMConfig) -> set[str]:
    return {
        f"layers.{layer}.self_attn.{path}"
        for layer in range(config.text_config.num_hidden_layers)
        for path in ("q_proj", "o_proj", *(f"multiway.{m}.{n}" for m in (0, 1) for n in ("k_proj", "v_proj")))
    }


@pytest.mark.parametrize("targets", [USUAL_TARGETS, "all-linear"], ids=["qkvo", "all-linear"])
def test_lora_gives_every_branch_its_adapter(base_folder, targets):
    model = get_peft_model(_remote_base(base_folder), LoraConfig(r=4, target_modules=targets))
    assert _branch_names(_config()) <= _adapted(model)


def test_adapter_saves_small_reloads_over_the_remote_code_base_and_merges(base_folder, inputs, tmp_path):
    config = LoraConfig(r=4, target_modules=USUAL_TARGETS, init_lora_weights=False)  # adapters that act at once
    model = get_peft_model(_remote_base(base_folder), config).eval()
    with torch.no_grad():
        adapted, plain = model(**inputs).logits, _remote_base(base_folder)(**inputs).logits
    assert not torch.allclose(adapted, plain)

    model.save_pretrained(tmp_path / "adapter")
    adapter_size = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert adapter_size < (base_folder / "model.safetensors").stat().st_size / 4
    reloaded = PeftModel.from_pretrained(_remote_base(base_folder), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, adapted)

    merged = reloaded.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    MMLLMProcessor.from_pretrained(base_folder).save_pretrained(tmp_path / "merged")
    run = subprocess.run(
        [sys.executable, "-c", LOGITS, str(tmp_path / "merged"), PROMPT], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    torch.testing.assert_close(
        torch.tensor(json.loads(run.stdout.strip().splitlines()[-1])), adapted[0, -4:], atol=1e-4, rtol=1e-4
    )


def _image_branch_adapters(model) -> list[torch.Tensor]:
    return [p for name, p in model.named_parameters() if ".multiway.1." in name and "lora_B" in name]


def _messages(question: str, answer: str | None = None) -> list[dict]:
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return turns


def test_sft_trainer_trains_every_branch_through_peft_config(processor):
    data = Dataset.from_list([{"images": [image], "messages": _messages("Colour?", "red")} for image in make_images(4)])
    trainer = SFTTrainer(
        model=seeded_model(_config()).train(),
        processing_class=processor,
        train_dataset=data,
        args=SFTConfig(output_dir=tempfile.mkdtemp(), **TRAINING),
        peft_config=LoraConfig(r=4, target_modules=USUAL_TARGETS),
    )
    trainer.train()
    assert _branch_names(_config()) <= _adapted(trainer.model)
    adapters = _image_branch_adapters(trainer.model)
    assert adapters and all(p.abs().sum() > 0 for p in adapters)  # LoRA's B starts at zero: the image branch learned


def test_dpo_trainer_trains_every_branch_through_peft_config(processor):
    data = Dataset.from_list(
        [
            {
                "images": [image],
                "prompt": _messages("Colour?"),
                "chosen": _messages("", "red")[1:],
                "rejected": _messages("", "blue")[1:],
            }
            for image in make_images(4)
        ]
    )
    trainer = DPOTrainer(
        model=seeded_model(_config()).train(),
        processing_class=processor,
        train_dataset=data,
        args=DPOConfig(output_dir=tempfile.mkdtemp(), **TRAINING),
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert _branch_names(_config()) <= _adapted(trainer.model)
    assert all(p.abs().sum() > 0 for p in _image_branch_adapters(trainer.model))


def test_lora_on_a_cross_attention_model_trains_the_blocks_and_their_gates():
    """The recipes' LoRA: adapters on the LLM's own linear layers; the gated cross-attention blocks (new, behind
    gates at 0) train fully, so a step opens the gates."""
    from modeling_mmllm.gated_cross_attention import cross_attention_blocks
    from modeling_mmllm.training.model_setup import lora_config

    model = seeded_model(MMLLMConfig.from_preset("flamingo-tiny")).train()
    peft_model = get_peft_model(model, lora_config(model, {}))
    trainable = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    assert any("gated_cross_attn" in name and name.endswith("alpha_cross_attn") for name in trainable)
    assert not any("gated_cross_attn" in name and "lora_" in name for name in trainable)
    assert any("self_attn.q_proj.lora_A" in name for name in trainable)
    ids = torch.tensor([[7, 5, 8, 9, 10]])
    pixels = torch.randn(1, 3, 32, 32)
    peft_model(input_ids=ids, pixel_values=pixels, labels=ids).loss.backward()
    torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1).step()
    trained = [block for block in cross_attention_blocks(peft_model) if block.alpha_cross_attn.requires_grad]
    assert len(trained) == 2 and all(block.alpha_cross_attn.item() != 0 for block in trained)  # PEFT's copies
