"""Raw text of the calibration and evaluation data sets.

A *source* string names where the text comes from:

* ``wiki``: the offline default, a shortened English Wikipedia dump that ships inside gensim's
  wheel (no download). ``wiki:PATH`` reads another MediaWiki ``.xml.bz2`` dump the same way.
* ``wikitext2``, ``ptb``, ``c4``: the data sets of the SparseGPT/Wanda literature, read with the
  optional ``datasets`` library from the Hugging Face hub, or ``NAME:PATH`` for a local folder
  holding the data set's usual raw files (see ``LAYOUTS``).
* a path to a local ``.txt`` file (the whole text serves both splits) or a ``.jsonl``/``.json``
  file of records with a ``"text"`` field (all records, joined with blank lines, serve both).

Every split is reproduced with the joins of the reference code, so that numbers stay comparable
with the papers (see the comments at each loader).
"""
from __future__ import annotations

import bz2
import contextlib
import functools
import gzip
import importlib.util
import io
import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

SOURCES = ("wiki", "wikitext2", "ptb", "c4")
SPLITS = ("calib", "eval")

# C4 evaluation in SparseGPT: the first 1100 validation documents, truncated to 256 windows.
C4_EVAL_DOCS = 1100
C4_EVAL_WINDOWS = 256

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_CALIB_SHARE = (4, 5)  # first 4/5 of the articles calibrate, the last fifth evaluates

# The raw files each data set is distributed as; NAME:PATH points at a folder holding them.
# Each entry lists the accepted names of one split, first match wins.
LAYOUTS = {
    "wikitext2": {"calib": ("wiki.train.raw",), "eval": ("wiki.test.raw",)},
    "ptb": {"calib": ("ptb.train.txt",), "eval": ("ptb.test.txt",)},
    "c4": {
        "calib": ("c4-train.00000-of-01024.json.gz", "c4-train.00000-of-01024.json",
                  "en/c4-train.00000-of-01024.json.gz", "en/c4-train.00000-of-01024.json"),
        "eval": ("c4-validation.00000-of-00008.json.gz", "c4-validation.00000-of-00008.json",
                 "en/c4-validation.00000-of-00008.json.gz", "en/c4-validation.00000-of-00008.json"),
    },
}

# Local single files accepted as a bare path (optionally gzip-compressed).
TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".jsonl", ".json")


class DataSourceError(ValueError):
    """A calibration/evaluation source that cannot be read, with what to do about it."""


