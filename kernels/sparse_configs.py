"""Measured launch configs of the sparse decode kernels (``kernels/sparse_matmul.py``) and the
token counts up to which they beat dense: one table, written from a GPU sweep, read at launch.

Why a table: the best tile of the ``nm24`` and ``sell`` kernels differs by shape and token
count (one token wants long K steps, a few tokens small tiles decoded once per token block),
and the autotuner cannot choose at run time (it times with ``do_bench``, which a slow host's
launch cost dominates: see ``_nm24_gemv``). So ``benchmarks/sparse_gpu_sweep.py`` times every
candidate against dense cuBLAS with the L2 flushed, and ``--pick`` turns its rows into this
table (:func:`pick`); the launchers look a call up here (:func:`lookup`) before falling back to
their fixed default config, and :class:`sparsellm.export.SparseGPULinear` takes its crossover to
dense from it (:func:`max_sparse_tokens`).

The table (JSON, ``version`` 1)::

    {"version": 1,
     "source": {"commit": ..., "device": ..., "torch": ..., "triton": ..., "sweeps": [...], ...},
     "min_speedup": 1.05,
     "entries": [{"format": "nm24", "dtype": "float16", "tokens": [2, 4], "shape": [4096, 11008],
                  "config": {...}, "us": ..., "dense_us": ...}, ...],
     "crossovers": [{"format": "nm24", "dtype": "float16", "shape": null, "max_sparse_tokens": 4},
                    {"format": "sell", "S": 8, "dtype": "float16", "shape": [4096, 4096], ...}, ...],
     "prefill": [{"format": "nm24", "path": "cusparselt", "dtype": "float16", "shape": null,
                  "min_tokens": 2048}, ...]}

- An entry applies to calls of its format and dtype with ``tokens[0] <= T <= tokens[1]`` and
  ``shape`` == [in_features, out_features]; an entry with ``shape`` null applies to any shape
  (the config with the best geometric-mean speedup over the swept shapes). A sell entry's
  ``config["S"]`` is the slice height it was measured at (the packing's, which a launch cannot
  change), so it applies only to weights packed with that height.
- ``config`` holds the kernel's meta-parameters and the launcher's K split (``split_k`` for
  nm24, ``split`` for sell; absent: the launcher's own choice).
- A crossover is the largest token count at which the sparse kernel still runs (above it the
  export runs dense ``F.linear``), for one shape or (``shape`` null) any other.
- A prefill entry (written by ``benchmarks/cusparselt_prefill.py --pick``) is the token count
  from which a 2:4 linear's product through cuSPARSELt (:mod:`sparsellm.export.cusparselt`, the
  plan built once per weight and token count) beats dense ``F.linear``: every measured count from
  there up won by ``min_speedup``. Without one the export runs dense above its crossover.
- bfloat16 calls use the float16 entries where the table has none of their own: the same bytes
  per weight and the same instructions but for the conversion to fp32. float32 calls use only
  float32 entries (the 16-bit-word pick, X_MODE 4, refuses float32).
- Which table is active: the one given to :func:`use` (tests), else the file named by
  ``$SPARSELLM_SPARSE_GPU_CONFIGS`` (a GPU run's sweep before it is committed), else the
  packaged ``sparse_configs.json`` beside this module. The packaged one is ignored under
  Triton's interpreter, whose small test shapes want small tiles. The environment and the file
  are read at the first launch (:func:`refresh` reads them again).

The configs are correct anywhere (each only changes block sizes); their speed, and the
crossovers, were measured on the ``source`` device only.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

VERSION = 1
ENV = "SPARSELLM_SPARSE_GPU_CONFIGS"
PACKAGED = Path(__file__).with_name("sparse_configs.json")
FORMATS = ("nm24", "sell")
# a config's keys: the kernel's meta-parameters, Triton's launch options and the launcher's split
CONFIG_KEYS = {
    "nm24": {"BLOCK_N", "BLOCK_K", "X_MODE", "STREAM", "AHEAD", "STAGES", "num_warps", "num_stages", "split_k"},
    "sell": {"S", "BLOCK_J", "STREAM", "X_SHARED", "STAGES", "num_warps", "num_stages", "split"},
}
PREFILL_FORMATS = ("nm24",)  # cuSPARSELt multiplies 2:4 weights (3:4 ones fit the pattern)
PREFILL_PATHS = ("cusparselt",)
# the speedup over dense a measured token count needs for the sparse kernel to run there: the
# sweep's medians scatter by a few percent between runs, and a path slower than dense must never
# be picked
MIN_SPEEDUP = 1.05
# a row whose output differs from the dense fp32 product by more than this (relative to its
# largest entry) is wrong, not slow: fp16 outputs round at about 1e-3
MAX_ERROR = 1e-2
DTYPES = ("float16", "bfloat16", "float32")
# nm24's X_MODEs that read the 16-bit values and x as 32-bit words: float16/bfloat16 calls only,
# so a float32 entry naming one is refused with the table, not at its first launch
NM24_WORD_X_MODES = (4,)
# the block sizes a config must name (the kernels have no default for them, so a config without
# one failed at its first launch), with their least values: powers of two (tl.arange), nm24's
# BLOCK_K whole meta words of 32 inputs
BLOCK_KEYS = {"nm24": {"BLOCK_N": 1, "BLOCK_K": 32}, "sell": {"BLOCK_J": 1}}


def _integer(value) -> bool:
    """An integer of the table: JSON's true/false are Python ints too, and no count or size."""
    return isinstance(value, int) and not isinstance(value, bool)


