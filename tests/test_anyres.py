"""AnyRes (LLaVA-NeXT's high resolution) for every projector: parity with transformers' LlavaNext (logits, the
processor's token counts and pixels), token counts that follow the image's shape, batched = one-by-one, clear
errors."""

import pytest
import torch
from PIL import Image
from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
)

from helpers import tiny_text_config, tiny_vision_config
from modeling_mmllm import MMLLMConfig, MMLLMForConditionalGeneration, MMLLMProcessor
from modeling_mmllm.builders.presets import offline_tokenizer
from modeling_mmllm.cli import main
from modeling_mmllm.conversion import convert_processor, from_llava_next

pytestmark = pytest.mark.hub

S = 32  # the tiny encoders' image size
PINPOINTS = [[S, 2 * S], [2 * S, S], [2 * S, 2 * S], [S, 3 * S], [3 * S, S]]
PROMPT = "<|user|>\n<image>What is in the picture?<|end|>\n<|assistant|>\n"


def _images():
    """A wide, a tall and a small image (different grids), with some structure to encode."""
    sizes = [(90, 40), (40, 100), (24, 20)]  # (width, height)
    images = []
    for index, (width, height) in enumerate(sizes):
        image = Image.new("RGB", (width, height), (40 * index, 120, 200 - 50 * index))
        image.paste((255, 255, 0), (width // 4, height // 4, width // 2, height // 2))
        images.append(image)
    return images


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory):
    """A random tiny LLaVA-NeXT saved with its processor (the offline tokenizer)."""
    tokenizer = offline_tokenizer()
    config = LlavaNextConfig(
        vision_config=tiny_vision_config("clip").to_dict(),
        text_config=tiny_text_config("llama").to_dict(),
        image_token_id=tokenizer.image_token_id,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.image_newline.normal_()
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": S}, crop_size={"height": S, "width": S}, image_grid_pinpoints=PINPOINTS
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    folder = tmp_path_factory.mktemp("llava-next") / "tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor, folder


def test_logits_equal_llava_next_on_its_own_processor_outputs(llava_next):
    model, processor, folder = llava_next
    ours = from_llava_next(model)
    texts = [PROMPT, "<|user|>\nTwo: <image><image><|end|>\n<|assistant|>\n"]
    images = _images()
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    assert processor.tokenizer.padding_side == "left" and not inputs["attention_mask"][0].all()
    with torch.no_grad():
        expected = model(**inputs).logits
        actual = ours(**inputs).logits
    mask = inputs["attention_mask"].bool()
    assert (actual[mask] - expected[mask]).abs().max() <= 1e-4
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours.generate(**inputs, **kwargs), model.generate(**inputs, **kwargs))


def test_converted_processor_equals_llava_next_processor(llava_next):
    model, processor, folder = llava_next
    ours = convert_processor(folder, from_llava_next(model).config)
    images = _images()
    texts = [PROMPT] * 3
    expected = processor(images=images, text=texts, return_tensors="pt", padding=True)
    actual = ours(images=images, text=texts, return_tensors="pt", padding=True)
    for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes"):
        assert torch.equal(actual[key], expected[key]), key
    counts = (actual["input_ids"] == ours.image_token_id).sum(1).tolist()
    assert len(set(counts)) == 3  # each shape its own token count


def test_cli_converts_llava_next(llava_next, tmp_path):
    _, processor, folder = llava_next
    assert main(["convert", "llava-next", str(folder), str(tmp_path / "ours")]) == 0
    model = MMLLMForConditionalGeneration.from_pretrained(tmp_path / "ours")
    reloaded = MMLLMProcessor.from_pretrained(tmp_path / "ours")
    assert model.config.image_grid_pinpoints == PINPOINTS and reloaded.grid_packing
    inputs = reloaded(images=_images()[:1], text=[PROMPT], return_tensors="pt")
    assert torch.equal(
        inputs["input_ids"], processor(images=_images()[:1], text=[PROMPT], return_tensors="pt")["input_ids"]
    )


@pytest.mark.parametrize("preset", ["llava-next-tiny", "owl2-anyres-tiny"])
def test_batched_generation_equals_one_by_one(preset):
    torch.manual_seed(0)
    model = MMLLMForConditionalGeneration(MMLLMConfig.from_preset(preset)).eval()
    processor = MMLLMProcessor.from_preset(preset)
    images = _images()
    text_only = "<|user|>\nWhat comes after one?<|end|>\n<|assistant|>\n"  # an untiled row in the same batch
    batch = processor(images=images, text=[PROMPT] * 3 + [text_only], return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=5, do_sample=False, eos_token_id=None)
    batched = model.generate(**batch, **kwargs)[:, -5:]
    for index, image in enumerate(images):
        single = processor(images=[image], text=[PROMPT], return_tensors="pt")
        assert model.generate(**single, **kwargs)[0, -5:].tolist() == batched[index].tolist()
    alone = model.generate(**processor(text=[text_only], return_tensors="pt"), **kwargs)
    assert alone[0, -5:].tolist() == batched[3].tolist()


def test_token_counts_follow_the_grid():
    """owl2-anyres-tiny: each view is the abstractor's 9 tokens; a wide, a tall and a small image get 3, 4 and 2
    views (global + tiles of the best grid among s x s ... 3s x s)."""
    config = MMLLMConfig.from_preset("owl2-anyres-tiny")
    processor = MMLLMProcessor.from_preset("owl2-anyres-tiny")
    images = [Image.new("RGB", (64, 32)), Image.new("RGB", (30, 95)), Image.new("RGB", (20, 20))]
    counts = [
        int((processor(images=[image], text=[PROMPT], return_tensors="pt")["input_ids"] == config.image_token_id).sum())
        for image in images
    ]
    assert counts == [3 * config.image_seq_length, 4 * config.image_seq_length, 2 * config.image_seq_length]


def test_llava_next_vicuna_7b_has_llava_next_parameter_count():
    config = MMLLMConfig.from_preset("llava-next-vicuna-7b")
    with torch.device("meta"):
        ours = MMLLMForConditionalGeneration(config)
        reference = LlavaNextForConditionalGeneration(
            LlavaNextConfig(
                vision_config=config.vision_config.to_dict(),
                text_config=config.text_config.to_dict(),
                image_grid_pinpoints=config.image_grid_pinpoints,
                image_token_id=config.image_token_id,
            )
        )
    assert ours.num_parameters() == reference.num_parameters() == 7_063_431_168 == 7_063_427_072 + 4096


def test_clear_errors():
    with pytest.raises(ValueError, match="multiples of the vision encoder's image size 32"):
        MMLLMConfig.from_preset("llava-tiny", image_grid_pinpoints=[[48, 64]])
    with pytest.raises(ValueError, match="vision_feature_select_strategy='default'"):
        MMLLMConfig.from_preset("llava-tiny", image_grid_pinpoints=PINPOINTS, vision_feature_select_strategy="full")
    plain = MMLLMForConditionalGeneration(MMLLMConfig.from_preset("llava-tiny")).eval()
    with pytest.raises(ValueError, match="no image_grid_pinpoints"):
        plain.get_image_features(torch.zeros(1, 3, 3, S, S), torch.tensor([[S, 2 * S]]))
    tiled = MMLLMForConditionalGeneration(MMLLMConfig.from_preset("llava-next-tiny")).eval()
    with pytest.raises(ValueError, match="need image_sizes"):
        tiled.get_image_features(torch.zeros(1, 3, 3, S, S))


FRESH_PROCESS = """
import json, sys
sys.modules["modeling_mmllm"] = None  # only the folder's code may run
from PIL import Image
from transformers import pipeline
folder, image_path, prompt = sys.argv[1:4]
pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
out = pipe(images=[Image.open(image_path)], text=prompt, generate_kwargs={"max_new_tokens": 6, "do_sample": False},
           return_full_text=False)
print(json.dumps({"text": out[0]["generated_text"], "module": type(pipe.model).__module__}))
"""


@pytest.mark.slow
def test_a_saved_tiled_folder_runs_in_a_pipeline_without_the_package(tmp_path):
    """The folder's own code tiles, counts and packs: `pipeline("image-text-to-text")` in a fresh process without
    the package answers as the model does here."""
    import json
    import subprocess
    import sys

    from modeling_mmllm.saving import save_model_folder

    torch.manual_seed(0)
    model = MMLLMForConditionalGeneration(MMLLMConfig.from_preset("llava-next-tiny")).eval()
    processor = MMLLMProcessor.from_preset("llava-next-tiny")
    folder = save_model_folder(model, processor, tmp_path / "llava-next-tiny")
    image = _images()[0]
    image.save(tmp_path / "wide.png")
    inputs = processor(images=[Image.open(tmp_path / "wide.png")], text=[PROMPT], return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    expected = processor.decode(ids, skip_special_tokens=True)
    run = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(folder), str(tmp_path / "wide.png"), PROMPT],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    reported = json.loads(run.stdout.strip().splitlines()[-1])
    assert reported["module"].startswith("transformers_modules.") and reported["text"] == expected


def test_video_frames_stay_single_views_on_a_tiled_model():
    """video-tiny with AnyRes for images: a clip's frames are global views (video_seq_length tokens), images tile."""
    from modeling_mmllm.builders.presets import load_processor_preset

    config = MMLLMConfig.from_preset("video-tiny", image_grid_pinpoints=PINPOINTS)
    processor = load_processor_preset(MMLLMProcessor, "video-tiny", config)
    torch.manual_seed(0)
    model = MMLLMForConditionalGeneration(config).eval()
    frames = [Image.new("RGB", (48, 32), (10 * i, 100, 100)) for i in range(config.video_num_frames)]
    prompt = "<|user|>\n<video><image>What happens?<|end|>\n<|assistant|>\n"
    inputs = processor(images=[_images()[0]], videos=[frames], text=[prompt], return_tensors="pt")
    assert inputs["pixel_values_videos"].shape[:2] == (1, config.video_num_frames)
    assert int((inputs["input_ids"] == config.video_token_id).sum()) == config.video_seq_length
    assert inputs["pixel_values"].dim() == 5 and model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_chat_template_tiles_as_the_processor_does():
    processor = MMLLMProcessor.from_preset("llava-next-tiny")
    image = _images()[1]
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}]}]
    chat = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    direct = processor(images=[image], text=[prompt], return_tensors="pt")
    assert torch.equal(torch.as_tensor(chat["input_ids"]).view(1, -1), direct["input_ids"])
    assert torch.equal(torch.as_tensor(chat["image_sizes"]), direct["image_sizes"])