@dataclass(frozen=True)
class Source:
    """A parsed source string. ``stamp`` holds (mtime, size) of the local files, so that the
    in-process caches notice a file rewritten between two calls."""

    kind: str  # one of SOURCES, or "text" / "json" for a bare local file
    path: str | None = None
    stamp: tuple = ()

    @property
    def label(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


# --------------------------------------------------------------------------- parsing

def _known() -> str:
    return ", ".join(SOURCES)


def _bare_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(JSON_SUFFIXES):
        return "json"
    return None


def _stamp(paths: Sequence[Path]) -> tuple:
    """Each local file's identity for the caches (resolved path, mtime, ctime, inode, size); a file that cannot be read
    is refused here, when the source is parsed, not when its text is first needed."""
    out = []
    for p in paths:
        if not os.access(p, os.R_OK):
            raise DataSourceError(f"data file {p} cannot be read (permission denied)")
        p = p.resolve()  # a relative path means another file after a chdir
        st = p.stat()
        # ctime and inode as well: a copy that keeps the old mtime and size (cp -p, rsync -a, tar x)
        # still changes them
        out.append((str(p), st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_size))
    return tuple(out)


def _layout_file(kind: str, folder: Path, split: str) -> Path:
    for name in LAYOUTS[kind][split]:
        candidate = folder / name
        if candidate.is_file():
            return candidate
    expected = " or ".join(LAYOUTS[kind][split])
    raise DataSourceError(f"{kind}: no {split} file in {folder} (expected {expected})")


def _detect_folder(folder: Path) -> str | None:
    """The data set whose raw files a folder holds, so a bare folder path also works."""
    for kind, layout in LAYOUTS.items():
        if any((folder / n).is_file() for names in layout.values() for n in names):
            return kind
    return None


def parse_source(source: str) -> Source:
    """Turn a source string into a ``Source``; raises DataSourceError naming the known forms."""
    if not isinstance(source, str) or not source.strip():
        raise DataSourceError(f"empty data source; known sources: {_known()}, NAME:PATH, or a .txt/.jsonl path")
    source = source.strip()
    if source in SOURCES:
        return Source(source)
    name, sep, rest = source.partition(":")
    if sep and name in SOURCES:
        if not rest:
            raise DataSourceError(f"{source!r}: empty path after '{name}:'")
        path = Path(rest).expanduser()
        if not path.exists():
            raise DataSourceError(f"{name}: local path {path} does not exist")
        if name == "wiki":
            if not path.is_file():
                raise DataSourceError(f"wiki:PATH expects a MediaWiki .xml.bz2 dump file, got the folder {path}")
            return Source("wiki", str(path), _stamp([path]))
        if not path.is_dir():
            raise DataSourceError(f"{name}:PATH expects a folder holding "
                                  f"{LAYOUTS[name]['calib'][0]} and {LAYOUTS[name]['eval'][0]}, got the file {path}")
        files = [_layout_file(name, path, split) for split in SPLITS]
        return Source(name, str(path), _stamp(files))
    path = Path(source).expanduser()
    kind = _bare_kind(path)
    if kind is not None:
        if not path.is_file():
            raise DataSourceError(f"data file {path} not found")
        return Source(kind, str(path), _stamp([path]))
    if path.is_dir():
        detected = _detect_folder(path)
        if detected is None:
            raise DataSourceError(f"folder {path} holds none of the known raw layouts; pass NAME:PATH "
                                  f"with NAME one of {', '.join(LAYOUTS)}, or a .txt/.jsonl file")
        return parse_source(f"{detected}:{path}")
    if path.exists():
        raise DataSourceError(f"{path}: unsupported file type; use a .txt, .jsonl or .json file "
                              f"(optionally .gz), or NAME:PATH with NAME one of {_known()}")
    raise DataSourceError(f"unknown data source {source!r}; known sources: {_known()}, "
                          f"NAME:PATH for local files of one of them, or a path to a .txt/.jsonl/.json file")


def check_source(source: str) -> None:
    """Fail now, not after minutes of work, on a source that cannot be read: local paths are
    checked by :func:`parse_source`, the offline default needs gensim's dump, the hub data sets
    need the ``datasets`` package (whether the hub answers is only known when they load)."""
    src = parse_source(source)
    if src.kind == "wiki" and src.path is None:
        default_wiki_dump()
    elif src.kind in SOURCES and src.path is None and importlib.util.find_spec("datasets") is None:
        _load_dataset(src.kind)  # raises the error that names the extra and the offline options


# --------------------------------------------------------------------------- file readers

@contextlib.contextmanager
def _open_text(path: str | Path):
    """A (possibly gzip-compressed) file as UTF-8 text with universal newlines, a leading byte
    order mark dropped; a file that is not UTF-8 (or not gzip) is a DataSourceError naming it."""
    path = str(path)
    gz = path.lower().endswith(".gz")  # as _bare_kind matches the suffix
    try:
        with (io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig") if gz
              else open(path, encoding="utf-8-sig")) as f:
            yield f
    # gzip.BadGzipFile is an OSError; a truncated stream raises EOFError, a damaged one zlib.error
    except (UnicodeDecodeError, OSError, EOFError, zlib.error) as err:
        raise DataSourceError(f"{path}: cannot be read as UTF-8 text{' in gzip' if gz else ''} ({err})") from None


def _json_texts(path: str | Path) -> list[str]:
    """The "text" fields of a JSON-lines file, or of a JSON array / {"text": [...]} document."""
    with _open_text(path) as f:
        content = f.read()
    try:
        # a JSON document: an array of records, or one record
        whole = json.loads(content)
        records = whole if isinstance(whole, list) else [whole]
    except RecursionError:
        raise DataSourceError(f"{path}: JSON nested too deeply to read") from None
    except json.JSONDecodeError:
        records = []  # JSON lines: one record per line (fails fast above at the second record)
        # "\n" only: splitlines() also splits inside a record at U+2028, U+2029 and U+0085, which
        # JSON strings may hold unescaped
        for lineno, line in enumerate(content.split("\n"), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataSourceError(f"{path}:{lineno}: neither JSON nor JSON lines ({e.msg})") from None
            except RecursionError:
                raise DataSourceError(f"{path}:{lineno}: JSON nested too deeply to read") from None
    if len(records) == 1 and isinstance(records[0], dict) and isinstance(records[0].get("text"), list):
        records = records[0]["text"]  # a column-style {"text": [...]} document
    texts = []
    for n, rec in enumerate(records, 1):
        text = rec if isinstance(rec, str) else rec.get("text") if isinstance(rec, dict) else None
        if not isinstance(text, str):
            raise DataSourceError(f"{path}: record {n} has no string \"text\" field")
        try:  # JSON may escape a lone UTF-16 surrogate (\ud800), which no tokenizer takes
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise DataSourceError(f"{path}: record {n}'s text is not valid Unicode ({err.reason} at "
                                  f"character {err.start})") from None
        texts.append(text)
    if not texts:
        raise DataSourceError(f"{path}: no records with a \"text\" field")
    return texts


def _wikitext_rows(path: Path) -> list[str]:
    # The rows of the hub's wikitext-2-raw-v1 are the lines of wiki.*.raw, newline kept, with
    # whitespace-only lines emptied (its loading script: `{"text": row if row.strip() else ""}`),
    # so a local copy reproduces the hub text exactly.
    with _open_text(path) as f:
        return [row if row.strip() else "" for row in f]


def _ptb_rows(path: Path) -> list[str]:
    # ptb_text_only's loading script yields every line stripped as the "sentence" field.
    with _open_text(path) as f:
        return [line.strip() for line in f]


# --------------------------------------------------------------------------- hub readers

def _load_dataset(*args, **kwargs):
    try:
        import datasets  # optional extra: pip install 'sparsellm[datasets]'
    except ImportError:
        raise DataSourceError(
            f"reading {args[0]!r} from the Hugging Face hub needs the optional 'datasets' package "
            "(pip install 'sparsellm[datasets]'); or pass local files as NAME:PATH, "
            "or use the offline default 'wiki'") from None
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # offline, hub errors, missing files: all say the same thing to the user
        raise DataSourceError(
            f"could not load {args[0]!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "download the raw files and pass them as NAME:PATH (wikitext2: a folder with "
            "wiki.train.raw/wiki.test.raw; ptb: ptb.train.txt/ptb.test.txt; c4: "
            "c4-train.00000-of-01024.json.gz/c4-validation.00000-of-00008.json.gz), "
            "or use the offline default 'wiki'") from e


class _Column(Sequence):
    """Lazy random access to one string column of a datasets.Dataset (memory-mapped arrow):
    the C4 shard holds ~356k documents, which need not all become Python strings."""

    def __init__(self, dataset, field: str):
        self._dataset, self._field = dataset, field

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._dataset[i][self._field]
        return self._dataset[int(i)][self._field]


def _hub_rows(kind: str, split: str) -> Sequence[str]:
    if kind == "wikitext2":
        ds = _load_dataset("wikitext", "wikitext-2-raw-v1", split="train" if split == "calib" else "test")
        return ds["text"]
    if kind == "ptb":
        ds = _load_dataset("ptb_text_only", "penn_treebank", split="train" if split == "calib" else "test")
        return ds["sentence"]
    if kind == "c4":
        if split == "calib":
            ds = _load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"},
                               split="train")
        else:
            ds = _load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                               split="validation")
        return _Column(ds, "text")
    raise AssertionError(kind)


# --------------------------------------------------------------------------- the offline default

def default_wiki_dump() -> Path:
    """The Wikipedia extract in gensim's wheel, located without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError("the offline default 'wiki' reads a Wikipedia extract shipped with gensim; "
                              "install it (pip install 'gensim>=4.3.3') or pass another source")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / WIKI_DUMP
    if not path.is_file():
        raise DataSourceError(f"{path} not found: this gensim install lacks its test data; "
                              "reinstall gensim from its wheel (pip install --force-reinstall gensim)")
    return path


def wiki_articles(path: str | Path | None = None) -> list[str]:
    """Plain text of the articles of a MediaWiki dump, in dump order (the 'wiki' protocol).

    Redirect pages (raw text starting with #REDIRECT, any case) are dropped; each article is
    gensim's ``filter_wiki`` of the raw markup with runs of two or more apostrophes (wiki
    bold/italic marks that filter_wiki leaves) removed, then stripped of surrounding whitespace.
    The title is not included. These choices reproduce the reference token counts of the
    default dump exactly (see tests/test_data.py).
    """
    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    except ImportError as e:
        raise DataSourceError(f"the 'wiki' source parses its dump with gensim, which failed to import ({e}); "
                              "install it with pip install 'gensim>=4.3.3'") from None
    path = Path(path) if path is not None else default_wiki_dump()
    articles = []
    try:
        with bz2.open(path, "rb") if str(path).endswith(".bz2") else open(path, "rb") as f:
            for _title, raw, _pageid in extract_pages(f):
                if raw.lstrip().lower().startswith("#redirect"):
                    continue
                text = re.sub(r"'{2,}", "", filter_wiki(raw)).strip()
                if text:  # pages without text (none in the default dump) would only add blank lines
                    articles.append(text)
    # ParseError is a SyntaxError; gensim raises ValueError for XML that is not a MediaWiki dump
    except (OSError, EOFError, SyntaxError, ValueError) as e:
        raise DataSourceError(f"{path}: not a readable MediaWiki XML dump ({type(e).__name__}: {e})") from None
    return articles


@functools.lru_cache(maxsize=2)
def _wiki_articles_of(src: Source) -> list[str]:
    # keyed by the Source (path and file stamp): both splits come from one parse of the dump
    return wiki_articles(src.path)


def _wiki_split(src: Source, split: str) -> str:
    path = src.path
    articles = _wiki_articles_of(src)
    if len(articles) < 2:
        raise DataSourceError(f"{path or 'wiki'}: {len(articles)} article(s); need at least 2 to split "
                              "into calibration and evaluation parts")
    num, den = WIKI_CALIB_SHARE
    cut = len(articles) * num // den  # 106 articles -> 84 calibration, 22 evaluation
    part = articles[:cut] if split == "calib" else articles[cut:]
    return "\n\n".join(part)


# --------------------------------------------------------------------------- splits

@functools.lru_cache(maxsize=4)
def c4_documents(src: Source, split: str) -> Sequence[str]:
    """The documents of a C4 shard (train for "calib", validation for "eval"), in file order."""
    if src.path is None:
        return _hub_rows("c4", split)
    return _json_texts(_layout_file("c4", Path(src.path), split))


@functools.lru_cache(maxsize=8)
def _split_text(src: Source, split: str) -> str:
    if src.kind == "wiki":
        return _wiki_split(src, split)
    if src.kind == "text":
        with _open_text(src.path) as f:
            return f.read()  # the whole file serves both splits
    if src.kind == "json":
        return "\n\n".join(_json_texts(src.path))
    if src.kind == "wikitext2":
        rows = _wikitext_rows(_layout_file("wikitext2", Path(src.path), split)) if src.path else _hub_rows("wikitext2", split)
        # SparseGPT/Wanda (datautils.get_wikitext2): train joined with " ", test with "\n\n".
        return (" " if split == "calib" else "\n\n").join(rows)
    if src.kind == "ptb":
        rows = _ptb_rows(_layout_file("ptb", Path(src.path), split)) if src.path else _hub_rows("ptb", split)
        # SparseGPT/Wanda (datautils.get_ptb): both splits joined with " ".
        return " ".join(rows)
    if src.kind == "c4":
        docs = c4_documents(src, split)
        if split == "calib":
            # Calibration samples whole documents (see tokens.calibration_windows); as one text,
            # the documents are separated by blank lines.
            return "\n\n".join(docs[:])
        # SparseGPT (datautils.get_c4): the first 1100 validation documents joined with " ";
        # the token stream is then cut to 256 windows (tokens.eval_tokens).
        return " ".join(docs[:C4_EVAL_DOCS])
    raise AssertionError(src.kind)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def load_split(source: str, split: str) -> str:
    """The raw text of the "calib" or "eval" split of ``source`` (see the module docstring)."""
    check_split(split)
    return _split_text(parse_source(source), split)
