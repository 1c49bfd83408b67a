"""benchmarks/elsa_quality.py --merge: a GPU machine's results file joins the stored table; rows of
the same run (commit, settings, machine) join, a different run of the same key replaces it."""
import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(_BENCH))  # elsa_quality imports its helpers from benchmarks/quality.py
_spec = importlib.util.spec_from_file_location("elsa_quality", _BENCH / "elsa_quality.py")
elsa_quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(elsa_quality)


def run(commit, rows):
    return {"setting": "0.9", "tag": "gpu", "commit": commit, "init": "sparsegpt", "machine": "GPU X",
            "settings": {"steps": 4096, "batch_size": 8, "grad_accum": 1, "seqlen": 512, "lr": 2e-4,
                         "admm_lambda": 0.01, "admm_schedule": "constant", "admm_lambda_start": None,
                         "admm_interval": 32, "score": "fisher", "nsamples": 32, "eval_windows": 40},
            "rows": rows}


SPARSEGPT = {"ppl": 8942.4, "seconds": 7.8}
ELSA = {"ppl": 125.0, "seconds": 542.2, "train_seconds": 534.3, "admm": [{"step": 32, "residual": 0.09}]}
MASKED = {"ppl": 111.1, "seconds": 530.0, "train_seconds": 522.2}


def files(tmp_path, stored, other):
    stored_path, other_path = tmp_path / "elsa.json", tmp_path / "elsa_gpu.json"
    stored_path.write_text(json.dumps({"protocol": {}, "dense": None, "runs": stored, "sparsellm_json": "none.json"}))
    other_path.write_text(json.dumps({"protocol": {}, "dense": None, "runs": other}))
    return stored_path, other_path


def test_rows_of_the_same_run_join_and_render(tmp_path, capsys):
    cpu = run("aaaaaaa", {"sparsegpt": SPARSEGPT, "elsa": ELSA}) | {"tag": "", "machine": "CPU"}
    stored, other = files(tmp_path, {"0.9": cpu, "0.9|gpu": run("abc1234", {"sparsegpt": SPARSEGPT, "elsa": ELSA})},
                          {"0.9|gpu": run("abc1234", {"sparsegpt": SPARSEGPT, "masked-adam": MASKED})})
    assert elsa_quality.main(["--json", str(stored), "--merge", str(other)]) == 0
    runs = json.loads(stored.read_text())["runs"]
    assert set(runs["0.9|gpu"]["rows"]) == {"sparsegpt", "elsa", "masked-adam"}
    assert runs["0.9"] == cpu  # the other key is untouched
    table = capsys.readouterr().out
    assert "| 111.1 | 125 |" in table  # masked-adam beside Elsa in the GPU run's row


def test_a_different_run_of_the_same_key_replaces_the_stored_one(tmp_path):
    old = run("abc1234", {"sparsegpt": SPARSEGPT, "elsa": ELSA})
    for change in ({"commit": "def5678"}, {"machine": "GPU Y"}):
        new = run("abc1234", {"sparsegpt": SPARSEGPT, "masked-adam": MASKED}) | change
        stored, other = files(tmp_path, {"0.9|gpu": copy.deepcopy(old)}, {"0.9|gpu": new})
        assert elsa_quality.main(["--json", str(stored), "--merge", str(other)]) == 0
        assert json.loads(stored.read_text())["runs"]["0.9|gpu"] == new, change


def quality_file(tmp_path, protocol, dense=19.6, runs=None):
    """A benchmarks/quality.py results file holding SparseLLM's one-shot 0.9 entry."""
    path = tmp_path / "quality.json"
    entry = {"method": "sparsellm", "setting": "0.9", "layers": "all", "ppl": 1860.0, "prune_seconds": 300.0,
             "threads": 2, "git": {"commit": "37080ba" + "0" * 33, "dirty": False}}
    path.write_text(json.dumps({"protocol": protocol, "dense": dense, "num_layers": 30,
                                "runs": runs if runs is not None else {"sparsellm|0.9|all": entry}}))
    return path


