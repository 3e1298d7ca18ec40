import json

import numpy as np
import pytest

from conftest import leftovers, write_jsonl
from lmforge.data.loader import TokenShards, random_batch, sequential_windows
from lmforge.data.pack import PackConfig, ShardWriter, is_val_document, pack_corpus, token_dtype
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer, TokenizerTrainConfig, save_tokenizer_dir, train_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, stdlib_texts):
    root = tmp_path_factory.mktemp("pack")
    docs = stdlib_texts[:40]
    write_jsonl(root / "clean" / "part-00000.jsonl", [{"text": t} for t in docs])
    tok = train_tokenizer(docs, TokenizerTrainConfig(vocab_size=512), show_progress=False)
    save_tokenizer_dir(tok, root / "tok")
    return root, docs, Tokenizer.load(root / "tok")


def stream(ts: TokenShards, split: str) -> np.ndarray:
    return np.concatenate([np.asarray(s) for s in ts.split(split).shards])


def expected_stream(tok, docs):
    return np.array([i for d in docs for i in [*tok.encode(d), tok.eos_id]])


def test_pack_by_document(corpus, tmp_path):
    root, docs, tok = corpus
    meta = pack_corpus([root / "clean"], root / "tok", tmp_path / "s", PackConfig(val_fraction=0.1, workers=1), progress=False)
    val_idx = [i for i in range(len(docs)) if is_val_document(i, 0.1)]
    assert len(val_idx) == 4
    ts = TokenShards(tmp_path / "s", expect_tokenizer_sha256=tok.sha256)
    train_docs = [d for i, d in enumerate(docs) if i not in val_idx]
    np.testing.assert_array_equal(stream(ts, "train"), expected_stream(tok, train_docs))
    np.testing.assert_array_equal(stream(ts, "val"), expected_stream(tok, [docs[i] for i in val_idx]))
    assert meta["dtype"] == "uint16" and meta["eos_id"] == tok.eos_id and meta["documents"] == 40
    assert meta["splits"]["train"]["documents"] == 36 and meta["splits"]["val"]["documents"] == 4
    assert meta["tokenizer"]["sha256"] == tok.sha256
    assert Tokenizer.load(tmp_path / "s").sha256 == tok.sha256  # the shards carry their tokenizer
    assert json.loads((tmp_path / "s" / "meta.json").read_text()) == meta


def test_parallel_pack_and_small_shards_give_the_same_stream(corpus, tmp_path):
    root, docs, tok = corpus
    cfg = dict(val_fraction=0.1, chunk_chars=20_000)
    pack_corpus([root / "clean"], root / "tok", tmp_path / "a", PackConfig(workers=1, **cfg), progress=False)
    meta = pack_corpus([root / "clean"], root / "tok", tmp_path / "b", PackConfig(workers=2, shard_tokens=5000, **cfg), progress=False)
    assert len(meta["splits"]["train"]["shards"]) > 3
    a, b = TokenShards(tmp_path / "a"), TokenShards(tmp_path / "b")
    for split in ("train", "val"):
        np.testing.assert_array_equal(stream(a, split), stream(b, split))


def test_pack_tail_split(corpus, tmp_path):
    root, docs, tok = corpus
    meta = pack_corpus([root / "clean"], root / "tok", tmp_path / "s", PackConfig(split="tail", val_fraction=0.25, workers=1, shard_tokens=7000), progress=False)
    ts = TokenShards(tmp_path / "s")
    everything = expected_stream(tok, docs)
    n_val = int(len(everything) * 0.25)
    np.testing.assert_array_equal(stream(ts, "train"), everything[:-n_val])
    np.testing.assert_array_equal(stream(ts, "val"), everything[-n_val:])
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(docs)
    assert not list((tmp_path / "s").glob("all-*"))


def test_empty_val_split_is_an_error(corpus, tmp_path):
    root, docs, tok = corpus
    with pytest.raises(LmforgeError, match=r"val split is empty \(40 documents, --val-fraction 0.01\)"):
        pack_corpus([root / "clean"], root / "tok", tmp_path / "s", PackConfig(val_fraction=0.01, workers=1), progress=False)
    assert not (tmp_path / "s").exists() and leftovers(tmp_path) == []


