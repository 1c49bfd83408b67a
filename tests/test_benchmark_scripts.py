"""Benchmark scripts' bookkeeping, without running a benchmark: the structured table's caption,
the defaults ``--tiny`` lowers, the sparse kernel sweep's refusals and failures, and the
reference loops' results file."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the scripts import each other
import elsa_7b  # noqa: E402
import prune_7b  # noqa: E402
import reference_protocol  # noqa: E402
import sparse_gpu_sweep  # noqa: E402
import structured_quality  # noqa: E402

TOK = ["--tokenizer", "tok", "--calib", "calib.txt"]


def test_structured_caption_comes_from_the_protocol_and_the_dense_entry():
    results = {"protocol": {"nsamples": 8, "seqlen": 128, "eval_windows": 4, "seed": 0}, "dense": 31.234,
               "num_layers": 3, "runs": {}}
    assert structured_quality.caption(results) == (
        "Perplexity on the wiki test part (4 windows of 128 tokens), calibration 8 x 128 tokens, seed 0, all 3 "
        "layers; columns: share of FFN channels removed. Dense: 31.23.")
    # a file from before the layer count was recorded: the runs' per-layer sizes; no dense value: said so
    results = {"protocol": {}, "dense": None, "runs": {"a": {"layer_sizes": {"intermediate_size": [1] * 30}}}}
    assert structured_quality.caption(results) == (
        "Perplexity on the wiki test part (40 windows of 512 tokens), calibration 32 x 512 tokens, seed 0, all 30 "
        "layers; columns: share of FFN channels removed. Dense: not measured.")


def test_a_structured_run_measures_the_dense_value_of_its_protocol(tmp_path, monkeypatch, capsys):
    calls = []

    def dense_ppl(args):
        assert args.float64 is False  # quality.load_model reads it (an AttributeError before)
        calls.append((args.seqlen, args.eval_windows, args.eval, args.cpu))
        return 31.0 + len(calls), 3

    def run_one(method, channels, heads, allocation, args):
        return {"method": method, "channels": channels, "heads": heads, "allocation": allocation, "ppl": 40.0,
                "prune_seconds": 1.0, "layer_sizes": {"intermediate_size": [8] * 3},
                "cost": {"before": {"parameters": 100}, "after": {"parameters": 80}}, "git": None}

    monkeypatch.setattr(structured_quality, "dense_ppl", dense_ppl)
    monkeypatch.setattr(structured_quality, "run_one", run_one)
    out = tmp_path / "s.json"
    common = ["--json", str(out), "--markdown", str(tmp_path / "s.md"), "--methods", "structprune", "--channels", "0.2",
              "--nsamples", "2", "--eval-windows", "2"]
    assert structured_quality.main([*common, "--seqlen", "64"]) == 0
    assert "(2 windows of 64 tokens), calibration 2 x 64 tokens, seed 0, all 3 layers; columns: share of FFN " \
           "channels removed. Dense: 32." in capsys.readouterr().out
    assert structured_quality.main([*common, "--seqlen", "64", "--channels", "0.5"]) == 0  # the same protocol
    assert calls == [(64, 2, "wiki", True)]
    stored = out.read_text()
    with pytest.raises(SystemExit) as refused:  # rows of 64-token windows: not relabelled as 32
        structured_quality.main([*common, "--seqlen", "32"])
    assert refused.value.code == 2 and "seqlen: 64 there, 32 now" in capsys.readouterr().err
    assert out.read_text() == stored and calls == [(64, 2, "wiki", True)]
    other = tmp_path / "other.json"  # another protocol: another file, its own dense value
    assert structured_quality.main([*common, "--seqlen", "32", "--json", str(other)]) == 0
    assert calls[-1] == (32, 2, "wiki", True) and json.loads(other.read_text())["dense"] == 33.0


def test_a_quality_run_of_another_protocol_is_refused(tmp_path, capsys):
    """quality.py's file holds one caption and one dense value for all its rows: a run of other
    windows (or text, or dtype) would relabel the stored rows; it exits 2 before any model loads."""
    import quality

    out = tmp_path / "q.json"
    out.write_text(json.dumps({"protocol": {"model": "smollm2", "nsamples": 32, "seqlen": 512, "eval_windows": 40,
                                            "seed": 0, "machine": "m"}, "dense": 19.6, "num_layers": 30,
                               "runs": {"magnitude|0.5|all": {"ppl": 30.0}}}))
    stored = out.read_text()
    for args in (["--seqlen", "64"], ["--float64"], ["--calib", "c4:/x", "--eval", "c4:/x"]):
        with pytest.raises(SystemExit) as refused:
            quality.main(["--methods", "magnitude", "--settings", "0.5", "--json", str(out),
                          "--markdown", str(tmp_path / "q.md"), *args])
        assert refused.value.code == 2 and "runs of another protocol" in capsys.readouterr().err
    assert out.read_text() == stored


def test_a_structured_run_without_save_models_is_a_valid_config(tmp_path):
    """The runs set --overwrite whether or not they saved: without --save-models (the default) the
    API refused the config, after the dense model had been evaluated."""
    import argparse

    args = argparse.Namespace(save_models=False, nsamples=2, seqlen=64, eval_windows=2, progress=False)
    config = structured_quality.run_config("structprune", 0.2, 0.0, "uniform", args)
    assert config.save is None and not config.overwrite
    config = structured_quality.run_config("structprune", 0.2, 0.25, "energy:3", argparse.Namespace(
        **{**vars(args), "save_models": True}))
    assert config.save and config.overwrite and config.allocation.temperature == 3.0


@pytest.mark.parametrize("script, argv, message", [
    ("interleaved_ratio", ["--methods", "magnitude,magnitude"], "two methods, different ones"),
    ("structprune_memory", ["--widths", "64"], "at least two different widths"),
    ("structprune_memory", ["--widths", "64,64"], "at least two different widths"),
])
def test_benchmark_arguments_that_would_lose_the_results_are_refused(script, argv, message, tmp_path, capsys):
    """Found before anything runs: a same-method pair overwrote one run in the report, a single
    width divided by zero after every run."""
    module = __import__(script)
    with pytest.raises(SystemExit) as refused:
        module.main([*argv, *(["--out", str(tmp_path / "m.json")] if script == "structprune_memory" else [])])
    assert refused.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("script", [prune_7b, elsa_7b])
def test_the_7b_benchmarks_refuse_a_cuda_device_that_is_not_there(script, tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        script.main([*TOK, "--workdir", str(tmp_path)])
    assert refused.value.code == 2 and "no CUDA device here; use --tiny --device cpu" in capsys.readouterr().err


class _Settings(Exception):
    pass


@pytest.mark.parametrize("script, tiny, full", [
    (prune_7b, {"nsamples": 8, "seqlen": 128}, {"nsamples": 64, "seqlen": 2048}),
    (elsa_7b, {"steps": 4, "seqlen": 128, "runs": "plain:float32,fsdp:bfloat16"},
     {"steps": 10, "seqlen": 2048, "runs": "plain:float32,fsdp:float32,fsdp:bfloat16"}),
])
def test_tiny_lowers_the_defaults_not_given(script, tiny, full, monkeypatch, tmp_path, capsys):
    parse_args = prune_7b.parse_args

    def parsed_only(ap, argv):  # the parsed options, before anything runs
        raise _Settings(parse_args(ap, argv))

    monkeypatch.setattr(script, "parse_args", parsed_only)

    def parsed(*argv):
        with pytest.raises(_Settings) as recorded:
            script.main([*TOK, "--workdir", str(tmp_path), *argv])
        return {k: getattr(recorded.value.args[0], k) for k in full}

    assert parsed() == full  # the full-size defaults are unchanged
    assert parsed("--tiny") == tiny == parsed("--shape", "tiny")
    assert parsed("--tiny", "--seqlen", "256") == tiny | {"seqlen": 256}  # a value given is kept
    with pytest.raises(SystemExit):
        script.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "also lowers the defaults of the options not given to " + prune_7b.tiny_text(tiny) in help_text
    assert prune_7b.tiny_text(tiny) == " ".join(f"--{k} {v}" for k, v in tiny.items())


def test_the_sweep_refuses_the_cpu_without_the_interpreter(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "s.json"
    assert sparse_gpu_sweep.main(["--device", "cpu", "--shapes", "128x64", "--quick", "--out", str(out)]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err
    assert not out.exists()


def test_a_sweep_where_every_config_failed_is_not_complete(tmp_path, monkeypatch):
    if not sparse_gpu_sweep.torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")

    def fail(*args, **kwargs):
        raise RuntimeError("no kernel here")

    monkeypatch.setattr(sparse_gpu_sweep.sm, "nm24_linear", fail)
    monkeypatch.setattr(sparse_gpu_sweep.sm, "sell_linear", fail)
    out = tmp_path / "s.json"
    device = "cuda" if sparse_gpu_sweep.torch.cuda.is_available() else "cpu"
    assert sparse_gpu_sweep.main(["--device", device, "--shapes", "128x64", "--quick", "--out", str(out)]) == 1
    meta = json.loads(out.read_text())["meta"]
    assert meta["complete"] is False and meta["configs_ok"] == 0 and meta["configs_failed"] == 8


def test_the_sweep_times_each_token_count_with_its_own_grid(tmp_path, monkeypatch, capsys):
    """--tokens 1,9: rows at both counts, the one-token grid at 1 and the tensor-core grid (with
    its launcher splits) at 9, each checked against dense (the interpreter on a CPU); up to 8
    tokens the candidates are the permute pick on token blocks and the tensor-core default; a
    bad --tokens is refused before anything runs."""
    if not sparse_gpu_sweep.torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    device = "cuda" if sparse_gpu_sweep.torch.cuda.is_available() else "cpu"
    out = tmp_path / "s.json"
    args = ["--device", device, "--shapes", "128x64", "--quick", "--out", str(out), "--formats", "nm24"]
    assert sparse_gpu_sweep.main(args + ["--tokens", "1,0"]) == 2
    assert "--tokens" in capsys.readouterr().err and not out.exists()
    for shapes in ("128x0", "128x64x2", "128"):  # a zero size, three sizes, one: no INxOUT pair
        bad = [a if a != "128x64" else shapes for a in args]
        assert sparse_gpu_sweep.main(bad + ["--tokens", "1"]) == 2
        assert "--shapes takes INxOUT pairs" in capsys.readouterr().err and not out.exists()
    assert sparse_gpu_sweep.main(args + ["--tokens", "1,9"]) == 0
    rows = [r for r in json.loads(out.read_text())["rows"] if r["impl"] == "nm24"]
    assert {r["tokens"] for r in rows} == {1, 9}
    assert all("X_MODE" in r["config"] for r in rows if r["tokens"] == 1)
    assert all("split_k" in r["config"] and r["err"] < 1e-2 for r in rows if r["tokens"] == 9)
    small = sparse_gpu_sweep.configs_for("nm24", 4)
    assert small[-1] == sparse_gpu_sweep.NM24_DOT_DEFAULT and all(c["X_MODE"] == 4 for c in small[:-1])


def test_reference_loops_write_their_numbers_with_commit_settings_and_machine(tmp_path):
    out = tmp_path / "ref.json"
    args = reference_protocol.protocol_parser("", 0.9).parse_args(["--nsamples", "2", "--json", str(out)])
    reference_protocol.write_results(args, {"ppl": 5995.0, "prune_seconds": 1.5})
    written = json.loads(out.read_text())
    assert written["ppl"] == 5995.0 and written["prune_seconds"] == 1.5
    assert len(written["git"]["commit"]) == 40 and "dirty" in written["git"]
    assert written["settings"]["nsamples"] == 2 and written["settings"]["sparsity"] == 0.9
    assert "json" not in written["settings"] and written["machine"]
    args = reference_protocol.protocol_parser("", 0.9).parse_args([])
    reference_protocol.write_results(args, {"ppl": 1.0})  # no --json: nothing written


def test_the_export_table_names_its_commit_and_stores_its_rows(tmp_path, monkeypatch):
    import export_table

    monkeypatch.setattr(export_table, "csr_rows", lambda **kw: [(0.9, 1, 2.0, 0.5)])
    monkeypatch.setattr(export_table, "size_rows", lambda *a, **kw: [
        ("float32", 0.5, 4_000_000, 2_000_000, {"dense": (0.1, 0.2), "compressed": (0.3, 0.4)})])
    out, md = tmp_path / "export.json", tmp_path / "export.md"
    assert export_table.main(["--json", str(out), "--out", str(md)]) == 0
    written = json.loads(out.read_text())
    assert len(written["git"]["commit"]) == 40 and written["machine"] and written["measured"]
    assert written["csr"] == [{"sparsity": 0.9, "tokens": 1, "dense_ms": 2.0, "csr_ms": 0.5}]
    row = written["checkpoint_sizes"][0]["rows"][0]
    assert row["compressed_bytes"] == 2_000_000 and row["load_seconds"] == {"dense": 0.2, "compressed": 0.4}
    text = md.read_text()
    assert f"Commit: {written['git']['commit'][:7]}" in text and "| 90% | 1 | 2.00 | 0.50 | 4.00x |" in text


def test_float64_runs_are_cells_of_their_own():
    import argparse

    import quality

    args = argparse.Namespace(no_sequential=True, product_precision=None, float64=True)
    assert quality.cell_key("sparsegpt", "0.9", None, args).endswith("|non-sequential|float64")
    args.float64 = False
    assert "float64" not in quality.cell_key("sparsegpt", "0.9", None, args)


def test_the_sweep_picks_a_config_table_from_stored_sweeps(tmp_path, capsys):
    """--from stored sweeps --pick: a table that loads, its source taken from the sweeps' meta;
    refusals (no --pick, an unreadable sweep) write nothing."""
    from sparsellm.kernels import sparse_configs

    def row(impl, us, config=None):
        return {"shape": [64, 96], "format": "nm24", "tokens": 1, "dtype": "float16", "impl": impl,
                "config": config, "us": us, "err": 1e-3}

    good = {"BLOCK_N": 8, "BLOCK_K": 1024, "X_MODE": 4, "STREAM": 1, "STAGES": 3, "num_warps": 4}
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"meta": {"device": "NVIDIA H200", "commit": "c0ffee", "torch": "2.11", "complete": True},
                                 "rows": [row("dense", 30.0), row("nm24", 20.0, good),
                                          row("nm24", 25.0, {**good, "X_MODE": 3})]}))
    out = tmp_path / "table.json"
    assert sparse_gpu_sweep.main(["--from", str(sweep)]) == 2 and "--pick" in capsys.readouterr().err
    assert sparse_gpu_sweep.main(["--from", str(tmp_path / "none.json"), "--pick", str(out)]) == 2
    assert not out.exists()
    assert sparse_gpu_sweep.main(["--from", str(sweep), "--pick", str(out)]) == 0
    assert "nm24 float16 64->96: 1" in capsys.readouterr().out
    table = sparse_configs.load(out)
    assert table.config("nm24", "float16", 1, 64, 96) == good
    assert table.max_sparse_tokens("nm24", "float16", 64, 96) == 1
    assert table.source["commit"] == "c0ffee" and table.source["device"] == "NVIDIA H200"
    assert table.source["sweeps"] == [{"path": str(sweep), "commit": "c0ffee", "device": "NVIDIA H200",
                                       "torch": "2.11", "triton": None, "complete": True}]
    assert table.source["complete"] is True and table.source["triton"] is None
    assert sparse_gpu_sweep.main(["--from", str(sweep), "--pick", str(tmp_path / "no" / "t.json")]) == 2
    assert "no/t.json" in capsys.readouterr().err  # an unwritable table: said, no traceback
    assert sparse_gpu_sweep.main(["--from", str(sweep), "--pick", str(out), "--min-speedup", "0"]) == 2


def test_the_cusparselt_benchmark_merges_its_prefill_crossovers_into_a_table(tmp_path, capsys):
    """--from a stored run --pick: prefill entries merged into an existing table (its decode
    entries kept, the same dtype's prefill entries replaced), or a new table; refusals exit 2."""
    import cusparselt_prefill

    from sparsellm.kernels import sparse_configs

    def run(speedup):
        return {"dtype": "fp16", "device": "NVIDIA H200", "commit": "c0ffee", "timer": "do_bench",
                "rows": [{"in": 64, "out": 96, "tokens": t, "dense_ms": 1.0, "ours_ms": 1.0 / speedup,
                          "ours_err": 1e-3, "ref_max_abs": 1.0} for t in (512, 2048)]}

    stored = tmp_path / "cslt.json"
    stored.write_text(json.dumps(run(1.2)))
    table = tmp_path / "table.json"
    decode = {"format": "nm24", "dtype": "float16", "tokens": [1, 1], "shape": None,
              "config": {"BLOCK_N": 8, "BLOCK_K": 1024}}
    table.write_text(json.dumps({"version": 1, "entries": [decode], "prefill": [
        {"format": "nm24", "path": "cusparselt", "dtype": "float16", "shape": None, "min_tokens": 9},
        {"format": "nm24", "path": "cusparselt", "dtype": "bfloat16", "shape": None, "min_tokens": 7}]}))
    assert cusparselt_prefill.main(["--from", str(stored)]) == 2 and "--pick" in capsys.readouterr().err
    assert cusparselt_prefill.main(["--from", str(tmp_path / "none.json"), "--pick", str(table)]) == 2
    assert cusparselt_prefill.main(["--from", str(stored), "--pick", str(table)]) == 0
    assert "nm24 float16 64->96: 512" in capsys.readouterr().out
    merged = sparse_configs.load(table)
    assert merged.entries == [decode] and merged.prefill_min_tokens("nm24", "float16", 64, 96) == 512
    assert merged.prefill_min_tokens("nm24", "float16", 32, 32) == 512  # the any-shape entry replaced 9
    assert merged.prefill_min_tokens("nm24", "bfloat16", 32, 32) == 7  # another dtype's kept
    assert merged.source["prefill"]["commit"] == "c0ffee" and merged.source["prefill"]["measured"] == str(stored)
    fresh = tmp_path / "new.json"
    stored.write_text(json.dumps(run(0.9)))  # dense wins: no prefill entry
    assert cusparselt_prefill.main(["--from", str(stored), "--pick", str(fresh)]) == 0
    assert "none: dense beat it" in capsys.readouterr().out
    assert sparse_configs.load(fresh).prefill == []
    other = tmp_path / "other.json"
    other.write_text("[1, 2]")  # not a table: refused, left as it was
    assert cusparselt_prefill.main(["--from", str(stored), "--pick", str(other)]) == 2
    assert other.read_text() == "[1, 2]" and str(other) in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--layers", "abc"], "--layers expects START:STOP"),
    (["--settings", "1.5"], "--settings '1.5': sparsity must lie in [0, 1)"),
    (["--methods", "foo"], "unknown --methods foo"),
])
def test_quality_options_are_checked_before_any_model_loads(argv, message, tmp_path, capsys):
    import quality

    with pytest.raises(SystemExit) as refused:
        quality.main([*argv, "--json", str(tmp_path / "q.json"), "--markdown", str(tmp_path / "q.md")])
    assert refused.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stage", ["layers", "ppl"])