class ConfigTableError(ValueError):
    """A config table that cannot be used (malformed, or of another version)."""


def _fail(origin: str, what: str):
    raise ConfigTableError(f"sparse kernel config table {origin}: {what}")


def _variant(fmt: str, config: dict):
    """What a launch cannot change, so what an entry must match: sell's slice height."""
    return config.get("S") if fmt == "sell" else None


class ConfigTable:
    """A validated table (module docs); :meth:`config` and :meth:`max_sparse_tokens` answer from it."""

    def __init__(self, data: dict, origin: str = "<dict>"):
        if not isinstance(data, dict) or data.get("version") != VERSION:
            _fail(origin, f"expected a JSON object with \"version\": {VERSION}")
        self.origin = origin
        self.source = data.get("source")
        self.min_speedup = data.get("min_speedup")
        self.entries = [self._entry(e, i) for i, e in enumerate(data.get("entries", []))]
        self.crossovers = [self._crossover(c, i) for i, c in enumerate(data.get("crossovers", []))]
        self.prefill = [self._prefill(p, i) for i, p in enumerate(data.get("prefill", []))]
        self._cache: dict = {}

    def _item(self, item, where: str, formats: tuple) -> None:
        """What every kind of item holds: a format of ``formats``, a dtype, a shape or null."""
        if not isinstance(item, dict) or item.get("format") not in formats:
            _fail(self.origin, f"{where}: format must be one of {formats}")
        if item.get("dtype") not in DTYPES:
            _fail(self.origin, f"{where}: dtype must be one of {DTYPES}, got {item.get('dtype')!r}")
        shape = item.get("shape")
        if shape is not None and not (isinstance(shape, list) and len(shape) == 2
                                      and all(_integer(v) and v > 0 for v in shape)):
            _fail(self.origin, f"{where}: shape must be null or [in_features, out_features], got {shape!r}")

    def _count(self, item, key: str, least: int, where: str) -> None:
        if not _integer(item.get(key)) or item[key] < least:
            _fail(self.origin, f"{where}: {key} must be an integer >= {least}, got {item.get(key)!r}")

    def _entry(self, e, i: int) -> dict:
        where = f"entries[{i}]"
        self._item(e, where, FORMATS)
        tokens = e.get("tokens")
        if (not isinstance(tokens, list) or len(tokens) != 2 or not all(_integer(t) for t in tokens)
                or not 1 <= tokens[0] <= tokens[1]):
            _fail(self.origin, f"{where}: tokens must be [first, last] with 1 <= first <= last, got {tokens!r}")
        config = e.get("config")
        if not isinstance(config, dict) or not config:
            _fail(self.origin, f"{where}: config must be a non-empty object")
        unknown = set(config) - CONFIG_KEYS[e["format"]]
        if unknown:
            _fail(self.origin, f"{where}: unknown {e['format']} config keys {sorted(unknown)}")
        if not all(_integer(v) and v >= 0 for v in config.values()):
            _fail(self.origin, f"{where}: config values must be non-negative integers, got {config}")
        if e["format"] == "nm24" and e["dtype"] == "float32" and config.get("X_MODE") in NM24_WORD_X_MODES:
            _fail(self.origin, f"{where}: X_MODE {config['X_MODE']} reads 16-bit words; a float32 entry cannot use it")
        if e["format"] == "sell" and "S" not in config:
            _fail(self.origin, f"{where}: a sell config names its slice height S")
        # sell_linear refuses X_SHARED for a token block: refused with the table, not at the
        # first call of more than one token
        if e["format"] == "sell" and config.get("X_SHARED") and tokens[1] > 1:
            _fail(self.origin, f"{where}: X_SHARED stages one token's input: the entry must cover one token only, "
                               f"got tokens {tokens}")
        for key, least in BLOCK_KEYS[e["format"]].items():
            size = config.get(key)
            if not _integer(size) or size < least or size & (size - 1):
                _fail(self.origin, f"{where}: a {e['format']} config names {key}, a power of two >= {least}, "
                                   f"got {size!r}")
        return e

    def _crossover(self, c, i: int) -> dict:
        where = f"crossovers[{i}]"
        self._item(c, where, FORMATS)
        if (c["format"] == "sell") != _integer(c.get("S")):
            _fail(self.origin, f"{where}: a sell crossover names its slice height S (an nm24 one none)")
        self._count(c, "max_sparse_tokens", 0, where)
        return c

    def _prefill(self, p, i: int) -> dict:
        where = f"prefill[{i}]"
        self._item(p, where, PREFILL_FORMATS)
        if p.get("path") not in PREFILL_PATHS:
            _fail(self.origin, f"{where}: path must be one of {PREFILL_PATHS}, got {p.get('path')!r}")
        self._count(p, "min_tokens", 1, where)
        return p

    @staticmethod
    def _dtypes(dtype: str) -> tuple:
        return (dtype, "float16") if dtype == "bfloat16" else (dtype,)

    @staticmethod
    def _matches(item: dict, fmt: str, in_features: int, out_features: int, slice_rows: int | None) -> bool:
        s = (item["config"] if "config" in item else item).get("S")
        return (item["format"] == fmt and s == (slice_rows if fmt == "sell" else None)
                and item.get("shape") in (None, [in_features, out_features]))

    def _find(self, items: list, fmt: str, dtype, in_features: int, out_features: int,
              slice_rows: int | None = None, keep=lambda item: True) -> dict | None:
        """Among ``items`` that fit a call (and ``keep``), this shape's own, else the any-shape
        one; bfloat16 falls back to float16's (module docs)."""
        for want in self._dtypes(str(dtype).removeprefix("torch.")):
            mine = [it for it in items if it["dtype"] == want and keep(it)
                    and self._matches(it, fmt, in_features, out_features, slice_rows)]
            if mine:
                return min(mine, key=lambda it: it.get("shape") is None)
        return None

    def config(self, fmt: str, dtype, tokens: int, in_features: int, out_features: int,
               slice_rows: int | None = None) -> dict | None:
        """The measured config for a call (a copy), or None. ``dtype``: a torch dtype or its
        name (the cache keys on it as given: a launch pays one dict lookup)."""
        key = (fmt, dtype, tokens, in_features, out_features, slice_rows)
        if key not in self._cache:
            entry = self._find(self.entries, fmt, dtype, in_features, out_features, slice_rows,
                               keep=lambda e: e["tokens"][0] <= tokens <= e["tokens"][1])
            self._cache[key] = None if entry is None else entry["config"]
        found = self._cache[key]
        return None if found is None else dict(found)

    def max_sparse_tokens(self, fmt: str, dtype, in_features: int, out_features: int,
                          slice_rows: int | None = None) -> int | None:
        """The measured crossover of a linear (this shape's, else the any-shape one), or None."""
        found = self._find(self.crossovers, fmt, dtype, in_features, out_features, slice_rows)
        return None if found is None else found["max_sparse_tokens"]

    def prefill_min_tokens(self, fmt: str, dtype, in_features: int, out_features: int,
                           path: str = "cusparselt") -> int | None:
        """The token count from which ``path`` beats dense for a linear (this shape's, else
        the any-shape one), or None: dense."""
        found = self._find(self.prefill, fmt, dtype, in_features, out_features, keep=lambda p: p["path"] == path)
        return None if found is None else found["min_tokens"]

    def describe(self) -> dict:
        """Where the table came from, for reports."""
        return {"origin": self.origin, "source": self.source, "entries": len(self.entries),
                "crossovers": len(self.crossovers), "prefill": len(self.prefill)}


