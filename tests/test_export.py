"""sparsellm.export: sparse checkpoints (dense / sparse-bitmask) and sparse kernels (CSR, 2:4).

Models are tiny random LLaMA / OPT built offline from configs; "pruned" weights come from
zeroing random masks (unstructured, 2:4, 3:4) in the decoder-layer linears.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
import transformers  # a hard dependency: its absence is an error, not a skip

from sparsellm import export as ex
from sparsellm.export import (CheckpointError, CSRLinear, ExportError, apply_export, load_pruned, save_pruned,
                              semi_structured_eligible, to_csr, to_semi_structured)
from sparsellm.export import semi_structured as semi_structured_module


# ---------------------------------------------------------------------------------- helpers

def tiny_llama(dtype=torch.float32, hidden=64, inter=128):
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_opt():
    # word_embed_proj_dim != hidden_size adds project_in/out linears outside the decoder layers,
    # which must stay dense; OPT also ties lm_head to the embeddings.
    cfg = transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                 vocab_size=128, max_position_embeddings=64, word_embed_proj_dim=32)
    model = transformers.OPTForCausalLM(cfg).eval()
    with torch.no_grad():  # OPT initialises biases to zero; make them matter
        for mod in model.modules():
            if isinstance(mod, nn.Linear) and mod.bias is not None:
                mod.bias.normal_(0, 0.02)
    return model


MODELS = {"llama": tiny_llama, "opt": tiny_opt}


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "[PAD]", "the", "cat", "sat", "on", "a", "mat", "sparse", "model"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def targeted(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


def prune_mask(shape, structure, fraction, gen):
    """"unstructured": a random ``fraction`` of entries; "N:M": exactly N random entries in
    every group of M along the input dimension."""
    if structure == "unstructured":
        return torch.rand(shape, generator=gen) < fraction
    n, m = (int(v) for v in structure.split(":"))
    rows, cols = shape
    order = torch.rand(rows, cols // m, m, generator=gen).argsort(-1)
    mask = torch.zeros(rows, cols // m, m, dtype=torch.bool)
    mask.scatter_(-1, order[..., :n], True)
    return mask.reshape(rows, cols)


def prune_(model, structure, fraction=0.7, seed=0):
    """Zero random masks in the targeted linears."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in targeted(model).values():
            lin.weight.masked_fill_(prune_mask(lin.weight.shape, structure, fraction, gen).to(lin.weight.device), 0)
    return model


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().cpu().contiguous().view(torch.uint8), b.detach().cpu().contiguous().view(torch.uint8))


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert bits_equal(sa[k], sb[k]), k


def sparsity_config(out: Path) -> dict:
    """The saved block: nested in quantization_config (compressed) or at the top level (dense)."""
    cfg = json.loads((out / "config.json").read_text())
    return cfg["quantization_config"]["sparsity_config"] if "quantization_config" in cfg else cfg["sparsity_config"]


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def leftovers(parent: Path, name: str) -> list[str]:
    """Staging / backup siblings a save may have left behind."""
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def ids(model):
    return torch.arange(1, 17).reshape(2, 8) % model.config.vocab_size


# ---------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("structure", ["unstructured", "2:4", "3:4"])
@pytest.mark.parametrize("save_format", ["dense", "compressed"])
def test_round_trip_bit_for_bit(tmp_path, family, structure, save_format):
    torch.manual_seed(0)
    model = prune_(MODELS[family](), structure)
    tok = tiny_tokenizer()
    out = save_pruned(model, tok, tmp_path / "ckpt", sparsity_structure=structure, save_format=save_format,
                      extra={"method": "test"})
    cfg = json.loads((out / "config.json").read_text())
    # an ordinary folder that others can read (safetensors writes its files 0600)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {p.name: "0o644" for p in out.iterdir()}
    sc = sparsity_config(out)
    assert sc["format"] == ("dense" if save_format == "dense" else "sparse-bitmask")
    assert sc["sparsity_structure"] == structure
    weights = [m.weight for m in targeted(model).values()]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert sc["global_sparsity"] == pytest.approx(zeros, abs=1e-12)
    expected = {"unstructured": 0.7, "2:4": 0.5, "3:4": 0.75}[structure]
    assert abs(sc["global_sparsity"] - expected) < 0.05
    assert sc["targets"] == ["Linear"]
    assert "lm_head" in sc["ignore"]
    if family == "opt":
        assert {"model.decoder.project_in", "model.decoder.project_out"} <= set(sc["ignore"])
    assert cfg["sparsellm_export"]["extra"] == {"method": "test"}
    if save_format == "compressed":  # the compressed-tensors layout: module keys, save_pretrained's file name
        assert cfg["quantization_config"]["quant_method"] == "compressed-tensors" and "sparsity_config" not in cfg
        stored = load_file(str(out / "model.safetensors"))
        compressed = {k[: -len(".bitmask")] for k in stored if k.endswith(".bitmask")}
        assert compressed == set(targeted(model))
        assert not any(f"{n}.weight" in stored for n in targeted(model))
    else:  # an ordinary checkpoint: nothing that would wake transformers' compressed-tensors quantizer
        assert "quantization_config" not in cfg

    loaded, tok2 = load_pruned(out)
    assert type(loaded) is type(model)
    assert_same_model(model, loaded)
    with torch.no_grad():
        assert torch.equal(model(ids(model)).logits, loaded(ids(loaded)).logits)
    assert tok2("the cat sat")["input_ids"] == tok("the cat sat")["input_ids"]
    assert loaded.config.sparsity_config == {**sc, "format": "dense"}  # describes the model in memory
    assert not hasattr(loaded.config, "quantization_config")