def test_the_sparsellm_sweep_refuses_an_unknown_setting(stage, monkeypatch, capsys):
    """The ppl stage ran the defaults under the unknown name; the layers stage failed after
    gathering the inputs."""
    import sparsellm_sweep

    monkeypatch.setattr(sys, "argv", ["sparsellm_sweep.py", stage, "--settings", "default,typo"])
    with pytest.raises(SystemExit) as refused:
        sparsellm_sweep.main()
    assert refused.value.code == 2 and "unknown --settings typo" in capsys.readouterr().err


@pytest.mark.parametrize("script, argv, message", [
    ("export_table", ["--threads", "-1"], "--threads must be at least 1"),
    ("wanda_reference_loop", ["--sparsity", "1.5"], "expected a share in (0, 1)"),
    ("sparsegpt_reference_loop", ["--sparsity", "0"], "expected a share in (0, 1)"),
    # --no-eval alone pruned no layer and wrote a results file without a number
    ("wanda_reference_loop", ["--no-eval"], "give --compare-layers N"),
    ("sparsegpt_reference_loop", ["--no-eval", "--json", "x.json"], "give --compare-layers N"),
    ("wanda_reference_loop", ["--nsamples", "0"], "--nsamples must be at least 1"),
    ("sparsegpt_reference_loop", ["--compare-layers", "-1"], "--compare-layers must be at least 0"),
])
def test_bad_benchmark_options_are_one_clear_error(script, argv, message, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit) as refused:
        module.main(argv)
    assert refused.value.code == 2 and message in capsys.readouterr().err


