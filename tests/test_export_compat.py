"""Checkpoint compatibility of sparsellm.export: with the compressed-tensors library, with the
checkpoints earlier versions wrote (tests/data/export_v1), and without the optional
``compressed`` extra (the library simulated missing through ``sys.modules``)."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
import transformers  # a hard dependency: its absence is an error, not a skip

from helpers import tiny_llama
from sparsellm import api
from sparsellm.cli import main as cli_main
from sparsellm.config import PruneConfig
from sparsellm.export import ExportError, load_pruned, save_pruned
from test_export import assert_same_model, bits_equal, prune_, targeted

V1 = Path(__file__).parent / "data" / "export_v1"
EXTRA = r'pip install "sparsellm\[compressed\]"'


@pytest.fixture
def without_library(monkeypatch):
    """compressed-tensors cannot be imported (as if the extra were not installed)."""
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)


def pruned_llama(negative_zero=True):
    model = prune_(tiny_llama(seed=0), "unstructured", 0.7)
    if negative_zero:  # bitwise distinct from +0.0: must come back as -0.0
        with torch.no_grad():
            row = model.model.layers[0].mlp.up_proj.weight[0]
            row[row == 0] = -0.0
    return model


def saved(tmp_path, model, fmt="compressed", name="ckpt"):
    return save_pruned(model, None, tmp_path / name, sparsity_structure="unstructured", save_format=fmt)


# ---------------------------------------------------------------------------------- the library reads it

def test_layout_matches_the_library(tmp_path):
    """Runs with any compressed-tensors: the sparsity_config block is the library's own schema
    and every compressed weight decodes, through the library's unpack_bitmasks, bit for bit."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.config import SparsityCompressionConfig
    from compressed_tensors.utils import unpack_bitmasks

    model = pruned_llama()
    out = saved(tmp_path, model)
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["version"] == ct.__version__
    sc = qc["sparsity_config"]
    parsed = SparsityCompressionConfig.load_from_registry(sc["format"], **sc)
    assert type(parsed).__name__ == "BitmaskConfig" and parsed.model_dump() == sc
    stored = load_file(str(out / "model.safetensors"))
    for name, lin in targeted(model).items():
        shape = stored[f"{name}.shape"].tolist()
        values = stored[f"{name}.compressed"]
        dense = torch.zeros(shape, dtype=values.dtype)
        dense[unpack_bitmasks(stored[f"{name}.bitmask"], shape)] = values
        assert bits_equal(dense, lin.weight), name


def _legacy_model_compressor():
    """ModelCompressor of a compressed-tensors release that still has BitmaskCompressor."""
    ct = pytest.importorskip("compressed_tensors")
    try:
        from compressed_tensors.compressors import BitmaskCompressor, ModelCompressor  # noqa: F401
    except ImportError:
        pytest.skip(f"compressed-tensors {ct.__version__} has no sparse-bitmask compressor (removed in 0.15; "
                    "the releases that have it need transformers<5)")
    return ModelCompressor


@pytest.mark.parametrize("negative_zero", [False, True])
def test_library_decompresses_our_checkpoint(tmp_path, negative_zero):
    """The library's own load path (ModelCompressor.from_pretrained + decompress) restores the
    exact weights; without -0.0 the library's compressor writes the very same tensors."""
    ModelCompressor = _legacy_model_compressor()
    model = pruned_llama(negative_zero)
    out = saved(tmp_path, model)
    compressor = ModelCompressor.from_pretrained(str(out))
    assert compressor.sparsity_config.format == "sparse-bitmask"
    fresh = tiny_llama(seed=1)
    compressor.decompress(str(out), fresh)
    assert_same_model(model, fresh)
    if not negative_zero:  # the library stores -0.0 as a zero (+0.0 on decompression); we keep it
        ours = load_file(str(out / "model.safetensors"))
        theirs = compressor.sparsity_compressor.compress(
            {f"{n}.weight": m.weight.detach() for n, m in targeted(model).items()})
        assert theirs.keys() <= ours.keys()
        for key, tensor in theirs.items():
            assert bits_equal(tensor.to(ours[key].dtype), ours[key]), key


# ---------------------------------------------------------------------------------- earlier checkpoints