_loaded: dict = {}  # path -> table
_override: list = []  # the tables given to use(), innermost last
_resolved: list = []  # [the table the environment chose, or None], once resolved


def load(path) -> ConfigTable:
    """The table in a JSON file (ConfigTableError if it is unreadable or malformed)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigTableError(f"sparse kernel config table {path}: {exc}") from exc
    return ConfigTable(data, str(path))


def save(table: dict, path) -> ConfigTable:
    """Write ``table`` to ``path`` as JSON once it validates (ConfigTableError if not, or if the
    file cannot be written; then nothing is written); through a temporary file beside it, so a failed write leaves any old
    table whole. Returns the loaded table."""
    path = Path(path)
    checked = ConfigTable(table, str(path))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(table, indent=1))
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigTableError(f"sparse kernel config table {path}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return checked


def pick_options_error(min_speedup: float, stored: str | None, pick: str | None) -> str | None:
    """What is wrong with a picking script's ``--min-speedup``/``--from``/``--pick``, or None."""
    if not min_speedup > 0:  # also refuses NaN
        return f"--min-speedup must be > 0, got {min_speedup}"
    if stored and not pick:
        return "--from only feeds --pick: name the table to write"
    return None


def _cached(path, why: str) -> ConfigTable:
    """A file's table, read once per process (a launch must not stat files: microseconds a call)."""
    path = str(path)
    if path not in _loaded:
        try:
            _loaded[path] = load(path)
        except ConfigTableError as exc:
            raise ConfigTableError(f"{exc} ({why})") from exc
    return _loaded[path]