def test_a_quality_file_without_runs_measures_the_dense_value_of_the_new_protocol(tmp_path, monkeypatch):
    """A file whose cells were all dropped (or failed) kept its dense value: a run of other windows
    then captioned the old protocol's dense perplexity with its own protocol."""
    import quality

    out = tmp_path / "q.json"
    out.write_text(json.dumps({"protocol": {"model": "smollm2", "nsamples": 2, "seqlen": 64, "eval_windows": 2,
                                            "seed": 0, "machine": "m"}, "dense": 99.0, "num_layers": 3, "runs": {}}))
    calls = []

    def dense_ppl(args):
        calls.append(args.seqlen)
        return 31.0, 3

    monkeypatch.setattr(quality, "dense_ppl", dense_ppl)
    monkeypatch.setattr(quality, "run_one", lambda method, setting, layers, args: {
        "method": method, "setting": setting, "layers": "all", "ppl": 40.0, "prune_seconds": 1.0,
        "achieved_sparsity": 0.5, "git": None})
    common = ["--methods", "magnitude", "--settings", "0.5", "--nsamples", "2", "--eval-windows", "2",
              "--json", str(out), "--markdown", str(tmp_path / "q.md")]
    assert quality.main([*common, "--seqlen", "32"]) == 0
    assert calls == [32] and json.loads(out.read_text())["dense"] == 31.0
    assert quality.main([*common, "--seqlen", "32", "--settings", "0.7"]) == 0  # the same protocol: kept
    assert calls == [32]


