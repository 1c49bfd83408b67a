"""Token streams, calibration windows and evaluation streams of the data sources.

The sampler is the one of the SparseGPT/Wanda reference code (``datautils.py``), so that a given
seed picks the same windows as there: ``random.seed(seed)``, then per sample
``i = random.randint(0, N - seqlen - 1)`` and the window ``ids[i:i + seqlen]``. A private
``random.Random(seed)`` draws the very same numbers without touching the global generator.
"""
from __future__ import annotations

import functools
import hashlib
import random
import weakref
from dataclasses import dataclass

import torch

from .sources import (C4_EVAL_WINDOWS, DataSourceError, Source, _split_text, c4_documents,
                      parse_source)


# tokenizer -> ((its vocabulary size, Python-side options) then, its fingerprint): Elsa draws
# fresh windows every training step, and serialising a fast backend takes tens of milliseconds
# (71 ms a draw against 0.1 ms)
_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _encoding_fingerprint(tokenizer) -> str:
    """What decides how ``tokenizer`` encodes beyond where it was loaded from: a fast tokenizer's
    whole backend definition (options given at load time, e.g. ``add_bos_token``, change its
    post-processor), else the options it was loaded with; and the flags a tokenizer may apply
    in Python. Computed once per tokenizer object, and again when tokens were added to it or
    its Python-side options changed since (setting ``add_bos_token`` or ``bos_token`` on a
    loaded tokenizer rewrites its post-processor); a hand edit of the backend itself is not
    seen."""
    state = (len(tokenizer), _python_options(tokenizer))
    try:
        seen, known = _FINGERPRINTS.get(tokenizer, (None, None))
    except TypeError:  # not weakly referenceable: computed every time
        seen, known = None, None
    if known is not None and seen == state:
        return known
    fingerprint = _fingerprint_now(tokenizer)
    try:
        _FINGERPRINTS[tokenizer] = (state, fingerprint)
    except TypeError:
        pass
    return fingerprint


def _python_options(tokenizer) -> str:
    return repr([getattr(tokenizer, name, None) for name in ("add_bos_token", "add_eos_token", "bos_token",
                                                               "eos_token")])


