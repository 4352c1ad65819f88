"""A learning rate per component (`vision_tower_lr`, `projector_lr`; the LLM takes `learning_rate`), combined with
the vision encoder's layer-wise decay, for SFT, DPO and GRPO: the optimizer a recipe run trains with carries the rates
asked for, and its groups are printed as the stage starts."""

import pytest
import yaml
from transformers import TrainerCallback

from modeling_mmllm.training import load_recipe, train
from modeling_mmllm.training.model_setup import build_model, component_parameter_names

DATA = {
    "sft": {"synthetic": "vqa", "n": 8, "image_size": 32},
    "dpo": {"synthetic": "swatch-preference", "n": 8, "image_size": 32},
    "grpo": {"synthetic": "count-compare", "n": 8, "image_size": 32},
}
TRAINER_KEYS = {"grpo": {"num_generations": 2, "max_completion_length": 2}}  # 2 rows: one prompt, two answers


class OptimizerRates(TrainerCallback):
    """Keeps the learning rate each parameter starts with (`initial_lr`: before the scheduler's warm-up)."""

    def __init__(self):
        self.rates = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        names = {id(parameter): name for name, parameter in model.named_parameters()}
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                self.rates[names[id(parameter)]] = group["initial_lr"]


@pytest.mark.parametrize("trainer", ["sft", "dpo", "grpo"])
def test_component_learning_rates_reach_the_optimizer_with_the_layerwise_decay(trainer, tmp_path, caplog):
    recipe = {
        "trainer": trainer,
        "model": {"preset": "owl2-tiny"},
        "data": DATA[trainer],
        "freeze": [],
        "learning_rate": 1.0e-3,
        "vision_tower_lr": 3.0e-3,
        "projector_lr": 2.0e-3,
        "vision_lr_decay": 0.5,
        "output_dir": str(tmp_path / "run"),
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "save_steps": 100,
        "report_to": "none",
        "dataloader_num_workers": 0,
        **TRAINER_KEYS.get(trainer, {}),
    }
    path = tmp_path / "rates.yaml"
    path.write_text(yaml.safe_dump(recipe))
    captured = OptimizerRates()
    train(load_recipe(str(path)), callbacks=[captured])

    rates = {name.removeprefix("model."): rate for name, rate in captured.rates.items()}
    # owl2-tiny's encoder has 2 layers: the top one decays once, the embeddings three times.
    assert rates["vision_tower.encoder.layers.1.mlp.fc1.weight"] == pytest.approx(3e-3 * 0.5)
    assert rates["vision_tower.encoder.layers.0.mlp.fc1.weight"] == pytest.approx(3e-3 * 0.25)
    assert rates["vision_tower.embeddings.patch_embedding.weight"] == pytest.approx(3e-3 * 0.125)
    assert rates["vision_tower.post_layernorm.weight"] == pytest.approx(3e-3)
    assert {rate for name, rate in rates.items() if name.startswith("multi_modal_projector.")} == {2e-3}
    assert {rate for name, rate in rates.items() if name.startswith(("language_model.", "lm_head."))} == {1e-3}
    printed = [line for line in caplog.text.splitlines() if "optimizer group" in line]
    assert len(printed) == len({round(rate, 12) for rate in rates.values()}) == 6, printed
    assert any("lr 0.002, weight decay 0" in line and "(multi_modal_projector)" in line for line in printed)
    assert any("lr 0.001, weight decay 0" in line and "(language_model, lm_head)" in line for line in printed)


def test_projector_lr_covers_every_input_projector_and_names_a_missing_component():
    audio, _ = build_model({"preset": "audio-tiny"})
    covered = {name.split(".")[1] for name in component_parameter_names(audio, "projector")}
    assert covered == {"multi_modal_projector", "audio_projector"}
    owl2, _ = build_model({"preset": "owl2-tiny"})
    owl2.model.vision_tower = None
    with pytest.raises(ValueError, match="vision_tower_lr is set, but this model has no vision_tower"):
        component_parameter_names(owl2, "vision_tower")