def test_protocols_that_differ_only_in_the_machine_are_the_same():
    """A results file measured on another machine is the same protocol (its dense value and runs
    kept); any other setting that differs is named."""
    import quality

    stored = {"model": "smollm2", "nsamples": 32, "machine": "a"}
    assert quality.protocol_differences(stored, {**stored, "machine": "b"}) == []
    assert quality.protocol_differences(stored, {**stored, "machine": "b", "nsamples": 64}) == ["nsamples"]


def test_tables_and_readme_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """quality.write_into (the README) and write_text (the Markdown tables) go through a file
    renamed into place: a failure while writing leaves the old file as it was."""
    import quality

    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- quality:start -->\nold\n<!-- quality:end -->\nb\n")
    readme.chmod(0o640)
    quality.write_into(str(readme), "new\n")
    assert readme.read_text() == "a\n<!-- quality:start -->\nnew\n<!-- quality:end -->\nb\n"
    assert readme.stat().st_mode & 0o777 == 0o640

    class Broken(Exception):
        pass

    def replace(*args):
        raise Broken

    monkeypatch.setattr(quality.os, "replace", replace)
    with pytest.raises(Broken):
        quality.write_into(str(readme), "newer\n")
    assert "new\n" in readme.read_text() and "newer" not in readme.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]  # no staged file left behind