def test_tokenizer_without_eos_is_an_error(corpus, tmp_path):
    root, docs, tok = corpus
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_bytes((root / "tok" / "tokenizer.json").read_bytes())
    with pytest.raises(LmforgeError, match="names no eos token"):
        pack_corpus([root / "clean"], tmp_path / "tok", tmp_path / "s", PackConfig(workers=1), progress=False)


def test_dtype_follows_vocab_size(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    w = ShardWriter(tmp_path, "train", token_dtype(100_000), shard_tokens=3)
    w.write(np.array([99_999, 70_000, 1, 2], dtype=np.uint32))
    w.close()
    assert [s["tokens"] for s in w.shards] == [3, 1]
    assert np.fromfile(tmp_path / "train-00000.bin", dtype=np.uint32).tolist() == [99_999, 70_000, 1]


def test_val_documents_are_spread_evenly():
    picks = [i for i in range(1000) if is_val_document(i, 0.05)]
    assert len(picks) == 50 and max(np.diff(picks)) == 20


@pytest.fixture(scope="module")
def shards(corpus, tmp_path_factory):
    root, docs, tok = corpus
    out = tmp_path_factory.mktemp("shards") / "s"
    pack_corpus([root / "clean"], root / "tok", out, PackConfig(val_fraction=0.1, workers=1, shard_tokens=4000), progress=False)
    return out


def test_random_batches_are_deterministic_windows_of_the_stream(shards):
    ts = TokenShards(shards)
    split = ts.split("train")
    a = random_batch(split, 8, 32, seed=3, step=5)
    assert a.shape == (8, 33) and a.dtype == np.int64
    np.testing.assert_array_equal(a, random_batch(split, 8, 32, seed=3, step=5))
    assert not np.array_equal(a, random_batch(split, 8, 32, seed=3, step=6))
    # The global batch of a step is one draw; ranks take slices of it (1 x 16 rows == 2 x 8 rows).
    whole = random_batch(split, 16, 32, seed=3, step=5)
    halves = [random_batch(split, 8, 32, seed=3, step=5, rank=r, world_size=2) for r in range(2)]
    np.testing.assert_array_equal(whole, np.concatenate(halves))
    assert not np.array_equal(halves[0], halves[1])
    full = stream(ts, "train")
    text = full.tobytes()
    for row in a:  # every window is a contiguous slice of the token stream
        assert row.astype(full.dtype).tobytes() in text


def test_sequential_windows_cover_the_split_once_across_ranks(shards):
    split = TokenShards(shards).split("val")
    all_windows = list(sequential_windows(split, 16))
    per_rank = [list(sequential_windows(split, 16, rank=r, world_size=3)) for r in range(3)]
    # Every rank gets as many windows (a forward pass is a collective under FSDP): the last
    # windows that do not make a full round are left out.
    assert len({len(w) for w in per_rank}) == 1 and len(all_windows) > 10
    assert sum(len(w) for w in per_rank) == len(all_windows) - len(all_windows) % 3
    merged = [per_rank[k % 3][k // 3] for k in range(sum(len(w) for w in per_rank))]
    for x, y in zip(all_windows, merged):
        np.testing.assert_array_equal(x, y)
    assert len(list(sequential_windows(split, 16, limit=5))) == 5


def test_window_larger_than_split_is_an_error(shards):
    with pytest.raises(LmforgeError, match="too short for one window"):
        random_batch(TokenShards(shards).split("val"), 1, 10**6, seed=0, step=0)


def test_loader_refuses_mismatched_tokenizer_and_truncated_shards(shards, tmp_path):
    with pytest.raises(LmforgeError, match="re-pack with the model's tokenizer"):
        TokenShards(shards, expect_tokenizer_sha256="0" * 64)
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    f = copy / "train-00000.bin"
    f.write_bytes(f.read_bytes()[:-2])
    with pytest.raises(LmforgeError, match="train-00000.bin: .* truncated or corrupt"):
        TokenShards(copy).split("train")
    with pytest.raises(LmforgeError, match="not a shards dir"):
        TokenShards(tmp_path)
