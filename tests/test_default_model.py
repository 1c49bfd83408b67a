"""sparsellm.default_model's cache: converted once, published whole, by one process at a time.
The conversion itself (transformers' GGUF loader, ~30 s) is replaced by a stand-in here."""
import os
import threading
import time

import pytest

from sparsellm import default_model


def fake_conversion(monkeypatch, tmp_path, seconds=0.0):
    """Point the cache at ``tmp_path`` and replace the GGUF conversion by one that takes
    ``seconds`` and writes the two files the cache is recognised by; the list of its calls."""
    monkeypatch.setenv("SPARSELLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default_model, "gguf_path", lambda: tmp_path / default_model.GGUF_FILE)
    calls = []

    def convert(source, target):
        calls.append(target)
        time.sleep(seconds)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_bytes(b"weights")
        return target

    monkeypatch.setattr(default_model, "_convert", convert)
    return calls


def test_a_present_cache_is_used_without_converting(monkeypatch, tmp_path, capsys):
    calls = fake_conversion(monkeypatch, tmp_path)
    first = default_model.cached_model_dir(progress=False)
    # the one-time conversion says what it does (only its bars did: "Writing model shards", on a
    # run that saves nothing)
    assert "converting the default model" in capsys.readouterr().err
    assert default_model.cached_model_dir(progress=False) == first
    assert calls == [first] and capsys.readouterr().err == ""


def test_conversions_at_the_same_time_convert_once(monkeypatch, tmp_path):
    """Two runs that find no cache at once: the second waits for the first's conversion and uses
    it (both converted before, and the later one deleted the folder the first had published)."""
    calls = fake_conversion(monkeypatch, tmp_path, seconds=0.5)
    results = []
    runs = [threading.Thread(target=lambda: results.append(default_model.cached_model_dir(progress=False)))
            for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    target = tmp_path / "cache" / default_model.CACHE_NAME
    assert results == [target, target]
    assert calls == [target]


@pytest.mark.parametrize("umask, readable", [(0o022, True), (0o077, False)])
def test_the_converted_cache_is_readable_by_all(umask, readable, monkeypatch, tmp_path):
    """The published folder and every file in it have an ordinary folder's modes: world-readable
    under the usual umask (safetensors writes model.safetensors 0600, which left a shared cache
    that looked complete to another user and that they could not read), private under a umask
    that says so. The GGUF loading is replaced by a tiny LLaMA."""
    import transformers
    from helpers import tiny_llama

    class Tokenizer:
        def save_pretrained(self, folder):
            (folder / "tokenizer.json").write_text("{}")

    model = tiny_llama()
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Tokenizer())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: model.config)
    before = os.umask(umask)
    try:
        target = default_model._convert(tmp_path / default_model.GGUF_FILE,
                                        tmp_path / "cache" / default_model.CACHE_NAME)
    finally:
        os.umask(before)
    assert {p.name for p in target.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    for path in [target, *target.iterdir()]:
        assert (path.stat().st_mode & 0o044 == 0o044) == readable, (path.name, oct(path.stat().st_mode))
        assert path.stat().st_mode & 0o600 == 0o600  # the owner's, always
    assert [p.name for p in target.parent.iterdir()] == [default_model.CACHE_NAME]  # no staging left


def test_a_killed_conversions_staging_folder_is_removed(monkeypatch, tmp_path):
    """A conversion killed while writing (SIGKILL, out of memory) leaves its staging folder, a
    part of the weights; the next conversion removes it (it stayed, one more per kill)."""
    calls = fake_conversion(monkeypatch, tmp_path)
    dead = tmp_path / "cache" / (default_model.CACHE_NAME + ".k1ll3d")
    dead.mkdir(parents=True)
    (dead / "model.safetensors").write_bytes(b"half the weights")
    target = default_model.cached_model_dir(progress=False)
    assert calls == [target] and not dead.exists()
    assert (target / "model.safetensors").read_bytes() == b"weights"