def _structured_file(path, seqlen, runs):
    path.write_text(json.dumps({"protocol": {"model": "smollm2", "nsamples": 2, "seqlen": seqlen, "eval_windows": 2,
                                             "seed": 0, "machine": "m"}, "dense": 30.0, "num_layers": 3,
                                "runs": runs, "speed": {}}))


def test_a_structured_merge_of_another_protocol_is_refused(tmp_path, capsys):
    """--merge added a job's rows whatever their protocol, under the file's one caption and dense value."""
    run = {"method": "structprune", "channels": 0.2, "heads": 0.0, "allocation": "uniform", "ppl": 40.0,
           "prune_seconds": 1.0, "layer_sizes": {"intermediate_size": [8] * 3},
           "cost": {"before": {"parameters": 100}, "after": {"parameters": 80}}, "git": None}
    main_file, other = tmp_path / "s.json", tmp_path / "other.json"
    _structured_file(main_file, 64, {"structprune|c0.2|h0|uniform": run})
    _structured_file(other, 32, {"structprune|c0.5|h0|uniform": run | {"channels": 0.5}})
    stored = main_file.read_text()
    with pytest.raises(SystemExit) as refused:
        structured_quality.main(["--json", str(main_file), "--merge", str(other), "--markdown", str(tmp_path / "s.md")])
    assert refused.value.code == 2 and "seqlen: 32 there, 64 here" in capsys.readouterr().err
    assert main_file.read_text() == stored
    _structured_file(other, 64, {"structprune|c0.5|h0|uniform": run | {"channels": 0.5}})  # the same protocol: joins
    assert structured_quality.main(["--json", str(main_file), "--merge", str(other),
                                    "--markdown", str(tmp_path / "s.md")]) == 0
    assert len(json.loads(main_file.read_text())["runs"]) == 2