PROTOCOL = {"model": "smollm2", "nsamples": 32, "seqlen": 512, "eval_windows": 40, "seed": 0, "machine": "CPU"}


def rendered(tmp_path, runs, protocol=PROTOCOL):
    reference = elsa_quality.sparsellm_reference(str(quality_file(tmp_path, protocol)))
    return elsa_quality.render({"runs": runs}, reference)


def test_the_caption_and_the_sparsellm_column_come_from_matching_protocols(tmp_path):
    entry = run("abc1234", {"sparsegpt": SPARSEGPT, "elsa": ELSA, "masked-adam": MASKED})
    table = rendered(tmp_path, {"0.9|gpu": entry})
    assert table.startswith("Perplexity on the wiki test part (40 x 512 tokens; dense 19.6), all 30 layers. "
                            "SparseGPT: one-shot, 32 x 512 calibration tokens.")
    assert "time (min): SparseGPT's prune + masked-adam's training / Elsa's training" in table
    assert "| 8942 | 1860 | 111.1 | 125 |" in table  # the same protocol: SparseLLM's one-shot number
    assert "another protocol" not in table
    # the wiki split as .txt files (../shared/device/prepare.sh) is the same text: still comparable
    files = {"calib": "/data/wiki_calib.txt", "eval": "/data/wiki_test.txt"}
    assert "| 8942 | 1860 |" in rendered(tmp_path, {"0.9|gpu": entry | {"text": files}})
    # another text, another seed, calibration or test windows: no SparseLLM number, no dense value from it
    for change in ({"text": {"calib": "/data/other.txt", "eval": "wiki"}},
                   {"settings": entry["settings"] | {"seed": 1}}, {"settings": entry["settings"] | {"nsamples": 8}},
                   {"settings": entry["settings"] | {"eval_windows": 4}}):
        table = rendered(tmp_path, {"0.9|gpu": entry | change})
        assert "| 8942 | - | 111.1 | 125 |" in table, change
        assert "dense not measured), all layers" in table, change
        assert "sparsellm -: the SparseLLM entry of that setting was measured at another protocol" in table


def test_a_run_s_own_dense_value_and_runs_at_several_protocols(tmp_path):
    small = run("abc1234", {"sparsegpt": SPARSEGPT, "elsa": ELSA}) | {"tag": "smoke", "dense": 25.88, "num_layers": 30}
    small["settings"] = small["settings"] | {"nsamples": 2, "seqlen": 64, "eval_windows": 2}
    table = rendered(tmp_path, {"0.9|smoke": small})
    assert table.startswith("Perplexity on the wiki test part (2 x 64 tokens; dense 25.88), all 30 layers. "
                            "SparseGPT: one-shot, 2 x 64 calibration tokens.")
    table = rendered(tmp_path, {"0.9|smoke": small, "0.9|gpu": run("abc1234", {"sparsegpt": SPARSEGPT, "elsa": ELSA})})
    assert table.startswith("Perplexity on the wiki test part, all 30 layers, at each run's protocol (0.9 (gpu): "
                            "40 x 512 tokens, dense 19.6, 32 x 512 calibration tokens; 0.9 (smoke): 2 x 64 tokens, "
                            "dense 25.88, 2 x 64 calibration tokens). SparseGPT: one-shot.")


@pytest.mark.parametrize("argv, message", [
    (["--methods", "elsa,nope"], "nope"),
    (["--settings", "0.9,1.5"], "--settings 1.5"),
    (["--admm-schedule", "steep"], "admm_schedule"),
    (["--score", "typo"], "score"),
    (["--train-precision", "fp8"], "train_precision"),
    (["--steps", "0"], "steps"),
])
def test_bad_options_fail_before_any_model_loads(argv, message, tmp_path, monkeypatch, capsys):
    """A bad method, setting or Elsa setting failed with a traceback once the model was loaded, the
    dense model evaluated and (for --methods) SparseGPT pruned."""
    from sparsellm import api

    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "elsa.json"
    with pytest.raises(SystemExit) as refused:
        elsa_quality.main(["--json", str(out), "--cache", str(tmp_path / "cache"), *argv])
    assert refused.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