@pytest.mark.parametrize("umask, folder, file", [(0o077, "0o700", "0o600"), (0o027, "0o750", "0o640")],
                         ids=["077", "027"])
def test_the_files_follow_the_umask(tmp_path, umask, folder, file):
    """Ordinary files and folders, as the user's umask makes them: a fixed 0644 / 0755 made a
    private user's checkpoint readable by all."""
    model = prune_(tiny_llama(), "unstructured")
    old = os.umask(umask)
    try:
        out = save_pruned(model, tiny_tokenizer(), tmp_path / "ckpt", sparsity_structure="unstructured")
    finally:
        os.umask(old)
    assert oct(out.stat().st_mode & 0o777) == folder
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {p.name: file for p in out.iterdir()}


@pytest.mark.parametrize("save_format", ["dense", "compressed"])
def test_keeps_bf16_and_negative_zero(tmp_path, save_format):
    model = prune_(tiny_llama(torch.bfloat16), "unstructured", 0.8)
    lin = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        lin.weight[0, :8] = -0.0  # equal to 0, differs bitwise: must survive
    out = save_pruned(model, None, tmp_path / "c", sparsity_structure="unstructured", save_format=save_format)
    loaded, tok = load_pruned(out)
    assert tok is None
    assert loaded.dtype == torch.bfloat16
    assert torch.signbit(loaded.model.layers[0].mlp.up_proj.weight[0, :8]).all()
    assert_same_model(model, loaded)


def test_compressed_smaller_and_shrinks_with_sparsity(tmp_path):
    sizes = {}
    for frac in (0.5, 0.9):
        torch.manual_seed(0)
        model = prune_(tiny_llama(hidden=128, inter=256), "unstructured", frac)
        for fmt in ("dense", "compressed"):
            out = save_pruned(model, None, tmp_path / f"{fmt}{frac}", sparsity_structure="unstructured", save_format=fmt)
            sizes[fmt, frac] = dir_size(out)
    assert sizes["compressed", 0.5] < sizes["dense", 0.5]
    assert sizes["compressed", 0.9] < sizes["compressed", 0.5]
    assert sizes["dense", 0.9] >= 3 * sizes["compressed", 0.9]


def test_bitmask_layout_matches_numpy_packbits():
    import numpy as np

    torch.manual_seed(1)
    w = torch.randn(5, 21)
    w[torch.rand(5, 21) < 0.6] = 0
    parts = ex.compress_bitmask(w)
    want = np.packbits((w != 0).numpy(), axis=-1, bitorder="little")
    assert np.array_equal(parts["bitmask"].numpy(), want)
    assert torch.equal(parts["compressed"], w[w != 0])
    assert parts["row_offsets"].tolist() == [0] + torch.cumsum((w != 0).sum(1), 0)[:-1].tolist()
    assert torch.equal(ex.decompress_bitmask(parts), w)


def test_targets_and_ignore(tmp_path):
    model = prune_(tiny_llama(), "unstructured")
    with torch.no_grad():  # an ignored layer may be dense; it must not count towards global_sparsity
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.normal_()
    out = save_pruned(model, None, tmp_path / "c", sparsity_structure="unstructured", save_format="compressed",
                      ignore=["re:.*down_proj"])
    sc = sparsity_config(out)
    assert sc["ignore"][0] == "re:.*down_proj" and "lm_head" in sc["ignore"]
    assert 0.65 < sc["global_sparsity"] < 0.75
    stored = load_file(str(out / "model.safetensors"))
    assert "model.layers.0.mlp.down_proj.weight" in stored
    assert "model.layers.0.mlp.up_proj.bitmask" in stored
    loaded, _ = load_pruned(out)
    assert_same_model(model, loaded)
    with pytest.raises(ExportError, match="matches no nn.Linear"):
        save_pruned(model, None, tmp_path / "x", sparsity_structure="unstructured", targets=["q_projj"])