@pytest.mark.parametrize("argv, message", [
    (["--speed", "structprune"], "--speed takes METHOD,CHANNELS"),
    (["--speed", "structprune,half"], "--speed takes METHOD,CHANNELS"),
    (["--speed", "structprune,0.5"], "no run structprune|c0.5|h0|uniform"),
    (["--speed", "structprune,0.2"], "was not kept (run it again with --save-models)"),
    (["--channels", "0.2,x"], "--channels and --heads take numbers"),
    (["--methods", "structprune,nope"], "--methods nope"),
    (["--allocation", "energy:hot"], "--allocation energy:hot"),
])
def test_structured_options_are_checked_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(structured_quality, "dense_ppl", lambda args: pytest.fail("the dense model was evaluated"))
    monkeypatch.setattr(structured_quality, "run_one", lambda *a: pytest.fail("a run started"))
    monkeypatch.setattr(structured_quality, "speed", lambda *a: pytest.fail("a speed run started"))
    out = tmp_path / "s.json"
    _structured_file(out, 64, {"structprune|c0.2|h0|uniform": {"saved_to": None}})
    stored = out.read_text()
    with pytest.raises(SystemExit) as refused:
        structured_quality.main(["--json", str(out), "--markdown", str(tmp_path / "s.md"), "--seqlen", "64",
                                 "--nsamples", "2", "--eval-windows", "2", *argv])
    assert refused.value.code == 2 and message in capsys.readouterr().err
    assert out.read_text() == stored


