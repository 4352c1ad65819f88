"""The synthetic task registry: one entry per task, the rows it makes pinned (a drift in any task's random stream
fails here), and the recipe settings that read it."""

import hashlib
import json

import numpy as np
import pytest

from modeling_mmllm.data.synthetic import SYNTHETIC_TASKS, make_dataset

# sha256 of `make_dataset(task, n=16, split=split, seed=seed, image_size=size)` (`_fingerprint`), computed before
# the tasks became a registry. Trained-accuracy thresholds in the tests and the README's figures depend on these
# rows: a change to a task's stream, seed arithmetic or drawing order shows here first.
PINNED = {
    ("text", "train", 0, 64): "ee963b51741d1f6c3e03d2525070919432391089c99c4e95874f90983d9aba2d",
    ("text", "heldout", 0, 64): "ee963b51741d1f6c3e03d2525070919432391089c99c4e95874f90983d9aba2d",
    ("text", "train", 3, 32): "17c4c7af98141912447741ac84df31af897c1262c4cce9fdc9d0393b0a86c84c",
    ("caption", "train", 0, 64): "bbe8d50b9c7af7ef6a4f67563cc45620dc5a765c7a723ee3e38bb42b2d68847d",
    ("caption", "heldout", 0, 64): "9b652b9c24e84af72d3d9239b63eb223e4d24ce7cb85fa2147e84cb8c63d9df3",
    ("caption", "train", 3, 32): "1a66ff0780309af7c78d85c017849ca7245b0a82e8b6dbd0c2c6177b6fe130c1",
    ("vqa", "train", 0, 64): "b47eae4d5968241c0b18ce2c31c61ac2a92fda6ed94ec5ebe0540bbe053b4a36",
    ("vqa", "heldout", 0, 64): "6c5543cce857351069ebf413841c0b59566988c1c9fb88e65a2a75dc77e9808e",
    ("vqa", "train", 3, 32): "7731f3c4ffd17dbf4be09754307cab6770bda7282d2453218128a72be19675ad",
    ("yes-no", "train", 0, 64): "bedfdd5decf85a38c807883e350bd715f2e241c904d786b5520681cc2957eab8",
    ("yes-no", "heldout", 0, 64): "d41bf691cf480224908dbd7fb1a5351b25b6d3f69ce593e1c755cbe00cb5bff0",
    ("yes-no", "train", 3, 32): "21feb5f3bfe027b468e6aea13c9eb394abf2059baaddebaa7e482fbbb07d619d",
    ("joint", "train", 0, 64): "7f009b5b6ab0b534434ec097358998a4323dd3a3a0f404ea6bdb695776624ec0",
    ("joint", "heldout", 0, 64): "41af08c3d6c12591123ecdb08ca3b7a3ef4d78004b64ec0842bbedcdfeacbab0",
    ("joint", "train", 3, 32): "96c38cba8d4cad9db1e5170d26b885353f21168af65eed64d6a73d9be4875776",
    ("text-eval", "train", 0, 64): "63fed38dceefd0f7264b1aa754710685f77d80dc70e0dafd6a1b34a7425747af",
    ("text-eval", "heldout", 0, 64): "63fed38dceefd0f7264b1aa754710685f77d80dc70e0dafd6a1b34a7425747af",
    ("text-eval", "train", 3, 32): "8221c14d4f11baf7dd5bd37be22848e774a1534da80cf0eda873178a05ea0b86",
    ("audio", "train", 0, 64): "29eb975e34d309f609e2c5cae0a95526fa0abe118d6d79dfbfa7bb1a381f3815",
    ("audio", "heldout", 0, 64): "9851d0766ce3c74d49d7f37da061ba83cc88a61e32d302fd082151e5c31947f7",
    ("audio", "train", 3, 32): "05a9ba1235addce6f4b412900d26c6e9ab9f54b9e44652f5e16b48ff203d8f50",
    ("detail", "train", 0, 64): "dd854ea465eaee606bcd1a841c5247f8b9c8569fff4f3ac1df80804a52e6eb91",
    ("detail", "heldout", 0, 64): "e08d4deb29bd2cd183c6ca0bc34139243a2d7ae37de5e8cd17eb919c584aaa2d",
    ("detail", "train", 3, 32): "e6cf132614c415c7fae5e9d88acee5623c4ff737190cd3dfe009148c65541c3e",
    ("generate", "train", 0, 64): "c1c9586ec995901cb28123874331f3da31c11e751894a7d19eadcfbc099a9871",
    ("generate", "heldout", 0, 64): "608b65324581730af9a6f3b13fefb0fe45fd874e5386174bcd74238bb793b25b",
    ("generate", "train", 3, 32): "44ca66b596501659ae62e50a380d448597ec2be087e3a0602b12a688c078fe95",
    ("generate-joint", "train", 0, 64): "52e2d6ec71fb7c7507fac232fa6c256b43f4a87fa48ed41480545a738bc2f176",
    ("generate-joint", "heldout", 0, 64): "e3dd58c8acd88ac93c94fc96f253a82b27eaef422fe353744701c79447bf660a",
    ("generate-joint", "train", 3, 32): "7bed70272bbcda8d59f9161ab232e52725ef5fb7df57dfa7a7875a6246928ea7",
    ("preference", "train", 0, 64): "5f37b2a445d597586d779295edb61c98b70b6739a22d62a67b33593a3f864102",
    ("preference", "heldout", 0, 64): "79e66ec38a2cbada17ccc8420091d10a447217f211776f43d5b7179905d1965f",
    ("preference", "train", 3, 32): "b5420be41d4f6b01f1203e5dbde995250fcc0c403a830957d6fca63cfe627b1b",
    ("swatch-preference", "train", 0, 64): "0628d091893a8cdfaffe2cfde6216c918e75d9cbbdcdae7483f65db62d77329e",
    ("swatch-preference", "heldout", 0, 64): "bb721be3fd93fa43750feb393a64c727adbe9a7cc5078163936c566f0ee96aee",
    ("swatch-preference", "train", 3, 32): "355341864e33419a19a0ae9ad76b8107f12c3c86e364b5609f734914b56de7da",
    ("multi-image", "train", 0, 64): "467e3eb891dc422f65ec8f4e6ef501423628a7dbb451b13733a71d459a4f78f7",
    ("multi-image", "heldout", 0, 64): "304a54f7119413cd12c67b26d4dc3e17617224c70886435b989007fcde907c63",
    ("multi-image", "train", 3, 32): "3c2b156bff6a9879e9414b2620d53f3ca4592a7ddac7dd8d3fc29afa4721d3f9",
    ("video-order", "train", 0, 64): "fbda6516e51774dc7ff9fd4f71177673cc1e2f7fe363e3f2cd6adef4c4b44ec4",
    ("video-order", "heldout", 0, 64): "c6f28d197756b5f7adc12bb4bf2ebb210c9d8b56b0a4f4b9aa445f6e19cd1572",
    ("video-order", "train", 3, 32): "5a5c8c07b3431441deb2ab607c15607e0497574f529ac2721b28e1ac5ffd2081",
    ("count-compare", "train", 0, 64): "f0b3aa2ffc94eab1e7127dda96452a8c8f915825221e46bfa83de39213e5dd7c",
    ("count-compare", "heldout", 0, 64): "6925e5b18c7a98d643b290c5b180e61f67adce955be669b4a50c6c519688fa26",
    ("count-compare", "train", 3, 32): "b13db12fde489497b2c941f2c8539fde0352b2eef87ed138f34c325ad6120322",
}