@pytest.mark.parametrize("save_format", ["dense", "compressed"])
def test_generation_config_round_trips(tmp_path, save_format):
    """An instruct model's stop tokens and sampling defaults (generation_config.json) come back
    with the model in either layout; from a state dict transformers would not read them, and
    generate() would run past the end-of-turn token."""
    model = prune_(tiny_llama(), "2:4")
    model.generation_config = transformers.GenerationConfig(bos_token_id=1, eos_token_id=[2, 7], do_sample=True,
                                                            temperature=0.6, top_p=0.9)
    out = save_pruned(model, None, tmp_path / "ckpt", sparsity_structure="2:4", save_format=save_format)
    loaded, _ = load_pruned(out)
    got = loaded.generation_config
    assert (got.eos_token_id, got.do_sample, got.temperature, got.top_p) == ([2, 7], True, 0.6, 0.9)


def test_compressed_refuses_a_tied_target_before_writing(tmp_path):
    """OPT's lm_head is the embedding matrix, stored once under the embedding's name: the
    compressed layout cannot hold it as lm_head, which is said up front, nothing written."""
    model = tiny_opt()
    with torch.no_grad():
        model.lm_head.weight.masked_fill_(model.lm_head.weight.abs() < 0.01, 0)
    with pytest.raises(ExportError, match="lm_head.weight is tied to model.decoder.embed_tokens.weight"):
        save_pruned(model, None, tmp_path / "ckpt", sparsity_structure="unstructured", save_format="compressed",
                    targets=["lm_head"])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- bad input

def test_refuses_non_empty_dir_and_leaves_it_alone(tmp_path):
    model = prune_(tiny_llama(), "2:4")
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        save_pruned(model, None, target, sparsity_structure="2:4")
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert leftovers(tmp_path, "ckpt") == []
    # an empty directory is fine without overwrite
    empty = tmp_path / "empty"
    empty.mkdir()
    save_pruned(model, None, empty, sparsity_structure="2:4")
    assert (empty / "model.safetensors").is_file()


def test_overwrite_replaces_whole_directory(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "config.json").write_text("{}")  # an earlier model's folder
    (target / "stale.bin").write_bytes(b"old")
    model = prune_(tiny_llama(), "unstructured")
    save_pruned(model, None, target, sparsity_structure="unstructured", save_format="compressed", overwrite=True)
    assert not (target / "stale.bin").exists()
    assert leftovers(tmp_path, "ckpt") == []
    assert_same_model(model, load_pruned(target)[0])


def test_overwrite_through_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "stale.bin").write_bytes(b"old")
    (tmp_path / "link").symlink_to(target)
    model = prune_(tiny_llama(), "unstructured")
    save_pruned(model, None, tmp_path / "link", sparsity_structure="unstructured", overwrite=True)
    assert (tmp_path / "link").is_symlink() and not (target / "stale.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no backup or staging left
    assert_same_model(model, load_pruned(tmp_path / "link")[0])


def test_overwrite_replaces_only_a_model_folder(tmp_path, monkeypatch):
    """overwrite deletes the folder's whole contents: a folder that is not a saved model (no
    config.json), or one holding the working folder or the home folder, is refused untouched."""
    model = prune_(tiny_llama(), "unstructured")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="holds no config.json"):
        save_pruned(model, None, notes, sparsity_structure="unstructured", overwrite=True)
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "config.json").write_text("{}")
    monkeypatch.chdir(project / "src")
    with pytest.raises(FileExistsError, match="holds the working folder"):
        save_pruned(model, None, project, sparsity_structure="unstructured", overwrite=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(project))
    with pytest.raises(FileExistsError, match="holds the home folder"):
        save_pruned(model, None, project, sparsity_structure="unstructured", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "project"]
    assert [p.name for p in notes.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in project.iterdir()) == ["config.json", "src"]


@pytest.mark.parametrize("given", [".", "absolute"])
def test_an_empty_working_folder_is_refused(tmp_path, monkeypatch, given):
    """The save renames its staging folder onto the output folder: onto an empty working folder
    that left the process (and the shell that ran it) in a deleted folder, the saved files not
    there to be seen."""
    model = prune_(tiny_llama(), "unstructured")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    with pytest.raises(FileExistsError, match="holds the working folder"):
        save_pruned(model, None, "." if given == "." else here, sparsity_structure="unstructured")
    assert Path.cwd().samefile(here) and list(here.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


def test_a_save_that_fails_while_staging_takes_back_the_folders_it_made(tmp_path, monkeypatch):
    """A failure while the checkpoint is staged (here the model's own save) removes the staging
    folder and the parents of the output folder that the save made, not those that were there."""
    model = prune_(tiny_llama(), "unstructured")

    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(type(model), "save_pretrained", fail)
    (tmp_path / "keep").mkdir()
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, None, tmp_path / "new" / "deeper" / "ckpt", sparsity_structure="unstructured")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