@pytest.mark.parametrize("runs, message", [("sparsegpt", "too few fields"), ("nope:0.7:auto", "unknown method"),
                                           ("sparsegpt:1.5:auto", "sparsity"), ("sparsegpt:0.7:", "no backend")])
def test_prune_7b_refuses_a_bad_run_before_building_the_model(runs, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prune_7b, "build_model", lambda *a: pytest.fail("the model was built"))
    with pytest.raises(SystemExit) as refused:
        prune_7b.main([*TOK, "--tiny", "--device", "cpu", "--workdir", str(tmp_path), "--runs", runs])
    assert refused.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("runs, message", [("plain", "is not MODE:STATE_DTYPE"), ("fsdp:float32:two", "is not MODE"),
                                           ("plain:float32:2", "a plain run is one process")])
def test_elsa_7b_refuses_a_bad_run_before_building_the_model(runs, message, tmp_path, monkeypatch, capsys):
    """Exit 2 with the usage (a process count that is no integer was a traceback, others exit 1)."""
    monkeypatch.setattr(elsa_7b, "build_model", lambda *a: pytest.fail("the model was built"))
    with pytest.raises(SystemExit) as refused:
        elsa_7b.main([*TOK, "--tiny", "--device", "cpu", "--workdir", str(tmp_path), "--runs", runs])
    assert refused.value.code == 2 and message in capsys.readouterr().err


def test_prune_7b_keeps_the_other_runs_when_one_hangs(tmp_path, monkeypatch):
    """A run past --timeout raised TimeoutExpired out of the benchmark, losing the runs after it."""
    import subprocess

    real_run = subprocess.run

    def hang(cmd, **kwargs):
        if "timeout" not in kwargs:  # git, for the commit
            return real_run(cmd, **kwargs)
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"], stderr=b"stuck")

    monkeypatch.setattr(prune_7b.subprocess, "run", hang)
    monkeypatch.setattr(prune_7b, "build_model", lambda *a: None)
    out = tmp_path / "p.json"
    assert prune_7b.main([*TOK, "--tiny", "--device", "cpu", "--workdir", str(tmp_path), "--timeout", "1",
                          "--runs", "sparsegpt:0.7:auto,sparsellm:2-4:auto", "--out", str(out)]) == 1
    written = json.loads(out.read_text())
    assert [(r["method"], r["sparsity"], r["rc"]) for r in written["runs"]] == [
        ("sparsegpt", "0.7", "timeout"), ("sparsellm", "2:4", "timeout")]
    assert "stuck" in written["runs"][0]["error"] and written["machine"] and written["git"]["commit"]


@pytest.mark.parametrize("argv, message", [(["layers", "--layers", "0,x"], "invalid literal"),
                                           (["layers", "--layers", "0,-1"], "negative layer"),
                                           (["ppl", "--range", "3"], "--range expects START:STOP"),
                                           (["ppl", "--range", "5:2"], "layer range 5:2 is empty"),
                                           (["ppl", "--sparsity", "1.5"], "sparsity")])
