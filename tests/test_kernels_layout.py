"""The top-level kernels/ folder must not shadow (or break) another package named ``kernels``.

transformers probes for Hugging Face's optional ``kernels`` package with find_spec and imports
what it finds; run from the repository root, a kernels/ folder holding an ``__init__.py`` would
be that package. kernels/ is therefore at most a namespace portion, which an installed
``kernels`` always outranks and which transformers reports as absent. Each check runs a fresh
interpreter in the repository root, as a user's command would.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import tiny_llama

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, *, pythonpath: Path | None = None, timeout: int = 120, **env_extra) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    env.update(env_extra)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(layers=1).save_pretrained(folder)
    return str(folder)


LOAD = """
import sys
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained({folder!r})
print("file", getattr(sys.modules.get("kernels"), "__file__", None))
print("sparsellm imported", "sparsellm" in sys.modules)
"""


def test_from_pretrained_works_from_the_repository_root(saved_model):
    out = _python(LOAD.format(folder=saved_model) + """
from transformers.utils.import_utils import is_kernels_available
print("hf kernels", is_kernels_available())
""")
    # nothing of ours was imported as "kernels" (a namespace portion has no __file__)
    assert "file None" in out and "sparsellm imported False" in out and "hf kernels False" in out


def test_an_installed_kernels_package_wins(tmp_path):
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text('__version__ = "0.12.0"\n')
    out = _python("""
import kernels
print(kernels.__file__, kernels.__version__)
""", pythonpath=tmp_path)
    assert out.split() == [str(fake / "__init__.py"), "0.12.0"]


def test_without_triton(saved_model, tmp_path):
    hidden = tmp_path / "triton"
    hidden.mkdir()
    (hidden / "__init__.py").write_text('raise ImportError("triton is hidden by this test")\n')
    out = _python(LOAD.format(folder=saved_model) + """
from sparsellm import ops
print("triton available", ops.available("triton", "cpu"))
print("error", ops._load_errors.get("triton"))
""", pythonpath=tmp_path, TRITON_INTERPRET="1")
    assert "file None" in out and "triton available False" in out
    assert "triton is hidden by this test" in out


def test_python_m_pytest_collects_from_the_repository_root():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider",
                           "tests/test_sparsity.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
