"""The sparse kernels' config table (kernels/sparse_configs.py): picking it from sweep rows,
looking calls up in it, refusing malformed tables, and which table is active."""
import json
import math

import pytest

from sparsellm.kernels import sparse_configs as sc

SHAPES = ([4096, 4096], [4096, 11008], [11008, 4096])
A = {"BLOCK_N": 8, "BLOCK_K": 1024, "X_MODE": 3, "STAGES": 3, "num_warps": 4}
B = {"BLOCK_N": 4, "BLOCK_K": 512, "X_MODE": 4, "STAGES": 2, "num_warps": 4}
C = {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "split_k": 1}


def _rows(speedups: dict, fmt="nm24", dtype="float16", dense_us=30.0) -> list[dict]:
    """Sweep rows: {(tokens, shape index): [(config, speedup), ...]} -> a dense row and one row
    per config, its time dense_us / speedup."""
    rows = []
    for (t, i), configs in speedups.items():
        base = {"shape": SHAPES[i], "format": fmt, "tokens": t, "dtype": dtype}
        rows.append({**base, "impl": "dense", "config": None, "us": dense_us, "err": 1e-4})
        rows += [{**base, "impl": fmt, "config": c, "us": dense_us / s, "err": 2e-4} for c, s in configs]
    return rows


def _crossover(table, fmt, shape, **extra):
    hits = [c for c in table["crossovers"] if c["format"] == fmt and c["shape"] == shape
            and all(c.get(k) == v for k, v in extra.items())]
    assert len(hits) == 1, hits
    return hits[0]["max_sparse_tokens"]


def test_pick_takes_each_shapes_fastest_and_the_best_config_over_all_shapes():
    rows = _rows({
        (1, 0): [(A, 1.50), (B, 1.60)], (1, 1): [(A, 1.45), (B, 1.40)], (1, 2): [(A, 1.60), (B, 1.55)],
        (4, 0): [(B, 1.20), (C, 0.50)], (4, 1): [(B, 1.02), (C, 0.40)], (4, 2): [(B, 1.30), (C, 0.45)],
        (16, 0): [(C, 1.10)], (16, 1): [(C, 0.90)], (16, 2): [(C, 0.80)],
    })
    # a faster row whose output is wrong, and one that failed to compile: neither is picked
    rows.append({**rows[1], "config": {**A, "BLOCK_N": 16}, "us": 1.0, "err": 0.5})
    rows.append({k: v for k, v in rows[1].items() if k != "us"} | {"config": {**A, "BLOCK_N": 2}, "error": "spill"})
    table = sc.pick(rows, source={"commit": "abc"})
    sc.ConfigTable(table)  # it validates
    own = {(tuple(e["tokens"]), tuple(e["shape"])): e for e in table["entries"] if e["shape"] is not None}
    assert own[((1, 1), tuple(SHAPES[0]))]["config"] == B and own[((1, 1), tuple(SHAPES[1]))]["config"] == A
    assert own[((1, 1), tuple(SHAPES[0]))]["speedup"] == pytest.approx(1.6)
    assert own[((2, 4), tuple(SHAPES[2]))]["config"] == B  # 4 tokens cover 2-4, 16 cover 5-16
    assert own[((5, 16), tuple(SHAPES[0]))]["config"] == C
    anyshape = {tuple(e["tokens"]): e for e in table["entries"] if e["shape"] is None}
    # geometric mean at 1 token: A (1.5 * 1.45 * 1.6 = 3.48) over B (1.6 * 1.4 * 1.55 = 3.47)
    assert anyshape[(1, 1)]["config"] == A and anyshape[(1, 1)]["worst_speedup"] == pytest.approx(1.45)
    assert sorted(anyshape) == [(1, 1), (2, 4), (5, 16)]
    # crossovers: a count wins at >= 1.05x, and every smaller measured count must win too
    assert _crossover(table, "nm24", SHAPES[0]) == 16
    assert _crossover(table, "nm24", SHAPES[1]) == 1   # 1.02x at 4 tokens is no win
    assert _crossover(table, "nm24", SHAPES[2]) == 4
    assert _crossover(table, "nm24", None) == 1  # the any-shape config's worst shape
    assert table["source"] == {"commit": "abc"} and table["min_speedup"] == sc.MIN_SPEEDUP
    assert _crossover(sc.pick(rows, min_speedup=1.01), "nm24", SHAPES[1]) == 4