def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("fmt", ["dense", "compressed"])
def test_reads_version_1_checkpoints(tmp_path, fmt, without_library):
    """Checkpoints the pre-package export.py wrote (see tests/data/export_v1/README.md) load bit
    for bit, without the extra, and re-save in the current layout."""
    cfg = json.loads((V1 / fmt / "config.json").read_text())
    assert cfg["sparsellm_export"]["version"] == 1 and "quantization_config" not in cfg
    assert cfg["sparsity_config"]["format"] == {"dense": "dense", "compressed": "sparse-bitmask"}[fmt]
    expected = json.loads((V1 / "expected_sha256.json").read_text())
    model, tok = load_pruned(V1 / fmt)
    assert {k: _sha256(v) for k, v in model.state_dict().items()} == expected
    assert torch.signbit(model.model.layers[0].mlp.up_proj.weight[0]).any()  # its -0.0 survived
    assert model.config.sparsity_config["sparsity_structure"] == "2:4"
    assert model.config.sparsity_config["format"] == "dense"
    assert tok("the cat sat")["input_ids"] == [2, 3, 4]
    out = save_pruned(model, tok, tmp_path / "v2", sparsity_structure="2:4")
    assert_same_model(model, load_pruned(out)[0])


# ---------------------------------------------------------------------------------- the optional extra

def test_compressed_save_needs_the_extra(tmp_path, without_library):
    with pytest.raises(ExportError, match=EXTRA):
        saved(tmp_path, pruned_llama())
    assert list(tmp_path.iterdir()) == []


def test_run_and_cli_fail_before_any_work_without_the_extra(tmp_path, monkeypatch, capsys, without_library):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the missing extra was reported")
    monkeypatch.setattr(api, "load_model", never)
    with pytest.raises(ExportError, match=EXTRA):
        api.run(PruneConfig(save=str(tmp_path / "out"), save_format="compressed"))
    assert cli_main(["--save", str(tmp_path / "out"), "--save-format", "compressed"]) == 2
    assert "sparsellm[compressed]" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("library", ["absent", "present"])
def test_dense_save_is_a_plain_checkpoint(tmp_path, monkeypatch, library):
    """A dense save needs no extra and a plain from_pretrained reads it as an ordinary model:
    no quantization_config, so transformers' compressed-tensors quantizer never wakes."""
    if library == "absent":
        monkeypatch.setitem(sys.modules, "compressed_tensors", None)
    else:
        pytest.importorskip("compressed_tensors")
    model = pruned_llama()
    out = saved(tmp_path, model, "dense")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["sparsity_config"]["format"] == "dense"
    plain = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert getattr(plain, "hf_quantizer", None) is None
    assert_same_model(model, plain)


@pytest.mark.parametrize("library", ["absent", "present"])
def test_plain_from_pretrained_of_a_compressed_save(tmp_path, monkeypatch, library):
    """What the README says a plain from_pretrained does with a compressed save: with the library
    the pruned weights are missing (initialised at random), without it an ImportError."""
    from transformers.utils import import_utils

    pytest.importorskip("compressed_tensors")
    out = saved(tmp_path, pruned_llama())
    if library == "absent":
        # transformers caches whether the library is there: cleared so that this test, and the
        # tests after it, see the library as it is
        available = import_utils.is_compressed_tensors_available
        available.cache_clear()
        try:
            with monkeypatch.context() as patch:
                patch.setitem(sys.modules, "compressed_tensors", None)
                with pytest.raises(ImportError, match="compressed-tensors"):
                    transformers.AutoModelForCausalLM.from_pretrained(out)
        finally:
            available.cache_clear()
        return
    _, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert {f"{n}.weight" for n in targeted(pruned_llama())} <= set(info["missing_keys"])


def test_compressed_load_needs_no_extra(tmp_path, monkeypatch):
    pytest.importorskip("compressed_tensors")
    model = pruned_llama()
    out = saved(tmp_path, model)
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)
    loaded, _ = load_pruned(out)
    assert_same_model(model, loaded)
    assert not hasattr(loaded.config, "quantization_config")


def test_sharded_checkpoint_round_trip(tmp_path):
    """save_pretrained's shards keep their names; the index lists the compressed keys."""
    from sparsellm.export.compressed import compress_checkpoint, read_compressed

    model = pruned_llama()
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    targets = {f"{n}.weight" for n in targeted(model)}
    compress_checkpoint(tmp_path, targets)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == shards
    assert {f"{n}.bitmask" for n in targeted(model)} <= index["weight_map"].keys()
    assert not targets & index["weight_map"].keys()
    state, stored = read_compressed(tmp_path)
    assert stored == targets
    want = model.state_dict()
    assert state.keys() == want.keys() and all(bits_equal(state[k], want[k]) for k in want)