def active() -> ConfigTable | None:
    """The table in effect (module docs), or None: the launchers' fixed defaults. The
    environment is read once (a launch must not pay for it): :func:`refresh` reads it again."""
    if _override:
        return _override[-1]
    if not _resolved:
        env = os.environ.get(ENV)
        if env:
            table = _cached(env, f"named by ${ENV}")
        elif os.environ.get("TRITON_INTERPRET") == "1" or not PACKAGED.is_file():
            table = None
        else:
            table = _cached(PACKAGED, "packaged with sparsellm")
        _resolved.append(table)
    return _resolved[0]


def refresh() -> None:
    """Forget the tables read so far and the environment's choice (after changing either)."""
    _loaded.clear()
    _resolved.clear()


@contextlib.contextmanager
def use(table: ConfigTable | dict | None):
    """Make ``table`` the active one inside the block (None: no table, the fixed defaults)."""
    if isinstance(table, dict):
        table = ConfigTable(table)
    _override.append(table)
    try:
        yield table
    finally:
        _override.pop()


def lookup(fmt: str, dtype, tokens: int, in_features: int, out_features: int,
           slice_rows: int | None = None) -> dict | None:
    """The active table's config for a call (``dtype`` a torch dtype or its name), or None."""
    table = active()
    if table is None:
        return None
    return table.config(fmt, dtype, tokens, in_features, out_features, slice_rows)