def test_pick_keeps_slice_heights_apart_and_says_nothing_without_one_token():
    s8, s16 = {"S": 8, "BLOCK_J": 128, "num_warps": 4}, {"S": 16, "BLOCK_J": 64, "num_warps": 8}
    rows = _rows({(1, 0): [(s8, 2.1), (s16, 2.4)], (1, 1): [(s8, 2.8), (s16, 2.5)]}, fmt="sell")
    rows += _rows({(4, 0): [(A, 0.9)]})  # nm24 measured at 4 tokens only: no crossover
    table = sc.pick(rows)
    t = sc.ConfigTable(table)
    # a sell entry applies only to weights packed with its slice height
    assert t.config("sell", "float16", 1, *SHAPES[0], slice_rows=8) == s8
    assert t.config("sell", "float16", 1, *SHAPES[0], slice_rows=16) == s16
    assert t.config("sell", "float16", 1, *SHAPES[0], slice_rows=32) is None
    assert _crossover(table, "sell", SHAPES[1], S=8) == 1 and _crossover(table, "sell", None, S=16) == 1
    assert not [c for c in table["crossovers"] if c["format"] == "nm24"]
    assert t.config("nm24", "float16", 3, *SHAPES[0]) == A and t.config("nm24", "float16", 1, *SHAPES[0]) is None
    # a failed one-token count: crossover 0 (always dense)
    lost = sc.pick(_rows({(1, 0): [(A, 0.8)], (4, 0): [(B, 1.2)]}))
    assert _crossover(lost, "nm24", SHAPES[0]) == 0
    # a shape none of whose configs ran at 4 tokens loses there, whatever 16 tokens did
    gap = _rows({(1, 0): [(A, 1.5)], (1, 1): [(A, 1.5)], (4, 0): [(B, 1.2)], (16, 0): [(C, 1.2)],
                 (16, 1): [(C, 1.2)]})
    base = {"shape": SHAPES[1], "format": "nm24", "tokens": 4, "dtype": "float16"}
    gap += [{**base, "impl": "dense", "config": None, "us": 30.0, "err": 1e-4},
            {**base, "impl": "nm24", "config": B, "us": 10.0, "err": 0.3}]  # shape 1 at 4 tokens: a wrong output
    assert _crossover(sc.pick(gap), "nm24", SHAPES[1]) == 1 and _crossover(sc.pick(gap), "nm24", SHAPES[0]) == 16


def test_no_config_at_every_shape_gives_no_any_shape_entry():
    table = sc.pick(_rows({(1, 0): [(A, 1.5)], (1, 1): [(B, 1.4)]}))
    assert not [e for e in table["entries"] if e["shape"] is None]
    assert _crossover(table, "nm24", None) == 0 and _crossover(table, "nm24", SHAPES[1]) == 1


def _table(**changes) -> dict:
    table = {"version": 1, "source": {"commit": "x"}, "entries": [
        {"format": "nm24", "dtype": "float16", "tokens": [1, 1], "shape": None, "config": dict(A)},
        {"format": "nm24", "dtype": "float16", "tokens": [1, 1], "shape": SHAPES[1], "config": dict(B)},
        {"format": "nm24", "dtype": "float32", "tokens": [2, 8], "shape": None, "config": dict(C)},
    ], "crossovers": [
        {"format": "nm24", "dtype": "float16", "shape": None, "max_sparse_tokens": 4},
        {"format": "nm24", "dtype": "float16", "shape": SHAPES[1], "max_sparse_tokens": 8},
        {"format": "sell", "S": 8, "dtype": "float16", "shape": None, "max_sparse_tokens": 2},
    ]}
    table.update(changes)
    return table