def test_load_pruned_of_a_missing_folder_says_so(tmp_path):
    """A mistyped folder was reported as having "no config.json; not a saved model"."""
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pruned(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_pruned(tmp_path)


def test_compressed_resave_of_a_loaded_model_keeps_one_sparsity_block(tmp_path):
    """A model loaded from a dense save carries its block at the top level of its config; the
    compressed save nests it, and must not leave the old one (format "dense") beside it."""
    model = prune_(tiny_llama(), "2:4")
    save_pruned(model, None, tmp_path / "dense", sparsity_structure="2:4")
    loaded, _ = load_pruned(tmp_path / "dense")
    save_pruned(loaded, None, tmp_path / "compressed", sparsity_structure="2:4", save_format="compressed")
    config = json.loads((tmp_path / "compressed" / "config.json").read_text())
    assert "sparsity_config" not in config
    assert config["quantization_config"]["sparsity_config"]["format"] == "sparse-bitmask"
    assert_same_model(model, load_pruned(tmp_path / "compressed")[0])


def test_lying_pattern_is_refused_before_writing(tmp_path):
    model = prune_(tiny_llama(), "unstructured", 0.5)
    with pytest.raises(ExportError, match="do not satisfy the claimed 2:4"):
        save_pruned(model, None, tmp_path / "ckpt", sparsity_structure="2:4")
    assert list(tmp_path.iterdir()) == []
    # 2:4 weights are not 3:4
    model = prune_(tiny_llama(), "2:4")
    with pytest.raises(ExportError, match="3:4"):
        save_pruned(model, None, tmp_path / "ckpt", sparsity_structure="3:4", save_format="compressed")
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_write_leaves_nothing(tmp_path):
    model = prune_(tiny_llama(), "unstructured")

    class Broken:
        def save_pretrained(self, path):
            (Path(path) / "tokenizer.json").write_text("{half")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, Broken(), tmp_path / "new", sparsity_structure="unstructured")
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("{}")  # an earlier model's folder
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, Broken(), old, sparsity_structure="unstructured", save_format="compressed", overwrite=True)
    assert [p.name for p in old.iterdir()] == ["config.json"]
    assert leftovers(tmp_path, "old") == []