def test_the_sparsellm_sweep_checks_its_options_first(argv, message, monkeypatch, capsys):
    import sparsellm_sweep

    monkeypatch.setattr(sparsellm_sweep.api, "run", lambda config: pytest.fail("a run started"))
    monkeypatch.setattr(sparsellm_sweep, "gather", lambda *a: pytest.fail("inputs were gathered"))
    monkeypatch.setattr(sys, "argv", ["sparsellm_sweep.py", *argv, "--settings", "default"])
    with pytest.raises(SystemExit) as refused:
        sparsellm_sweep.main()
    assert refused.value.code == 2 and message in capsys.readouterr().err


def test_the_sparsellm_sweep_stores_a_ppl_report_with_its_commit_and_machine(tmp_path, monkeypatch):
    """The ppl stage's --out files were the run's report alone: settings, but no commit."""
    import sparsellm_sweep

    report = {"ppl": {"pruned": {"wiki": 60.0}}, "prune_seconds": 1.0, "layer_errors": [{"ffn_rel_error": 0.5}]}
    monkeypatch.setattr(sparsellm_sweep.api, "run", lambda config: report)
    out = tmp_path / "sweep"
    monkeypatch.setattr(sys, "argv", ["sparsellm_sweep.py", "ppl", "--settings", "default", "--out", str(out)])
    sparsellm_sweep.main()
    written = json.loads((tmp_path / "sweep.default.0.7.json").read_text())
    assert written["ppl"] == report["ppl"] and len(written["git"]["commit"]) == 40 and written["machine"]


def test_the_memory_benchmark_records_its_machine(tmp_path, monkeypatch):
    """Its peak-memory numbers were stored with the commit and settings but not the machine."""
    import subprocess

    import structprune_memory

    real_run = subprocess.run

    def child(cmd, **kwargs):
        if "--one" not in cmd:  # git, for the commit
            return real_run(cmd, **kwargs)
        width = int(cmd[cmd.index("--one") + 1].split(":")[0])
        record = {"width": width, "layers": 1, "params": width ** 3, "layer_weight_bytes": 4 * width ** 2,
                  "working_bytes": 1000 * width, "seconds": 0.1, "method": "sparsegpt"}
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(record) + "\n", stderr="")

    monkeypatch.setattr(structprune_memory.subprocess, "run", child)
    out = tmp_path / "m.json"
    assert structprune_memory.main(["--widths", "64,128", "--methods", "sparsegpt", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["machine"] and len(written["git"]["commit"]) == 40 and written["nsamples"] == 8
    with pytest.raises(SystemExit) as refused:
        structprune_memory.main(["--widths", "64,x", "--out", str(tmp_path / "n.json")])
    assert refused.value.code == 2 and not (tmp_path / "n.json").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without CUDA")
def test_the_cusparselt_benchmark_records_commit_and_settings(tmp_path, monkeypatch):
    """Its commit came from $SPARSELLM_COMMIT only (None wherever that was not set), with no
    dirty state and none of the timing settings."""
    import cusparselt_prefill

    monkeypatch.delenv("SPARSELLM_COMMIT", raising=False)
    out = tmp_path / "c.json"
    assert cusparselt_prefill.main(["--out", str(out), "--tokens", "128", "512"]) == 2  # no cuSPARSELt here
    written = json.loads(out.read_text())
    assert len(written["commit"]) == 40 and "dirty" in written and written["available"] is False
    assert written["settings"]["tokens"] == [128, 512] and written["settings"]["rep_ms"] == 40


def test_the_heldout_script_names_its_commit_and_machine_first(monkeypatch, capsys):
    import structprune_heldout

    import sparsellm

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(sparsellm, "load_model", stop)
    with pytest.raises(Stop):
        structprune_heldout.main(["--layers", "3"])
    header = capsys.readouterr().out
    assert header.startswith("# python benchmarks/structprune_heldout.py --layers 3 (code of commit ")
    assert "threads" in header


def test_the_sweep_refuses_bad_shapes(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert sparse_gpu_sweep.main(["--device", "cpu", "--shapes", "128by64", "--out", str(out)]) == 2
    assert "--shapes" in capsys.readouterr().err and not out.exists()