def test_lookup_prefers_the_shapes_own_entry_and_falls_back_by_dtype():
    t = sc.ConfigTable(_table())
    assert t.config("nm24", "float16", 1, *SHAPES[1]) == B
    assert t.config("nm24", "float16", 1, *SHAPES[0]) == A
    assert t.config("nm24", "bfloat16", 1, *SHAPES[1]) == B  # bfloat16: float16's entries
    assert t.config("nm24", "float32", 1, *SHAPES[1]) is None  # float32: its own only
    assert t.config("nm24", "float32", 8, *SHAPES[1]) == C and t.config("nm24", "float32", 9, *SHAPES[1]) is None
    assert t.config("nm24", "float16", 2, *SHAPES[1]) is None
    assert t.config("sell", "float16", 1, *SHAPES[1], slice_rows=8) is None
    got = t.config("nm24", "float16", 1, *SHAPES[1])
    got["BLOCK_N"] = 99  # a copy: the launcher pops its split from it
    assert t.config("nm24", "float16", 1, *SHAPES[1]) == B
    assert t.max_sparse_tokens("nm24", "float16", *SHAPES[1]) == 8
    assert t.max_sparse_tokens("nm24", "bfloat16", *SHAPES[0]) == 4
    assert t.max_sparse_tokens("nm24", "float32", *SHAPES[0]) is None
    assert t.max_sparse_tokens("sell", "float16", *SHAPES[0], slice_rows=8) == 2
    assert t.max_sparse_tokens("sell", "float16", *SHAPES[0], slice_rows=16) is None


@pytest.mark.parametrize("change, message", [
    ({"version": 2}, "version"),
    ({"entries": [{"format": "coo"}]}, "format must be one of"),
    ({"entries": [{"format": "nm24", "dtype": "float8", "tokens": [1, 1], "config": A}]}, "dtype"),
    ({"entries": [{"format": "nm24", "dtype": "float16", "tokens": [2, 1], "config": A}]}, "tokens"),
    ({"entries": [{"format": "nm24", "dtype": "float16", "tokens": [1, 1], "shape": [4096], "config": A}]}, "shape"),
    ({"entries": [{"format": "nm24", "dtype": "float16", "tokens": [1, 1], "config": {"BLOCK_J": 8}}]},
     "unknown nm24 config keys"),
    ({"entries": [{"format": "nm24", "dtype": "float16", "tokens": [1, 1], "config": {"BLOCK_N": 0.5}}]},
     "integers"),
    ({"entries": [{"format": "sell", "dtype": "float16", "tokens": [1, 1], "config": {"BLOCK_J": 8}}]},
     "slice height"),
    ({"entries": [{"format": "nm24", "dtype": "float32", "tokens": [1, 1], "config": {"X_MODE": 4}}]},
     "X_MODE 4 reads 16-bit words"),
    ({"entries": [{"format": "sell", "dtype": "float16", "tokens": [1, 2], "config": {"S": 8, "BLOCK_J": 8, "X_SHARED": 1}}]},
     "X_SHARED .* one token"),
    ({"entries": [{"format": "sell", "dtype": "float16", "tokens": [1, 1], "config": {"S": 8, "split": 2}}]},
     "BLOCK_J"),
    ({"entries": [{"format": "nm24", "dtype": "float16", "tokens": [1, 1], "config": {"BLOCK_N": 4, "split_k": 2}}]},
     "BLOCK_K"),
    ({"entries": [{"format": "nm24", "dtype": "float16", "tokens": [1, 1], "config": {"BLOCK_N": 4, "BLOCK_K": 16}}]},
     "BLOCK_K, a power of two >= 32"),
    ({"entries": [{"format": "nm24", "dtype": "float16", "tokens": [1, 1], "config": {"BLOCK_N": True, "BLOCK_K": 64}}]},
     "config values must be non-negative integers"),  # JSON true is no size (Python's bool is an int)
    ({"crossovers": [{"format": "nm24", "dtype": "float16", "shape": None, "max_sparse_tokens": True}]},
     "max_sparse_tokens must be an integer"),
    ({"entries": [{"format": "nm24", "dtype": "float16", "tokens": [1, 1], "config": {"BLOCK_N": 6, "BLOCK_K": 64}}]},
     "BLOCK_N, a power of two"),
    ({"crossovers": [{"format": "nm24", "dtype": "float16", "max_sparse_tokens": -1}]}, "max_sparse_tokens"),
    ({"crossovers": [{"format": "sell", "dtype": "float16", "max_sparse_tokens": 1}]}, "slice height"),
    # JSON true is no count or size in any of the table's integers (Python's bool is an int)
    ({"entries": [{"format": "nm24", "dtype": "float16", "tokens": [True, True], "config": A}]}, "tokens"),
    ({"entries": [{"format": "nm24", "dtype": "float16", "tokens": [1, 1], "shape": [True, 4096], "config": A}]},
     "shape"),
    ({"crossovers": [{"format": "sell", "S": True, "dtype": "float16", "max_sparse_tokens": 1}]}, "slice height"),
])
def test_a_malformed_table_is_refused_with_where(change, message):
    with pytest.raises(sc.ConfigTableError, match=message) as info:
        sc.ConfigTable(_table(**change), "t.json")
    assert "t.json" in str(info.value)


