import json

import pytest
from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import LmforgeError
from lmforge.tokenizer import (
    CHATML_TEMPLATE, Tokenizer, TokenizerTrainConfig, inspect_tokenizer, save_tokenizer_dir, train_tokenizer,
)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory, stdlib_texts):
    tok = train_tokenizer(stdlib_texts, TokenizerTrainConfig(vocab_size=1024), show_progress=False)
    return save_tokenizer_dir(tok, tmp_path_factory.mktemp("tok") / "bpe")


@pytest.mark.parametrize("kind, vocab", [("bpe", 600), ("wordpiece", 600), ("unigram", 400), ("word", 300), ("char", 60)])
def test_every_kind_trains_to_the_requested_size_and_loads_in_hf(tmp_path, stdlib_texts, kind, vocab):
    from transformers import PreTrainedTokenizerFast

    cfg = TokenizerTrainConfig(kind=kind, vocab_size=vocab)
    tok = train_tokenizer(stdlib_texts[:6], cfg, show_progress=False)
    assert tok.vocab_size == vocab
    out = save_tokenizer_dir(tok, tmp_path / kind)
    text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)"
    raw = HFTokenizer.from_file(str(out / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    ours = Tokenizer.load(out)
    ids = ours.encode(text)
    assert raw.encode(text, add_special_tokens=False).ids == ids
    assert fast.encode(text, add_special_tokens=False) == ids
    specials = ours.special_tokens()
    assert set(cfg.special_tokens()) == set(specials)
    assert ours.eos_id == specials["<|endoftext|>"] and ours.pad_id == specials["<|pad|>"]
    if kind == "bpe":
        assert ours.decode(ids) == text  # byte-level: lossless on any text
    if kind == "char":
        known = "".join(ch for ch in text if ours.hf.token_to_id(ch) is not None)
        assert len(ours.encode(known)) == len(known) and ours.decode(ours.encode(known)) == known
    assert ours.sha256 == Tokenizer.load(out / "tokenizer.json").sha256


def test_saved_dir_loads_with_autotokenizer_and_chat_template(bpe_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(bpe_dir))
    assert hf.eos_token == "<|endoftext|>" and hf.pad_token == "<|pad|>"
    rendered = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert Tokenizer.load(bpe_dir).chat_template == CHATML_TEMPLATE


def test_vocab_larger_than_the_corpus_supports_is_an_error():
    with pytest.raises(LmforgeError, match=r"corpus supports only \d+ tokens .* less than --vocab-size 5000"):
        train_tokenizer(["a tiny corpus", "with few words"], TokenizerTrainConfig(vocab_size=5000), source="tiny", show_progress=False)
    with pytest.raises(LmforgeError, match="char tokenizer"):
        train_tokenizer(["abcabc"], TokenizerTrainConfig(kind="char", vocab_size=50), show_progress=False)


def test_empty_corpus_is_an_error():
    with pytest.raises(LmforgeError, match="no text to train on"):
        train_tokenizer([], TokenizerTrainConfig(vocab_size=300), show_progress=False)


def test_bad_config():
    with pytest.raises(LmforgeError, match="--kind"):
        TokenizerTrainConfig(kind="morse")
    with pytest.raises(LmforgeError, match="--vocab-size"):
        TokenizerTrainConfig(vocab_size=0)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_byte_level_bpe_round_trips_any_unicode(bpe_dir, text):
    tok = Tokenizer.load(bpe_dir)
    assert tok.decode(tok.encode(text)) == text


def test_byte_level_bpe_round_trips_special_tokens_in_text(bpe_dir):
    tok = Tokenizer.load(bpe_dir)
    text = "a<|endoftext|>b<|im_start|>user\n"
    ids = tok.encode(text)
    assert tok.eos_id in ids and tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "abuser\n"


def test_inspect_reports_the_vocabulary(bpe_dir, stdlib_texts):
    tok = Tokenizer.load(bpe_dir)
    sample = stdlib_texts[:3]
    report = inspect_tokenizer(tok, sample, top=5)
    n_tokens = sum(len(tok.encode(t)) for t in sample)
    n_bytes = sum(len(t.encode()) for t in sample)
    assert report.vocab_size == 1024 and report.kind == "BPE"
    assert report.sample_tokens == n_tokens and report.bytes_per_token == pytest.approx(n_bytes / n_tokens)
    assert report.bytes_per_token > 2  # BPE compresses code well beyond one byte per token
    lengths = [len(json.loads(t).encode()) for t in report.longest_tokens]
    assert lengths == sorted(lengths, reverse=True) and len(lengths) == 5
    counts = [n for _, n in report.most_frequent]
    assert counts == sorted(counts, reverse=True) and sum(counts) <= n_tokens
    assert report.roles["eos"] == "<|endoftext|>"


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(LmforgeError, match="no tokenizer.json in this folder"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LmforgeError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)
