"""Calibration and evaluation text: the offline default ``wiki`` and the literature's data sets.

``load_split`` gives a split's raw text, ``calibration_windows`` the calibration windows of the
SparseGPT/Wanda sampler, ``eval_tokens`` the evaluation stream; ``sources`` documents the forms
a source string can take.
"""
from .sources import (C4_EVAL_DOCS, C4_EVAL_WINDOWS, LAYOUTS, SOURCES, SPLITS, DataSourceError, Source,
                      check_source, default_wiki_dump, load_split, parse_source, wiki_articles)
from .tokens import Calibration, calibration_windows, eval_tokens, token_stream

__all__ = [
    "SOURCES", "SPLITS", "LAYOUTS", "C4_EVAL_DOCS", "C4_EVAL_WINDOWS", "DataSourceError", "Source",
    "parse_source", "check_source", "load_split", "wiki_articles", "default_wiki_dump",
    "Calibration", "calibration_windows", "eval_tokens", "token_stream",
]