@pytest.fixture
def fresh():
    """The environment's choice resolved afresh in the test, and again after it."""
    sc.refresh()
    yield
    sc.refresh()


def test_the_active_table(tmp_path, monkeypatch, fresh):
    """use() first, then the file in the environment, then the packaged one (not under the
    interpreter), the environment read once; a missing file is an error naming it."""
    path = tmp_path / "t.json"
    path.write_text(json.dumps(_table()))
    monkeypatch.setenv(sc.ENV, str(path))
    assert sc.lookup("nm24", "torch.float16", 1, *SHAPES[1]) == B
    assert sc.max_sparse_tokens("nm24", "torch.bfloat16", *SHAPES[0]) == 4
    assert sc.describe()["origin"] == str(path) and sc.describe()["source"] == {"commit": "x"}
    with sc.use(None):
        assert sc.lookup("nm24", "float16", 1, *SHAPES[1]) is None and sc.describe() == {"origin": None}
        with sc.use(_table(entries=[])):
            assert sc.lookup("nm24", "float16", 1, *SHAPES[1]) is None
            assert sc.max_sparse_tokens("nm24", "float16", *SHAPES[1]) == 8
    monkeypatch.setenv(sc.ENV, str(tmp_path / "missing.json"))
    assert sc.describe()["origin"] == str(path)  # read once ...
    sc.refresh()                                 # ... until refreshed
    with pytest.raises(sc.ConfigTableError, match="missing.json.*SPARSELLM_SPARSE_GPU_CONFIGS"):
        sc.lookup("nm24", "float16", 1, *SHAPES[1])
    monkeypatch.delenv(sc.ENV)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    sc.refresh()
    assert sc.active() is None  # the packaged table's tiles are for GPUs
    monkeypatch.delenv("TRITON_INTERPRET")
    sc.refresh()
    assert sc.active().origin == str(sc.PACKAGED)


def test_the_packaged_table_loads():
    table = sc.load(sc.PACKAGED)
    assert table.source  # says where its numbers came from (or that there are none yet)
    for e in table.entries:
        assert e["format"] in sc.FORMATS and math.isfinite(e.get("speedup", e.get("worst_speedup", 1.0)))


def _prefill_rows(speedups: dict, dense_ms=1.0) -> list[dict]:
    """cusparselt_prefill.py rows: {(shape index, tokens): speedup or None (failed)}."""
    rows = []
    for (i, t), s in speedups.items():
        row = {"in": SHAPES[i][0], "out": SHAPES[i][1], "tokens": t, "dense_ms": dense_ms, "ref_max_abs": 2.0}
        if s is None:
            row["ours_error"] = "RuntimeError: no plan"
        else:
            row.update(ours_ms=dense_ms / s, ours_err=1e-3)
        rows.append(row)
    return rows


