"""What several `mmllm` commands share: the user mistakes that end as one line, model folders, images and the
`--quantization` option."""

import argparse
from pathlib import Path

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, OSError)


def load_folder(folder: str, quantization: str | None = None):
    """A saved model folder and its processor (quantized with `--quantization`), or a clear error when the folder
    is not one."""
    from ..serving.quantization import load_for_inference

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json).")
    return load_for_inference(path, quantization)


def check_model_source(model: str) -> None:
    """A model folder or a Hub id (namespace/name), or a clear error."""
    if not (Path(model).is_dir() or (model.count("/") == 1 and not Path(model).exists())):
        raise FileNotFoundError(f"{model} is neither a model folder nor a Hub id (namespace/name).")


def open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise FileNotFoundError(f"No image file {path}.")
    try:
        return Image.open(path).convert("RGB")
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not an image PIL can read.") from None


def quantization_option(command: argparse.ArgumentParser) -> None:
    from ..serving.quantization import QUANTIZATIONS

    command.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        help="quantize the linear layers' weights to int8 as they load (torchao; the README's benchmark has the "
        "memory and the logit error); int4 is refused on a CPU, with the reason",
    )