def _fingerprint_now(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = repr(sorted((str(k), str(v)) for k, v in (getattr(tokenizer, "init_kwargs", None) or {}).items()))
    return hashlib.sha256((text + _python_options(tokenizer)).encode()).hexdigest()


class _TokKey:
    """Hashable handle of a tokenizer for the caches: two tokenizers loaded from the same place
    (same class, name_or_path and vocabulary size) with the same options (the same
    :func:`_encoding_fingerprint`) tokenize alike, so they share cache entries."""

    __slots__ = ("tokenizer", "key")

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.key = (type(tokenizer).__qualname__, str(getattr(tokenizer, "name_or_path", "") or ""),
                    len(tokenizer), _encoding_fingerprint(tokenizer))

    @property
    def cacheable(self) -> bool:
        # a tokenizer built in memory has no name_or_path: nothing tells two of them apart
        return bool(self.key[1])

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other) -> bool:
        return isinstance(other, _TokKey) and self.key == other.key


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's default special tokens (the reference code calls
    ``tokenizer(text)``; SmolLM2's tokenizer adds no BOS). ``verbose=False`` silences the
    "sequence length is longer than the specified maximum" warning: the whole split is tokenized
    at once on purpose and only cut into model-sized windows afterwards."""
    return list(tokenizer(text, verbose=False)["input_ids"])


def _stream_uncached(src: Source, split: str, tok: _TokKey) -> torch.Tensor:
    return torch.tensor(encode(tok.tokenizer, _split_text(src, split)), dtype=torch.long)


_stream_cached = functools.lru_cache(maxsize=8)(_stream_uncached)


def token_stream(src: Source, split: str, tokenizer) -> torch.Tensor:
    """The 1-D token ids of one split, tokenized once per process (calibration and evaluation of
    the same source repeat within a run, and across runs of one process)."""
    if src.kind in ("text", "json"):
        split = "calib"  # one text serves both splits: tokenize it once
    tok = _TokKey(tokenizer)
    return (_stream_cached if tok.cacheable else _stream_uncached)(src, split, tok)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _c4_windows(src: Source, tokenizer, nsamples: int, seqlen: int, rng: random.Random) -> list[torch.Tensor]:
    # SparseGPT/Wanda get_c4: draw a random document until one has more than seqlen tokens,
    # then a random window inside it.
    docs = c4_documents(src, "calib")
    if len(docs) == 0:
        raise DataSourceError(f"{src.label}: the C4 training shard has no documents")
    short: dict[int, int] = {}  # documents known to be too short -> their token counts
    windows = []
    for _ in range(nsamples):
        while True:
            d = rng.randint(0, len(docs) - 1)
            if d in short:
                continue  # re-tokenizing would reject it again; the draws stay those of the reference
            ids = encode(tokenizer, docs[d])
            if len(ids) > seqlen:
                break
            short[d] = len(ids)
            if len(short) == len(docs):  # the reference would loop forever here
                raise DataSourceError(
                    f"{src.label}: no C4 training document has more than {seqlen} tokens (the longest has "
                    f"{max(short.values())}); lower seqlen or use more documents")
        i = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(torch.tensor(ids[i:i + seqlen], dtype=torch.long))
    return windows


def calibration_windows(source: str, tokenizer, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` calibration tokens, ``LongTensor[nsamples, seqlen]``."""
    _check_positive(nsamples=nsamples, seqlen=seqlen)
    src = parse_source(source)
    rng = random.Random(seed)  # same numbers as random.seed(seed) + random.randint, global state untouched
    if src.kind == "c4":
        return torch.stack(_c4_windows(src, tokenizer, nsamples, seqlen, rng))
    ids = token_stream(src, "calib", tokenizer)
    n = ids.numel()
    # The reference draws randint(0, N - seqlen - 1) (it also builds next-token targets), so the
    # last token is never the end of a window and N must be at least seqlen + 1.
    if n < seqlen + 1:
        raise DataSourceError(f"{src.label}: the calibration text has only {n} tokens; one window of "
                              f"{seqlen} tokens needs at least {seqlen + 1}")
    starts = [rng.randint(0, n - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[i:i + seqlen] for i in starts])


def eval_tokens(source: str, tokenizer, seqlen: int) -> torch.Tensor:
    """The evaluation token stream of ``source``, ``LongTensor[1, T]`` (C4: cut to 256 windows of
    ``seqlen`` tokens, as SparseGPT). A fresh copy: the cached stream stays intact."""
    _check_positive(seqlen=seqlen)
    src = parse_source(source)
    ids = token_stream(src, "eval", tokenizer)
    if src.kind == "c4":
        ids = ids[:C4_EVAL_WINDOWS * seqlen]
    if ids.numel() == 0:
        raise DataSourceError(f"{src.label}: the evaluation text is empty")
    if ids.numel() < seqlen:
        raise DataSourceError(f"{src.label}: the evaluation text has {ids.numel()} tokens, fewer than one window "
                              f"of {seqlen}")
    return ids.clone().unsqueeze(0)


# Draw seeds sit far from the run seed (and from each other), so no draw repeats the calibration windows.
DRAW_SEED_STRIDE = 1_000_003


@dataclass
class Calibration:
    """The calibration data a method receives: ``windows`` ([nsamples, seqlen] token ids, what
    the layer-wise methods observe) and :meth:`draw` for methods that train on fresh windows."""

    source: str
    tokenizer: object
    seqlen: int
    seed: int
    windows: torch.Tensor

    @classmethod
    def sample(cls, source: str, tokenizer, nsamples: int, seqlen: int, seed: int = 0) -> "Calibration":
        return cls(source, tokenizer, seqlen, seed, calibration_windows(source, tokenizer, nsamples, seqlen, seed))

    def draw(self, count: int, index: int) -> torch.Tensor:
        """``count`` fresh windows for draw number ``index`` (a training step): the same sampler,
        seeded by (seed, index), so a resumed or re-run job draws exactly the same windows
        without keeping any random state."""
        return calibration_windows(self.source, self.tokenizer, count, self.seqlen,
                                   seed=self.seed + DRAW_SEED_STRIDE * (index + 1))

