"""Ding dictionary -> sentence pairs: the format's cases on a small file written here, the split's
stability, the command; and the real /usr/share/trans/de-en (slow) when it is installed."""

import json
import random

import pytest

from lmforge.data.ding import (DEFAULT_DING, DingConfig, drop_reason, extract_ding, parse_entry, read_ding,
                               split_pairs, strip_annotations)
from lmforge.errors import LmforgeError

# Each line exercises one case of the format; the comment after it says what it must give.
LINES = [
    "# Version :: devel 2023-01-30",  # a comment, even with ' :: ' in it
    "",
    "Haus {n} | Häuser {pl} :: house | houses",  # too short (word entries)
    "geöffnet; offen {adj} | Das Museum ist montags nicht geöffnet. :: opened; open | The museum is not open on Monday.",
    "Er kam (gestern) spät nach Hause. [ugs.] :: He came home late (yesterday). [coll.]",  # annotations go
    "Ich bin ganz Ohr.; Ich höre dir zu. :: I am all ears.",  # two German synonyms -> two pairs, one group
    "Das ist ein Satz. | Noch ein Satz hier. :: This is a sentence.",  # 2 vs 1 alternatives: dropped
    "kein Trenner hier, nur Text.",  # malformed
    "Er sagte nichts dazu. :: He said nothing about it.",
    "Er sagte nichts dazu. :: He said nothing about it.",  # duplicate pair
    "ein großes rotes Haus :: a big red house",  # not a sentence
    "Schöne/frohe Ostertage allerseits! :: Happy Easter to everyone!",  # slash variant
    "jd. macht etw. gern. :: sb. likes doing sth.",  # placeholders
    "Carpe diem, ihr alle! :: Carpe diem, ihr alle!",  # identical sides
    "Das ist (kaputt. :: That is broken.",  # unbalanced bracket
    "Sie hat „Ja“ gesagt. :: She said “yes”.",  # quotes, sentence ends inside them
    "Wie spät ist es denn? :: What time is it then?",
    "Komm sofort her, bitte! :: Come here at once, please!",
]
KEPT = {
    ("Das Museum ist montags nicht geöffnet.", "The museum is not open on Monday."),
    ("Er kam spät nach Hause.", "He came home late."),
    ("Ich bin ganz Ohr.", "I am all ears."),
    ("Ich höre dir zu.", "I am all ears."),
    ("Er sagte nichts dazu.", "He said nothing about it."),
    ("Sie hat „Ja“ gesagt.", "She said “yes”."),
    ("Wie spät ist es denn?", "What time is it then?"),
    ("Komm sofort her, bitte!", "Come here at once, please!"),
}


@pytest.fixture
def ding_file(tmp_path):
    path = tmp_path / "de-en"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return path