def _pixels(image) -> list:
    """An image as what it shows (mode, size, pixel bytes): PNG bytes depend on the zlib build, pixels do not."""
    if image is None:
        return None
    return [image.mode, list(image.size), hashlib.sha256(np.asarray(image).tobytes()).hexdigest()]


def _cell(column: str, value):
    if column == "images":
        return [_pixels(image) for image in value]
    if column == "videos":
        return [[_pixels(frame) for frame in clip] for clip in value]
    if column == "generation_image":
        return _pixels(value)
    if column == "audio":
        clips = [(np.asarray(clip["array"], dtype=np.float32), clip["sampling_rate"]) for clip in value]
        return [[hashlib.sha256(array.tobytes()).hexdigest(), rate] for array, rate in clips]
    return value


def _fingerprint(dataset) -> str:
    rows = [{column: _cell(column, value) for column, value in sorted(row.items())} for row in dataset]
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("task, split, seed, size", sorted(PINNED))
def test_every_task_makes_the_rows_it_made_before_the_registry(task, split, seed, size):
    digest = _fingerprint(make_dataset(task, n=16, split=split, seed=seed, image_size=size))
    assert digest == PINNED[task, split, seed, size]


def test_every_registered_task_is_pinned():
    assert set(SYNTHETIC_TASKS) == {task for task, *_ in PINNED}
