"""Run by test_training_runs.py under `torchrun --nproc_per_node 2`: one tiny recipe, each rank reports its weights."""

import hashlib
import json
import os
import sys

import torch
from transformers import TrainerCallback

from modeling_mmllm.training import load_recipe, train

output = sys.argv[1]


class ReportWeights(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
        rank = int(os.environ.get("RANK", 0))
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        with open(os.path.join(output, f"rank{rank}.json"), "w") as file:
            json.dump({"sha": digest.hexdigest(), "world_size": world, "steps": state.global_step}, file)


recipe = load_recipe(
    "quickstart-stage2",
    {
        "model": "owl2-tiny",
        "data": {"synthetic": "joint", "n": 32, "image_size": 32},
        "output_dir": output,
        "max_steps": 4,
        "per_device_train_batch_size": 2,
        "save_steps": 100,
        "logging_steps": 1,
    },
)
train(recipe, name="ddp", callbacks=[ReportWeights()])
torch.distributed.destroy_process_group()  # as a script must before it exits (gloo can abort otherwise)
