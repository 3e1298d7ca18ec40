"""Parallel data (lmforge.data.parallel) and its batches (lmforge.train.seq2seq_data): readers,
cleaning, filters, dedup, one-line errors, bucketing, determinism."""

import gzip

import numpy as np
import pytest
import torch

from conftest import write_jsonl
from lmforge.data.parallel import LengthFilter, PairStats, filter_lengths, is_pair_file, read_pairs, split_pairs
from lmforge.errors import LmforgeError
from lmforge.train.seq2seq_data import PairTokenizers, Seq2SeqBatches, encode_pairs, train_pair_tokenizers


def test_jsonl_and_tsv_read_the_same_pairs_cleaned(tmp_path):
    rows = [("Guten  Morgen ", "Good morning"), ("Cafe\u0301", "Coffee\u200b"), ("Hallo", "Hello")]
    jsonl = write_jsonl(tmp_path / "p.jsonl", [{"de": s, "en": t} for s, t in rows])
    tsv = tmp_path / "p.tsv.gz"
    with gzip.open(tsv, "wt", encoding="utf-8") as f:
        f.write("".join(f"{s}\t{t}\n" for s, t in rows) + "\n")  # a trailing blank line is skipped
    a, sa = read_pairs(jsonl, source_field="de", target_field="en")
    b, sb = read_pairs(tsv)
    assert [(p.source, p.target) for p in a] == [(p.source, p.target) for p in b]
    # NFC (e + combining acute -> é), zero-width space dropped, whitespace trimmed
    assert [(p.source, p.target) for p in a] == [("Guten  Morgen", "Good morning"), ("Café", "Coffee"), ("Hallo", "Hello")]
    assert sa.read == sb.read == 3 and sa.kept == 3 and sa.cleaned == 2
    assert a[1].where == f"{jsonl}:2"
    raw, _ = read_pairs(jsonl, source_field="de", target_field="en", clean=False)
    assert raw[1].source == "Cafe\u0301"
    assert is_pair_file(jsonl) and is_pair_file(tsv) and not is_pair_file(tmp_path)


def test_empty_sides_and_exact_duplicates_are_dropped_and_counted(tmp_path):
    rows = [{"source": "a b", "target": "x y"}, {"source": "a b", "target": "x y"}, {"source": "a b", "target": "x z"},
            {"source": "  ", "target": "x"}, {"source": "c", "target": ""}]
    pairs, stats = read_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    assert [(p.source, p.target) for p in pairs] == [("a b", "x y"), ("a b", "x z")]
    assert stats.to_dict() == {"read": 5, "kept": 2, "cleaned": 1,
                               "dropped": {"duplicate": 1, "empty_source": 1, "empty_target": 1}}
    kept, _ = read_pairs(tmp_path / "p.jsonl", dedup=False)
    assert len(kept) == 3


def test_length_filters_count_each_reason():
    stats = PairStats(read=5, kept=5)
    items = [(1, 1), (3, 4), (20, 5), (9, 9), (2, 12)]
    rule = LengthFilter(min_length=2, max_length=10, max_ratio=3.0)
    assert filter_lengths(items, lambda x: x, rule, stats) == [(3, 4), (9, 9)]
    assert stats.dropped == {"too_short": 1, "too_long": 2} and stats.kept == 2
    stats = PairStats(read=1, kept=1)
    assert filter_lengths([(2, 7)], lambda x: x, rule, stats) == [] and stats.dropped == {"length_ratio": 1}
    assert LengthFilter(max_ratio=0).reason(1, 100) is None  # 0 = off