def test_pick_prefill_takes_the_count_from_which_every_larger_one_wins():
    rows = _prefill_rows({(0, 128): 0.7, (0, 512): 1.10, (0, 2048): 1.20, (0, 4096): 1.25,
                          (1, 128): 1.30, (1, 512): 0.95, (1, 2048): 1.07, (1, 4096): 1.12,
                          (2, 128): 0.8, (2, 512): 0.9, (2, 2048): 1.3, (2, 4096): None})
    rows.append({**rows[0], "tokens": 8192, "ours_ms": 0.5, "ours_err": 0.5})  # 2x, but wrong: a loss
    entries = sc.pick_prefill(rows, "float16")
    mine = {tuple(e["shape"]) if e["shape"] else None: e["min_tokens"] for e in entries}
    # shape 0 wins from 512 up to 4096 but loses (a wrong output) at 8192; shape 2 fails at 4096
    assert mine == {tuple(SHAPES[1]): 2048}
    rows = rows[:-1]
    mine = {tuple(e["shape"]) if e["shape"] else None: e["min_tokens"] for e in sc.pick_prefill(rows, "float16")}
    assert mine == {tuple(SHAPES[0]): 512, tuple(SHAPES[1]): 2048}  # no any-shape entry: shape 2 has none
    rows = [r for r in rows if r["in"] != SHAPES[2][0] or r["out"] != SHAPES[2][1]]
    entries = sc.pick_prefill(rows, "float16", min_speedup=1.1)
    mine = {tuple(e["shape"]) if e["shape"] else None: e["min_tokens"] for e in entries}
    assert mine == {tuple(SHAPES[0]): 512, tuple(SHAPES[1]): 4096, None: 4096}
    t = sc.ConfigTable({"version": 1, "prefill": entries})
    assert t.prefill_min_tokens("nm24", "bfloat16", *SHAPES[0]) == 512  # float16's, as for the kernels
    assert t.prefill_min_tokens("nm24", "float16", 5120, 13824) == 4096  # another shape: the any-shape one
    assert t.prefill_min_tokens("nm24", "float32", *SHAPES[0]) is None
    assert t.prefill_min_tokens("sell", "float16", *SHAPES[0]) is None


@pytest.mark.parametrize("entry, message", [
    ({"format": "sell", "path": "cusparselt", "dtype": "float16", "min_tokens": 8}, "format"),
    ({"format": "nm24", "path": "cutlass", "dtype": "float16", "min_tokens": 8}, "path"),
    ({"format": "nm24", "path": "cusparselt", "dtype": "float16", "min_tokens": 0}, "min_tokens"),
])
def test_a_malformed_prefill_entry_is_refused(entry, message):
    with pytest.raises(sc.ConfigTableError, match=message):
        sc.ConfigTable({"version": 1, "prefill": [entry]}, "t.json")


def test_save_writes_only_a_valid_table_and_leaves_the_old_one_whole(tmp_path):
    path = tmp_path / "t.json"
    assert sc.save(_table(), path).config("nm24", "float16", 1, *SHAPES[1]) == B
    assert sc.load(path).config("nm24", "float16", 1, *SHAPES[1]) == B
    with pytest.raises(sc.ConfigTableError, match="version"):
        sc.save(_table(version=2), path)
    assert json.loads(path.read_text())["version"] == 1  # the valid table still there
    with pytest.raises(sc.ConfigTableError, match="missing"):  # an unwritable place: the same error
        sc.save(_table(), tmp_path / "missing" / "t.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]  # no temporary file left


@pytest.mark.parametrize("min_speedup, stored, pick, message", [
    (1.05, None, None, None), (1.05, "s.json", "t.json", None), (1.0, None, "t.json", None),
    (0.0, None, "t.json", "must be > 0"), (-1.0, None, None, "must be > 0"), (float("nan"), None, None, "must be > 0"),
    (1.05, "s.json", None, "--from only feeds --pick"),
])
def test_the_pick_options_check(min_speedup, stored, pick, message):
    got = sc.pick_options_error(min_speedup, stored, pick)
    assert got is None if message is None else message in got
