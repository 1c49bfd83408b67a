"""benchmarks/interleaved_ratio.py: two methods pruned a layer at a time in turn end as separate
runs do, and the JSON adds up; bad arguments fail before any work, writing nothing."""
import importlib.util
import json
from pathlib import Path

import pytest

from sparsellm import api
from sparsellm.config import PruneConfig

from test_cli import text_file, tiny_llama_dir, tokenizer_dir  # noqa: F401  (fixtures)

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "interleaved_ratio.py"
_spec = importlib.util.spec_from_file_location("interleaved_ratio", _PATH)
interleaved_ratio = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(interleaved_ratio)


def small(model, text):
    return ["--model", model, "--calib", text, "--eval", text, "--layers", "1:3", "--nsamples", "4",
            "--seqlen", "64", "--eval-windows", "4", "--cpu"]


def test_interleaved_runs_equal_separate_runs(tiny_llama_dir, text_file, tmp_path):  # noqa: F811
    out = tmp_path / "ratio.json"
    assert interleaved_ratio.main(small(tiny_llama_dir, text_file) + ["--methods", "sparsellm,wanda",
                                                                       "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert list(runs) == ["sparsellm", "wanda"]
    for name, run in runs.items():
        assert len(run["layer_seconds"]) == 2 and all(s > 0 for s in run["layer_seconds"])
        assert run["prune_seconds"] == pytest.approx(run["sample_seconds"] + sum(run["layer_seconds"]))
        separate = api.run(PruneConfig(model=tiny_llama_dir, method=name, sparsity="0.7", layers=(1, 3), nsamples=4,
                                       seqlen=64, seed=0, calib=text_file, eval=(text_file,), eval_windows=4,
                                       quiet=True, device="cpu", eval_dense=False))
        assert run["ppl"] == separate["ppl"]["pruned"][text_file], name
    assert result["ratio"] == pytest.approx(runs["sparsellm"]["prune_seconds"] / runs["wanda"]["prune_seconds"])
    assert result["git"]["commit"] and result["protocol"]["layers"] == "1:3"
    assert result["iterations"] is None and result["machine"]  # the solver iterations: each method's own


@pytest.mark.parametrize("methods, message", [("sparsellm", "two methods"), ("sparsellm,elsa", "not a layer-wise"),
                                              ("sparsellm,nope", "not a layer-wise")])
def test_bad_methods_fail_before_work(methods, message, tmp_path, capsys):
    out = tmp_path / "ratio.json"
    with pytest.raises(SystemExit) as exit_info:
        interleaved_ratio.main(["--methods", methods, "--json", str(out)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_existing_json_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "ratio.json"
    out.write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        interleaved_ratio.main(["--json", str(out)])
    assert exit_info.value.code == 2 and "exists" in capsys.readouterr().err
    assert out.read_text() == "{}"


@pytest.mark.parametrize("bad, message", [(["--layers", "a:b"], "START:STOP"), (["--layers", "3"], "START:STOP"),
                                          (["--sparsity", "1.5"], "sparsity")])
def test_bad_settings_fail_before_a_model_loads(bad, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "ratio.json"
    with pytest.raises(SystemExit) as exit_info:
        interleaved_ratio.main(bad + ["--json", str(out)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()