def read_split(folder, name):
    return [json.loads(line) for line in (folder / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_strip_annotations_and_entries():
    assert strip_annotations("Aal {m} (auf der Speisekarte) [cook.]") == "Aal"
    assert strip_annotations("Er kam (gestern (sehr)) spät .") == "Er kam spät."
    assert strip_annotations("eel <eelsmoking business> trap") == "eel trap"
    assert strip_annotations("kaputt (ganz") is None
    assert strip_annotations("kaputt] ganz") is None
    assert parse_entry("a | b :: c")[0] == "mismatched_alternatives"
    assert parse_entry("a :: b :: c")[0] == "malformed"
    assert parse_entry("a [x] | b :: c | d (y)") == ("ok", [("a", "c"), ("b", "d")], 0)


def test_filters_each_reason():
    cfg = DingConfig()
    assert drop_reason("Ja, bitte.", "Yes, please.", cfg) == "too_short"
    assert drop_reason("Ja, bitte sehr.", "Yes, please.", cfg) == "too_short"  # both sides count
    assert drop_reason("Das ist ein Satz.", "This is " + "very " * 70 + "long.", cfg) == "too_long"
    assert drop_reason("ein rotes Haus", "a red house", cfg) == "not_sentence"
    assert drop_reason("ein rotes Haus", "a red house", DingConfig(sentence_end=False)) is None
    assert drop_reason("Er gibt jdm. das Buch.", "He gives the book to him.", cfg) == "placeholder"
    assert drop_reason("Er gibt es ihr.", "He gives sth. to her.", cfg) == "placeholder"
    assert drop_reason("Er gibt es ihr.", "He gives sb's book to her.", cfg) == "placeholder"
    assert drop_reason("Das etw. kleinere Haus.", "The somewhat smaller house.", cfg) == "placeholder"
    assert drop_reason("Er lebt (u)nglücklich/froh hier.", "He lives here happily.", cfg) == "slash_variant"
    assert drop_reason("Er sagte: „Gut so!“", "He said: “Good!”", cfg) is None
    assert drop_reason("Er sagte es so (im Ernst).", "He said it (seriously).", cfg) is None


def test_read_keeps_exactly_the_sentence_pairs_and_counts_every_drop(ding_file):
    pairs, stats = read_ding(ding_file)
    assert set(pairs) == KEPT and len(pairs) == len(KEPT)
    assert (stats.lines_read, stats.comments, stats.blank, stats.entries) == (len(LINES), 1, 1, len(LINES) - 2)
    assert (stats.malformed, stats.mismatched_alternatives, stats.unbalanced_brackets) == (1, 1, 1)
    assert stats.dropped == {"too_short": 6, "too_long": 0, "not_sentence": 1, "placeholder": 1,
                             "slash_variant": 1, "identical": 1, "duplicate": 1}
    # every candidate is either kept or dropped for one reason
    assert stats.candidates == stats.pairs + sum(stats.dropped.values())


def test_missing_file_says_how_to_install(tmp_path):
    with pytest.raises(LmforgeError, match=r"^.*nope: no such file .*sudo apt-get install trans-de-en\)$"):
        read_ding(tmp_path / "nope")


def test_bad_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "de-en"
    path.write_bytes("Das ist gut. :: That is good.\n".encode() + b"Das ist \xff. :: bad.\n")
    with pytest.raises(LmforgeError, match=r"de-en:2: invalid UTF-8 at byte 8"):
        read_ding(path)


def test_no_pairs_kept_is_an_error(tmp_path):
    path = tmp_path / "de-en"
    path.write_text("Haus {n} :: house\n", encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"no sentence pairs kept out of 1 entries \(dropped: too_short 1\)"):
        extract_ding(tmp_path / "out", path)
    assert not (tmp_path / "out").exists()


def synthetic_pairs(n, seed=0):
    rng = random.Random(seed)
    words = "der die das ein Haus Baum Hund geht läuft schnell heute sehr".split()
    pairs = set()
    while len(pairs) < n:
        k = rng.randint(3, 8)
        de = " ".join(rng.choice(words) for _ in range(k)) + "."
        pairs.add((de.capitalize(), f"Sentence {len(pairs)} in English."))
    return sorted(pairs)


def test_split_is_stable_capped_and_independent_of_order():
    pairs = synthetic_pairs(2000)
    cfg = DingConfig(val_fraction=0.1, test_fraction=0.1, max_val=1000, max_test=150)
    a, _ = split_pairs(pairs, cfg)
    shuffled = pairs[:]
    random.Random(1).shuffle(shuffled)
    b, _ = split_pairs(shuffled, cfg)
    assert a == b  # same membership and the same order within each split
    assert sum(map(len, a.values())) == len(pairs)
    assert 140 <= len(a["val"]) <= 260  # ~10% of 2000 (binomial, several sigma)
    assert len(a["test"]) <= 150
    # the cap keeps the smallest hashes: removing pairs from train never changes val
    c, _ = split_pairs([p for p in pairs if p not in a["train"][:500]], cfg)
    assert c["val"] == a["val"]
    # a pair's split does not depend on the other pairs (only the cap couples them)
    d, _ = split_pairs(pairs[:1000], DingConfig(val_fraction=0.1, test_fraction=0.1))
    assert set(d["val"]) == set(a["val"]) & set(pairs[:1000])


def test_pairs_sharing_a_sentence_stay_in_one_split():
    # A chain per group: German 0 and 1 share English 0, German 1 also has English 1, which German 2
    # shares: five pairs linked only through each other.
    def chain(g):
        links = [(0, 0), (1, 0), (1, 1), (2, 1), (2, 2)]
        return [(f"Gruppe {g} Satz {d}.", f"Group {g} sentence {e}.") for d, e in links]

    pairs = [p for g in range(300) for p in chain(g)]
    out, groups = split_pairs(pairs, DingConfig(val_fraction=0.2, test_fraction=0.2))
    assert groups == 300
    where = {p: name for name, items in out.items() for p in items}
    for g in range(300):
        assert len({where[p] for p in chain(g)}) == 1
    assert out["val"] and out["test"]
    train_sentences = {s for p in out["train"] for s in p}
    assert not train_sentences & {s for p in out["test"] + out["val"] for s in p}


def test_extract_writes_splits_atomically_and_the_same_bytes_for_any_line_order(ding_file, tmp_path):
    cfg = DingConfig(val_fraction=0.3, test_fraction=0.3)
    stats = extract_ding(tmp_path / "a", ding_file, cfg)
    shuffled = tmp_path / "shuffled"
    lines = LINES[:]
    random.Random(3).shuffle(lines)
    shuffled.write_text("\n".join(lines) + "\n", encoding="utf-8")
    extract_ding(tmp_path / "b", shuffled, cfg)
    for name in ("train", "val", "test"):
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (tmp_path / "b" / f"{name}.jsonl").read_bytes()
    got = {(r["source"], r["target"]) for name in ("train", "val", "test") for r in read_split(tmp_path / "a", name)}
    assert got == KEPT
    assert stats.splits == {name: len(read_split(tmp_path / "a", name)) for name in ("train", "val", "test")}
    saved = json.loads((tmp_path / "a" / "stats.json").read_text())
    assert saved["stats"]["pairs"] == len(KEPT) and saved["config"]["val_fraction"] == 0.3
    # the two synonyms of "I am all ears." are in one split
    splits_of = {name for name in ("train", "val", "test") for r in read_split(tmp_path / "a", name)
                 if r["target"] == "I am all ears."}
    assert len(splits_of) == 1
    with pytest.raises(LmforgeError, match="already exists; pass --overwrite"):
        extract_ding(tmp_path / "a", ding_file, cfg)


def test_reverse_swaps_sides_and_keeps_the_split(ding_file, tmp_path):
    cfg = DingConfig(val_fraction=0.3, test_fraction=0.3)
    extract_ding(tmp_path / "out-de-en", ding_file, cfg)
    stats = extract_ding(tmp_path / "out-en-de", ding_file, DingConfig(val_fraction=0.3, test_fraction=0.3, reverse=True))
    assert stats.direction == "en-de"
    for name in ("train", "val", "test"):
        forward = {(r["source"], r["target"]) for r in read_split(tmp_path / "out-de-en", name)}
        backward = {(r["target"], r["source"]) for r in read_split(tmp_path / "out-en-de", name)}
        assert forward == backward


def test_command_prints_counts(cli, ding_file, tmp_path):
    r = cli("data", "ding", "--input", ding_file, "-o", tmp_path / "out", "--reverse", "--val-fraction", "0.3")
    assert r.code == 0, r.err
    assert f"kept {len(KEPT)} en-de sentence pairs" in r.out
    assert "dropped       1  placeholder" in r.out
    assert "1 malformed, 1 with mismatched alternatives" in r.out
    row = read_split(tmp_path / "out", "train")[0]
    assert set(row) == {"source", "target"}
    r = cli("data", "ding", "--input", tmp_path / "missing", "-o", tmp_path / "x")
    assert r.code != 0 and "sudo apt-get install trans-de-en" in r.err
    r = cli("data", "ding", "--input", ding_file, "-o", tmp_path / "y", "--val-fraction", "0.6", "--test-fraction", "0.5")
    assert r.code != 0 and "--val-fraction + --test-fraction must be < 1" in r.err


@pytest.mark.slow
@pytest.mark.skipif(not DEFAULT_DING.exists(), reason="Debian's trans-de-en is not installed")
def test_real_dictionary(tmp_path):
    stats = extract_ding(tmp_path / "ding", DEFAULT_DING)
    assert stats.entries > 150_000
    assert 15_000 < stats.pairs < 40_000
    assert 0 < stats.splits["val"] <= 1000 and 0 < stats.splits["test"] <= 1000
    test = read_split(tmp_path / "ding", "test")
    assert all(len(r["source"].split()) >= 3 and r["source"][-1] in ".!?…\"”“’)" for r in test)
    train = {r["source"] for r in read_split(tmp_path / "ding", "train")}
    assert not train & {r["source"] for r in test}
    again = extract_ding(tmp_path / "again", DEFAULT_DING)
    assert again.splits == stats.splits
    assert (tmp_path / "ding" / "test.jsonl").read_bytes() == (tmp_path / "again" / "test.jsonl").read_bytes()