@pytest.mark.parametrize("name, content, message", [
    ("p.jsonl", '{"source": "a", "target": "b"}\n{"source": "a"}\n', r"p\.jsonl:2: no 'target' field"),
    ("p.jsonl", '{"source": "a", "target": 3}\n', r"p\.jsonl:1: field 'target' must be a string, got int"),
    ("p.jsonl", '{"source": "a", "target": "b"}\n{"source": \n', r"p\.jsonl:2: invalid JSON"),
    ("p.jsonl", '["a", "b"]\n', r"p\.jsonl:1: expected a JSON object"),
    ("p.tsv", "a\tb\nno tab here\n", r"p\.tsv:2: expected 2 tab-separated columns \(source, target\), got 1"),
    ("p.tsv", "a\tb\tc\n", r"p\.tsv:1: expected 2 tab-separated columns \(source, target\), got 3"),
    ("p.tsv", b"a\tb\n\xff\tc\n", r"p\.tsv:2: invalid UTF-8 at byte 0"),
    ("p.tsv", "", r"p\.tsv: no pairs \(the file is empty\)"),
    ("p.csv", "a,b\n", r"p\.csv: parallel data must be \.jsonl .* or \.tsv"),
])
def test_bad_input_is_one_line_naming_file_line_and_cause(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(LmforgeError, match=message) as e:
        read_pairs(path)
    assert "\n" not in str(e.value)
    with pytest.raises(LmforgeError, match="no such file"):
        read_pairs(tmp_path / "missing.tsv")


def test_split_is_seeded_and_disjoint():
    items = list(range(100))
    train, val = split_pairs(items, 0.1, seed=3)
    assert len(val) == 10 and sorted(train + val) == items
    assert split_pairs(items, 0.1, seed=3) == (train, val) and split_pairs(items, 0.1, seed=4)[1] != val
    with pytest.raises(LmforgeError, match="too few"):
        split_pairs([1], 0.5, seed=0)


def _varied_pairs(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = int(rng.integers(1, 60))
        t = max(1, round(s * rng.uniform(0.8, 1.25)))  # as in translation: lengths go together
        out.append((rng.integers(5, 50, s).astype(np.int32), rng.integers(5, 50, t).astype(np.int32)))
    return out


def _batches(pairs, **kw) -> Seq2SeqBatches:
    args = dict(batch_size=16, grad_accum=2, seed=1, eval_batches=2, start_id=1, eos_id=2, pad_id=3, src_pad_id=4)
    return Seq2SeqBatches(pairs, pairs[:40], **{**args, **kw})


def test_a_batch_holds_the_teacher_forcing_layout():
    pairs = [(np.array([7, 8, 9], np.int32), np.array([10, 11], np.int32)), (np.array([7], np.int32), np.array([12, 13, 14], np.int32))]
    src, labels, extra = _batches(pairs, batch_size=2, grad_accum=1).collate(pairs)
    assert src.tolist() == [[7, 8, 9], [7, 4, 4]]
    assert extra["src_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert extra["tgt_ids"].tolist() == [[1, 10, 11, 3], [1, 12, 13, 14]]  # start + target, padded
    assert labels.tolist() == [[10, 11, 2, -100], [12, 13, 14, 2]]  # target + eos, -100 on padding


def test_bucketing_cuts_the_pad_share_and_batches_are_a_function_of_step_and_micro():
    pairs = _varied_pairs(2000)
    bucketed, plain = _batches(pairs), _batches(pairs, bucket=False)
    assert bucketed.pad_share() < 0.15 < 0.4 < plain.pad_share()
    # every pair once per epoch, whatever the batching
    for b in (bucketed, plain, _batches(pairs, max_tokens=600)):
        assert sorted(np.concatenate(b.epoch_plan(0)).tolist()) == list(range(2000))
    # token budget: rows x (longest source + longest target + 1) within it, unless one pair alone exceeds it
    budget = _batches(pairs, max_tokens=600)
    for idx in budget.epoch_plan(0):
        cost = len(idx) * (budget.src_len[idx].max() + budget.tgt_len[idx].max())
        assert cost <= 600 or len(idx) == 1
    # a fresh source (a resumed run) gives the same batch for the same (step, micro), across epochs
    again = _batches(pairs)
    steps_per_epoch = len(bucketed.epoch_plan(0)) // 2
    for step, micro in [(0, 0), (3, 1), (steps_per_epoch + 5, 0), (3 * steps_per_epoch, 1)]:
        a, b = again.train_batch(step, micro), bucketed.train_batch(step, micro)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2]["tgt_ids"], b[2]["tgt_ids"])
    assert not np.array_equal(bucketed.epoch_plan(0)[0], bucketed.epoch_plan(1)[0])  # a new order each epoch
    vals = [b[0].shape for b in bucketed.val_batches()]
    assert vals == [b[0].shape for b in bucketed.val_batches()] and len(vals) == 2  # eval_batches of 16 of the 40 val pairs


def test_joint_and_separate_tokenizers(tmp_path):
    src = [f"das haus {i} ist alt" for i in range(50)]
    tgt = [f"the house {i} is old" for i in range(50)]
    joint = train_pair_tokenizers(src, tgt, mode="joint", kind="bpe", vocab_size=300)
    assert joint.joint and joint.source is joint.target
    sep = train_pair_tokenizers(src, tgt, mode="separate", kind="word", vocab_size=7)
    assert not sep.joint and sep.source.vocab_size == sep.target.vocab_size == 7  # 4 words + unk, endoftext, pad
    start, eos, pad = sep.special_ids()
    assert start == sep.target.bos_id and eos == sep.target.eos_id and pad == sep.target.pad_id
    assert sep.target.chat_template is None  # no chat tokens in a translation vocabulary
    sep.save(tmp_path / "m")
    back = PairTokenizers.load(tmp_path / "m")
    assert back.source.sha256 == sep.source.sha256 and back.target.sha256 == sep.target.sha256
    (s, t), = encode_pairs(sep, ["das haus"], ["the house"])
    assert sep.source.hf.token_to_id("haus") is not None and sep.target.hf.token_to_id("haus") is None
    assert sep.source.decode(s.tolist()) == "das haus" and sep.target.decode(t.tolist()) == "the house"
    with pytest.raises(LmforgeError, match="--tokenizer must be joint, separate"):
        train_pair_tokenizers(src, tgt, mode="both", kind="bpe", vocab_size=300)