@pytest.mark.parametrize("kwargs, match", [
    ({"sparsity_structure": "0.5"}, "unstructured' or N:M"),
    ({"sparsity_structure": "5:4"}, "0 < N < M"),
    ({"sparsity_structure": "2:4", "save_format": "zip"}, "save_format"),
    ({"sparsity_structure": "2:4", "extra": {"x": object()}}, "JSON"),
    ({"sparsity_structure": "2:4", "targets": "Linear"}, "targets must be a list"),
    # a string was read as a list of its characters: nothing ignored, and those recorded as patterns
    ({"sparsity_structure": "2:4", "ignore": "model.layers.0.mlp.down_proj"}, "ignore must be a list"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    model = prune_(tiny_llama(), "2:4")
    with pytest.raises(ExportError, match=match):
        save_pruned(model, None, tmp_path / "ckpt", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_gguf_quantization_config_is_dropped(tmp_path):
    model = prune_(tiny_llama(), "unstructured")
    model.config.quantization_config = {"quant_method": "gguf"}
    # transformers refuses save_pretrained when a non-serialisable quantizer is attached
    fake = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="gguf"))
    model.hf_quantizer = fake
    out = save_pruned(model, None, tmp_path / "ckpt", sparsity_structure="unstructured")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert model.config.quantization_config == {"quant_method": "gguf"} and model.hf_quantizer is fake
    loaded, _ = load_pruned(out)
    assert_same_model(model, loaded)
    model.hf_quantizer = None
    model.config.quantization_config = {"quant_method": "bitsandbytes"}
    with pytest.raises(ExportError, match="quantized \\(bitsandbytes\\)"):
        save_pruned(model, None, tmp_path / "q", sparsity_structure="unstructured")


# ---------------------------------------------------------------------------------- corrupted checkpoints

def _saved(tmp_path, structure="2:4", fmt="compressed", family="llama"):
    model = prune_(MODELS[family](), structure)
    return model, save_pruned(model, None, tmp_path / "ckpt", sparsity_structure=structure, save_format=fmt)


def _edit_tensors(out, fn):
    path = out / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_config(out, fn):
    """``fn(config, sparsity_config)``, wherever the save put the block."""
    cfg = json.loads((out / "config.json").read_text())
    fn(cfg, cfg["quantization_config"]["sparsity_config"] if "quantization_config" in cfg else cfg["sparsity_config"])
    (out / "config.json").write_text(json.dumps(cfg))


KEY = "model.layers.0.mlp.gate_proj"


def test_corrupt_value_count(tmp_path):
    _, out = _saved(tmp_path)
    _edit_tensors(out, lambda t: t.__setitem__(f"{KEY}.compressed", t[f"{KEY}.compressed"][:-1].clone()))
    with pytest.raises(CheckpointError, match="values but the bitmask marks"):
        load_pruned(out)


def test_corrupt_bitmask_bit(tmp_path):
    _, out = _saved(tmp_path)

    def flip(t):
        mask = t[f"{KEY}.bitmask"].clone()
        mask[3, 2] ^= 1 << 5
        t[f"{KEY}.bitmask"] = mask
    _edit_tensors(out, flip)
    with pytest.raises(CheckpointError, match="bitmask"):
        load_pruned(out)


def test_corrupt_shape(tmp_path):
    _, out = _saved(tmp_path)
    # gate_proj is 128x64: record it as 64x128 with a matching bitmask size, so only the
    # comparison with the model built from config.json can catch it
    def reshape(t):
        rows, cols = t[f"{KEY}.shape"].tolist()
        t[f"{KEY}.shape"] = torch.tensor([cols, rows])
        mask = ex.unpack_bitmask(t[f"{KEY}.bitmask"], cols)[:, :cols].reshape(cols, rows)
        t[f"{KEY}.bitmask"] = ex.pack_bitmask(mask)
        counts = mask.sum(1)
        t[f"{KEY}.row_offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)[:-1]])
    _edit_tensors(out, reshape)
    with pytest.raises(CheckpointError, match="disagree with config.json"):
        load_pruned(out)


def test_corrupt_missing_piece_and_file(tmp_path):
    _, out = _saved(tmp_path)
    _edit_tensors(out, lambda t: t.pop(f"{KEY}.row_offsets"))
    with pytest.raises(CheckpointError, match="lacks .row_offsets"):
        load_pruned(out)
    (out / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_pruned(out)


@pytest.mark.parametrize("fmt", ["dense", "compressed"])
def test_tensors_that_do_not_fit_the_config_are_refused(tmp_path, fmt):
    """What from_pretrained only warns about is an error: a missing tensor (it would be random),
    a config with fewer layers (the extra tensors dropped), a damaged file; in both layouts."""
    _, out = _saved(tmp_path, "2:4", fmt)
    original = (out / "model.safetensors").read_bytes()
    _edit_tensors(out, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match="missing_keys.*model.norm.weight"):
        load_pruned(out)
    (out / "model.safetensors").write_bytes(original)
    _edit_config(out, lambda c, sc: c.update(num_hidden_layers=1))
    with pytest.raises(CheckpointError, match="unexpected_keys.*layers.1"):
        load_pruned(out)
    _edit_config(out, lambda c, sc: c.update(num_hidden_layers=2))
    (out / "model.safetensors").write_bytes(original[: len(original) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_pruned(out)


@pytest.mark.parametrize("fmt", ["dense", "compressed"])
def test_config_lies_about_structure_or_sparsity(tmp_path, fmt):
    _, out = _saved(tmp_path, "2:4", fmt)
    _edit_config(out, lambda c, sc: sc.__setitem__("sparsity_structure", "3:4"))
    with pytest.raises(CheckpointError, match="do not satisfy the claimed 3:4"):
        load_pruned(out)
    _edit_config(out, lambda c, sc: sc.update(sparsity_structure="2:4", global_sparsity=0.9))
    with pytest.raises(CheckpointError, match="claims global_sparsity 0.9"):
        load_pruned(out)
    _edit_config(out, lambda c, sc: sc.update(global_sparsity=0.5, format="zip"))
    with pytest.raises(CheckpointError, match="unknown sparsity format"):
        load_pruned(out)
    _edit_config(out, lambda c, sc: c.pop("quantization_config" if fmt == "compressed" else "sparsity_config"))
    with pytest.raises(CheckpointError, match="no sparsity_config"):
        load_pruned(out)


@pytest.mark.parametrize("fmt", ["dense", "compressed"])
def test_loading_in_float16_may_add_zeros(tmp_path, fmt):
    """float32 weights below float16's smallest subnormal become zeros when loaded with
    dtype=float16: the checkpoint is not lying, and the loaded config counts them. A checkpoint
    claiming more zeros than it holds is still refused."""
    model = prune_(tiny_llama(), "2:4")
    weight = model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        for row, col in (weight != 0).nonzero()[:3].tolist():
            weight[row, col] = 1e-8
    out = save_pruned(model, None, tmp_path / "c", sparsity_structure="2:4", save_format=fmt)
    saved = sparsity_config(out)["global_sparsity"]
    loaded, _ = load_pruned(out, dtype=torch.float16)
    assert loaded.dtype == torch.float16
    zeros = sum(int((m.weight == 0).sum()) for m in targeted(loaded).values())
    total = sum(m.weight.numel() for m in targeted(loaded).values())
    assert loaded.config.sparsity_config["global_sparsity"] == zeros / total == saved + 3 / total
    assert_same_model(model, load_pruned(out)[0])  # in its own dtype, nothing changes
    _edit_config(out, lambda c, sc: sc.update(global_sparsity=saved + 10 / total))
    with pytest.raises(CheckpointError, match="claims global_sparsity"):
        load_pruned(out, dtype=torch.float16)


@pytest.mark.parametrize("fmt", ["dense", "compressed"])
def test_a_bad_dtype_is_not_blamed_on_the_checkpoint(tmp_path, fmt):
    """A dtype that is no float type is the caller's mistake: a plain ValueError that says so,
    not a CheckpointError claiming the tensors disagree with config.json."""
    _, out = _saved(tmp_path, "2:4", fmt)
    for bad in ("float17", torch.int8, "Tensor"):
        with pytest.raises(ValueError, match="dtype must be") as info:
            load_pruned(out, dtype=bad)
        assert not isinstance(info.value, CheckpointError)
    assert load_pruned(out, dtype="bfloat16")[0].dtype == torch.bfloat16


def test_compressed_targets_disagree(tmp_path):
    _, out = _saved(tmp_path)
    _edit_config(out, lambda c, sc: sc["ignore"].append("re:.*o_proj"))
    with pytest.raises(CheckpointError, match="do not match the recorded targets"):
        load_pruned(out)


# ---------------------------------------------------------------------------------- CSR

@pytest.mark.parametrize("family", ["llama", "opt"])
def test_csr_matches_dense_masked(family):
    torch.manual_seed(0)
    model = prune_(MODELS[family](), "unstructured", 0.93)
    x = ids(model)
    n_targets = len(targeted(model))
    with torch.no_grad():
        want = model(x).logits
    report = to_csr(model, min_sparsity=0.9)
    assert report["n_converted"] == n_targets == {"llama": 14, "opt": 12}[family]
    assert report["n_dense"] == 0
    assert sum(isinstance(m, CSRLinear) for m in model.modules()) == report["n_converted"]
    assert isinstance(model.lm_head, nn.Linear)  # never targeted
    with torch.no_grad():
        got = model(x).logits
    assert not torch.equal(want, torch.zeros_like(want))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    json.dumps(report)
    with pytest.raises(ExportError, match="before apply_export"):
        save_pruned(model, None, "/nonexistent/never-written", sparsity_structure="unstructured")


def test_csr_threshold_keeps_low_sparsity_dense():
    model = tiny_llama()
    prune_(model, "unstructured", 0.95)
    with torch.no_grad():  # layer 1 only half sparse
        for name, lin in targeted(model).items():
            if ".layers.1." in name:
                lin.weight.normal_().masked_fill_(torch.rand_like(lin.weight) < 0.5, 0)
    report = to_csr(model, min_sparsity=0.9)
    assert all(".layers.0." in n for n in report["converted"])
    assert report["n_converted"] == 7 and report["n_dense"] == 7
    assert all("< 0.9" in r for r in report["dense"].values())
    assert isinstance(model.model.layers[1].mlp.up_proj, nn.Linear)
    assert isinstance(model.model.layers[0].mlp.up_proj, CSRLinear)


def test_export_thresholds_allow_the_pruners_rounding():
    """A weight pruned at exactly the threshold holds floor(share x row) zeros per row (or over
    the weight): 57 of 64 at 90%, 0.8906. It converts; one zero fewer per row does not."""
    def pruned_linear(zeros_per_row):
        gen = torch.Generator().manual_seed(0)
        lin = nn.Linear(64, 48, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(48, 64, generator=gen))
            lin.weight.scatter_(1, torch.rand(48, 64, generator=gen).argsort(dim=1)[:, :zeros_per_row], 0.0)
        return lin

    def csr_report(lin):
        model = nn.Sequential()
        model.add_module("layers", nn.ModuleList([lin]))
        return to_csr(model, min_sparsity=0.9)

    at_threshold = pruned_linear(int(64 * 0.9))
    assert ex.sparse_gpu.choose_format(at_threshold, 0.9)[0] == "sell"
    assert csr_report(at_threshold)["n_converted"] == 1
    below = pruned_linear(56)  # 0.875 < 0.9 - 1/64
    assert ex.sparse_gpu.choose_format(below, 0.9)[0] is None
    report = csr_report(below)
    assert report["n_converted"] == 0 and report["dense"]["layers.0"].startswith("sparsity 0.87500 < 0.9")


def test_csr_linear_bias_and_dtype():
    torch.manual_seed(0)
    lin = nn.Linear(48, 24).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.masked_fill_(torch.rand_like(lin.weight, dtype=torch.float32) < 0.9, 0)
    csr = CSRLinear(lin)
    x = torch.randn(3, 5, 48, dtype=torch.bfloat16)
    y = csr(x)
    assert y.shape == (3, 5, 24) and y.dtype == torch.bfloat16
    ref = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)


def test_csr_linear_copies_casts_and_reloads_like_a_module():
    """The CSR arrays are plain buffers: deepcopy works (torch cannot deep-copy a CSR tensor),
    a model-wide cast leaves a linear that still runs (the product in float32), and a state
    dict loads into a CSRLinear of the same pattern."""
    import copy

    torch.manual_seed(1)
    lin = nn.Linear(40, 16)
    with torch.no_grad():
        lin.weight.masked_fill_(torch.rand_like(lin.weight) < 0.9, 0)
    csr = CSRLinear(lin)
    x = torch.randn(3, 40)
    want = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    y = csr(x)
    assert (y.double() - want).abs().max() < 1e-5
    assert torch.equal(copy.deepcopy(csr)(x), y)
    half = copy.deepcopy(csr).half()
    assert half.values.dtype == torch.float16
    out = half(x.half())
    assert out.dtype == torch.float16 and (out.double() - want).abs().max() < 2e-2
    other = nn.Linear(40, 16)
    with torch.no_grad():
        other.weight.copy_(torch.where(lin.weight == 0, 0.0, torch.randn_like(lin.weight)))
    fresh = CSRLinear(other)
    fresh.load_state_dict(csr.state_dict())
    assert torch.equal(fresh(x), y)


def test_csr_linear_loads_a_state_dict_of_another_pattern():
    """A CSRLinear's value count is its pattern's: a state dict from another pruning of the same
    linear (other nnz) loads, runs as that pruning and reports its sparsity; arrays that are no
    CSR matrix of the module's shape are refused and leave the module as it was."""
    torch.manual_seed(2)
    sparse_lin, denser_lin = nn.Linear(40, 16), nn.Linear(40, 16)
    with torch.no_grad():
        sparse_lin.weight.masked_fill_(torch.rand_like(sparse_lin.weight) < 0.9, 0)
        denser_lin.weight.masked_fill_(torch.rand_like(denser_lin.weight) < 0.6, 0)
    source, target = CSRLinear(sparse_lin), CSRLinear(denser_lin)
    assert source.values.numel() != target.values.numel()
    x = torch.randn(3, 40)
    before = target(x)
    bad = source.state_dict()
    bad["col_indices"] = bad["col_indices"] + 40  # past the last column
    with pytest.raises(RuntimeError, match="not a CSR matrix of shape"):
        target.load_state_dict(bad)
    assert torch.equal(target(x), before) and target.values.numel() != source.values.numel()
    target.load_state_dict(source.state_dict())
    assert torch.equal(target(x), source(x))
    assert target.sparsity == source.sparsity


# ---------------------------------------------------------------------------------- 2:4 semi-structured

def _linear(out_f, in_f, structure, dtype=torch.float16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=True)
    with torch.no_grad():
        lin.weight.masked_fill_(prune_mask(lin.weight.shape, structure, 0.5, gen), 0)
    return lin.to(dtype)


def test_eligibility_pattern_check():
    ok, reason = semi_structured_eligible(_linear(64, 128, "2:4"))
    assert not ok and "CUDA" in reason  # everything but the device is fine
    ok, reason = semi_structured_eligible(_linear(64, 128, "3:4"))  # at most 1 non-zero per 4: a valid 2:4
    assert not ok and "CUDA" in reason
    lin = _linear(64, 128, "2:4")
    with torch.no_grad():
        group = lin.weight[5, 8:12]
        group[group == 0] = 1.0  # a third non-zero that the converter would silently drop
    ok, reason = semi_structured_eligible(lin)
    assert not ok and "not 2:4 sparse: 1 of" in reason
    ok, reason = semi_structured_eligible(_linear(64, 128, "unstructured"))
    assert not ok and "not 2:4" in reason
    ok, reason = semi_structured_eligible(_linear(64, 130, "unstructured"))
    assert not ok and "multiple of 4" in reason


def test_eligibility_shape_and_dtype_check():
    ok, reason = semi_structured_eligible(_linear(40, 128, "2:4"))
    assert not ok and "shape 40x128" in reason
    ok, reason = semi_structured_eligible(_linear(64, 72, "2:4"))
    assert not ok and "shape 64x72" in reason
    ok, reason = semi_structured_eligible(_linear(64, 128, "2:4", dtype=torch.float32))
    assert not ok and "float32" in reason
    ok, reason = semi_structured_eligible(nn.Conv1d(4, 4, 1))
    assert not ok and "not an nn.Linear" in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU report")
def test_semi_structured_on_cpu_reports_and_stays_dense():
    model = prune_(tiny_llama(torch.float16), "2:4")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = apply_export(model, "semi-structured")
    assert report["available"] is False and "no 2:4 semi-structured path on CPU" in report["note"]
    assert report["converted"] == [] and report["n_dense"] == len(targeted(model))
    assert_same_model(SimpleNamespace(state_dict=lambda: before), model)
    json.dumps(report)


def test_semi_structured_verifies_the_converted_weight(monkeypatch):
    """The swap is kept only if a probe product matches the dense one: simulate a converter
    that drops a non-zero (as torch's does for groups with more than 2) on CPU."""
    model = prune_(tiny_llama(), "2:4")
    monkeypatch.setattr(semi_structured_module, "semi_structured_eligible", lambda lin: (True, "ok"))

    def lossy(w):
        out = w.clone()
        if w.shape == (128, 64):  # the MLP up/gate projections: lose their largest weight (one a
            out.view(-1)[out.abs().argmax()] = 0  # probe of 16 tokens cannot miss)
        return out
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lossy)
    report = to_semi_structured(model)
    assert set(report["dense"]) == {f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj")}
    assert all("changed the output" in r for r in report["dense"].values())
    assert report["n_converted"] == 10
    assert bool((model.model.layers[0].mlp.up_proj.weight[0] != 0).sum() == 32)  # untouched


def test_exports_leave_meta_weights_dense_with_a_reason():
    """A linear whose weight is on the meta device (offloaded) has no values to convert: each
    export keeps it dense and says why (was a RuntimeError from .item() on a meta tensor)."""
    for kind in ("csr", "sparse-gpu", "semi-structured"):
        model = prune_(tiny_llama(), "2:4", seed=1)
        lin = model.model.layers[0].mlp.up_proj
        lin.weight = nn.Parameter(lin.weight.detach().to("meta"), requires_grad=False)
        report = apply_export(model, kind)
        assert "meta device" in report["dense"]["model.layers.0.mlp.up_proj"], kind
        assert model.model.layers[0].mlp.up_proj is lin
    assert "meta device" in semi_structured_eligible(lin)[1]
    with pytest.raises(ValueError, match="meta device"):
        ex.SparseGPULinear(lin, "nm24")


def test_apply_export_kinds():
    model = prune_(tiny_llama(), "unstructured", 0.95)
    assert apply_export(model, None)["kind"] is None
    assert all(isinstance(m, nn.Linear) for m in targeted(model).values())
    with pytest.raises(ExportError, match="unknown export kind"):
        apply_export(model, "coo")
    report = apply_export(model, "csr")
    assert report["kind"] == "csr" and report["min_sparsity"] == ex.CSR_MIN_SPARSITY and report["n_converted"] == 14


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
def test_semi_structured_conversion_on_gpu():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 kernels need compute capability >= 8.0")
    torch.manual_seed(0)
    model = prune_(tiny_llama(torch.float16, hidden=128, inter=256), "2:4").cuda()
    layer0 = model.model.layers[0]
    with torch.no_grad():  # one 3:4 layer (valid 2:4) and one with an extra non-zero (invalid)
        w = layer0.mlp.up_proj.weight
        w.view(w.shape[0], -1, 4)[..., 1] = 0
        w.view(w.shape[0], -1, 4)[..., 2] = 0
        w.view(w.shape[0], -1, 4)[..., 3] = 0
        g = layer0.mlp.down_proj.weight[0, :4]
        g[g == 0] = 0.5
    x = ids(model).cuda()
    with torch.no_grad():
        want = model(x).logits.float()
    report = to_semi_structured(model)
    assert report["available"] is True
    assert "model.layers.0.mlp.up_proj" in report["converted"]
    assert "not 2:4" in report["dense"]["model.layers.0.mlp.down_proj"]
    assert report["n_converted"] == len(targeted(model)) - 1
    assert isinstance(model.model.layers[1].self_attn.q_proj.weight, torch.sparse.SparseSemiStructuredTensor)
    with torch.no_grad():
        got = model(x).logits.float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