def max_sparse_tokens(fmt: str, dtype, in_features: int, out_features: int,
                      slice_rows: int | None = None) -> int | None:
    """The active table's crossover for a linear, or None (the export's constants)."""
    table = active()
    if table is None:
        return None
    return table.max_sparse_tokens(fmt, dtype, in_features, out_features, slice_rows)


def prefill_min_tokens(fmt: str, dtype, in_features: int, out_features: int, path: str = "cusparselt") -> int | None:
    """The active table's prefill crossover for a linear, or None (dense above the decode crossover)."""
    table = active()
    if table is None:
        return None
    return table.prefill_min_tokens(fmt, dtype, in_features, out_features, path)


def describe() -> dict:
    """The active table's origin (for reports); {"origin": None} when the defaults run."""
    table = active()
    return {"origin": None} if table is None else table.describe()


# ------------------------------------------------------------------ from sweep rows to a table

def row_ok(row: dict) -> bool:
    """Whether a sweep row is a kernel config that ran and matched the dense product."""
    return row.get("impl") not in (None, "dense") and "us" in row and row.get("err", math.inf) < MAX_ERROR


def _speedups(rows: list[dict]) -> tuple[dict, dict]:
    """{(format, dtype, variant, tokens): {shape: {config json: speedup}}} of the correct rows,
    and the dense times they are relative to, {(format, dtype, tokens, shape): us}."""
    dense = {(r["format"], r["dtype"], r["tokens"], tuple(r["shape"])): r["us"]
             for r in rows if r.get("impl") == "dense" and "us" in r}
    out: dict = {}
    for r in rows:
        if not row_ok(r):
            continue
        base = dense.get((r["format"], r["dtype"], r["tokens"], tuple(r["shape"])))
        if base is None:
            continue
        group = (r["format"], r["dtype"], _variant(r["format"], r["config"]), r["tokens"])
        per_shape = out.setdefault(group, {}).setdefault(tuple(r["shape"]), {})
        key = json.dumps(r["config"], sort_keys=True)
        # a config timed twice (merged sweeps) keeps its faster median
        per_shape[key] = max(per_shape.get(key, 0.0), base / r["us"])
    return out, dense


def _contiguous_crossover(tokens: list[int], wins: dict, min_speedup: float) -> int | None:
    """The largest measured token count up to which every measured count wins (1 must be among
    them), 0 when one token already loses, None when 1 token was not measured. Counts between
    two measured ones take the next one's verdict: below 16 tokens a dense linear's time is its
    weight read, flat in the token count, and the sparse kernels' token blocks are powers of two."""
    if not tokens or tokens[0] != 1:
        return None
    best = 0
    for t in tokens:
        if wins.get(t, 0.0) < min_speedup:  # a count with no correct config loses
            break
        best = t
    return best


