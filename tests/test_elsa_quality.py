"""benchmarks/elsa_quality.py --merge: a GPU machine's results file joins the stored table; rows of
the same run (commit, settings, machine) join, a different run of the same key replaces it."""
import copy
import importlib.util
import json
import sys
from pathlib import Path

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
