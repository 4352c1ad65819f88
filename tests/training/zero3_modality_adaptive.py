"""Run by test_zero3.py in its own process (args: port, output folder): the modality-adaptive module on a ZeRO-3
partitioned model, then the training runner under ZeRO-3."""

import json
import os
import sys

import torch

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed  # noqa: E402
from transformers.integrations import HfDeepSpeedConfig  # noqa: E402

from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration  # noqa: E402
from modeling_mmllm.modality_adaptive import multiway_branches  # noqa: E402

deepspeed.init_distributed(dist_backend="gloo")
ds_config = {"zero_optimization": {"stage": 3}, "train_batch_size": 1, "gradient_accumulation_steps": 1}
torch.manual_seed(0)
zero3 = HfDeepSpeedConfig(ds_config)  # transformers builds models partitioned while this object lives
model = MMLLMForConditionalGeneration._from_config(MMLLMConfig.from_preset("owl2-tiny", modality_adaptive=False))
partitioned = model.model.language_model.layers[0].self_attn.k_proj.weight
report = {"partitioned_before": partitioned.numel() == 0}
model.enable_modality_adaptive()
text, image = ([p for branch in multiway_branches(model, modality) for p in branch.parameters()] for modality in (0, 1))
with deepspeed.zero.GatheredParameters(text + image):
    equal = [torch.equal(a, b) for a, b in zip(text, image)]
    sizes = [b.numel() for b in image]
report.update(copies_equal=all(equal), copies_nonempty=min(sizes) > 0, branches=len(equal))
engine, *_ = deepspeed.initialize(
    model=model, config=ds_config, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3)
)
ids = torch.tensor([[7, *[5] * 9, 8, 9, 10]])
loss = engine(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), labels=ids).loss
engine.backward(loss)
engine.step()
report["trained_step_loss"] = float(loss.detach())

# The runner under ZeRO-3: the projector (and the modality-adaptive branches) are saved with their full weights.
from safetensors.torch import load_file  # noqa: E402

from modeling_mmllm.training import load_recipe, train  # noqa: E402

output = sys.argv[2]
recipe = load_recipe(
    "quickstart-stage2",
    {
        "model": "owl2-tiny",
        "data": {"synthetic": "joint", "n": 8, "image_size": 32},
        "output_dir": output,
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "save_steps": 100,
        "logging_steps": 1,
        "deepspeed": {
            "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
            "train_batch_size": "auto",
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
        },
    },
)
saved = load_file(f"{train(recipe)}/model.safetensors")
report["saved_projector_numel"] = min(t.numel() for k, t in saved.items() if "multi_modal_projector" in k)
report["saved_branch_numel"] = min(t.numel() for k, t in saved.items() if "multiway.1" in k)
print(json.dumps(report))