def pick(rows: list[dict], *, source: dict | None = None, min_speedup: float = MIN_SPEEDUP) -> dict:
    """A table (module docs) from sweep rows (``benchmarks/sparse_gpu_sweep.py``'s JSON rows):
    per (format, dtype, slice height, measured token count) each shape's fastest correct config,
    plus the any-shape config of best geometric-mean speedup among those correct at every shape;
    a measured count's entry covers the counts above the next smaller measured one (one token
    only a one-token entry). Crossovers: per shape from its own entries (a count where no config
    of the shape ran correctly loses), for any shape from the any-shape configs' worst shape."""
    speed, dense = _speedups(rows)
    entries, crossovers = [], []
    families = sorted({g[:3] for g in speed}, key=lambda g: (g[0], g[1], g[2] or 0))
    for fmt, dtype, variant in families:
        counts = sorted(t for f, d, v, t in speed if (f, d, v) == (fmt, dtype, variant))
        shape_wins: dict = {}
        any_wins: dict = {}
        for i, t in enumerate(counts):
            # one token is its own regime (the one-token kernels): only a one-token row covers it
            first = counts[i - 1] + 1 if i else min(t, 2)
            per_shape = speed[(fmt, dtype, variant, t)]
            for shape, configs in sorted(per_shape.items()):
                key, s = max(configs.items(), key=lambda kv: kv[1])
                entries.append({"format": fmt, "dtype": dtype, "tokens": [first, t], "shape": list(shape),
                                "config": json.loads(key), "speedup": round(s, 4),
                                "dense_us": round(dense[(fmt, dtype, t, shape)], 3)})
                shape_wins.setdefault(shape, {})[t] = s
            common = set.intersection(*(set(c) for c in per_shape.values()))
            if common:
                key = max(sorted(common), key=lambda k: sum(math.log(per_shape[sh][k]) for sh in per_shape))
                worst = min(per_shape[sh][key] for sh in per_shape)
                entries.append({"format": fmt, "dtype": dtype, "tokens": [first, t], "shape": None,
                                "config": json.loads(key), "worst_speedup": round(worst, 4),
                                "shapes": [list(sh) for sh in sorted(per_shape)]})
                any_wins[t] = worst
            else:
                any_wins[t] = 0.0  # no config ran at every shape: nothing to pick for other shapes
        extra = {"S": variant} if fmt == "sell" else {}
        for shape, wins in sorted(shape_wins.items()):
            m = _contiguous_crossover(counts, wins, min_speedup)
            if m is not None:
                crossovers.append({"format": fmt, **extra, "dtype": dtype, "shape": list(shape),
                                   "max_sparse_tokens": m})
        m = _contiguous_crossover(counts, any_wins, min_speedup)
        if m is not None:
            crossovers.append({"format": fmt, **extra, "dtype": dtype, "shape": None, "max_sparse_tokens": m})
    return {"version": VERSION, "source": source or {}, "min_speedup": min_speedup,
            "entries": entries, "crossovers": crossovers}


def _from_here_up(tokens: list[int], wins: dict, min_speedup: float) -> int | None:
    """The smallest measured token count from which every larger measured count wins, or None
    when the largest loses. Counts between two measured ones take the larger one's verdict (dense
    between them); counts above the largest measured take its verdict: a larger GEMM is more
    compute-bound, the regime where the sparse tensor cores gain."""
    first = None
    for t in sorted(tokens, reverse=True):
        if wins.get(t, 0.0) < min_speedup:
            break
        first = t
    return first


def pick_prefill(rows: list[dict], dtype: str, *, min_speedup: float = MIN_SPEEDUP, path: str = "cusparselt",
                 key: str = "ours") -> list[dict]:
    """The prefill entries (module docs) from ``benchmarks/cusparselt_prefill.py``'s rows (``in``,
    ``out``, ``tokens``, ``dense_ms``, ``{key}_ms``, ``{key}_err`` the largest absolute error
    against dense, ``ref_max_abs``): per shape the token count from which it beats dense, and for
    any other shape the largest of those (None anywhere: no any-shape entry). A wrong or failed
    measurement counts as a loss."""
    wins: dict = {}
    for r in rows:
        ok = (f"{key}_ms" in r and "dense_ms" in r and r.get(f"{key}_err", math.inf)
              <= MAX_ERROR * max(r.get("ref_max_abs", 0.0), 1e-30))
        wins.setdefault((r["in"], r["out"]), {})[r["tokens"]] = r["dense_ms"] / r[f"{key}_ms"] if ok else 0.0
    entries, firsts = [], []
    for shape, by_tokens in sorted(wins.items()):
        first = _from_here_up(list(by_tokens), by_tokens, min_speedup)
        firsts.append(first)
        if first is not None:
            entries.append({"format": "nm24", "path": path, "dtype": dtype, "shape": list(shape), "min_tokens": first,
                            "speedups": {str(t): round(v, 4) for t, v in sorted(by_tokens.items())}})
    if firsts and None not in firsts:
        entries.append({"format": "nm24", "path": path, "dtype": dtype, "shape": None, "min_tokens": max(firsts),
                        "shapes": [list(sh) for sh in sorted(wins)]})
    return entries
