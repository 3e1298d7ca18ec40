"""Sentence pairs for translation from the Ding German-English dictionary (Debian's `trans-de-en`).

The dictionary (GPL-2+, /usr/share/trans/de-en, one entry a line) reads

    German alt 1 | German alt 2 | ... :: English alt 1 | English alt 2 | ...

where alternative i on the left translates alternative i on the right, `;` separates synonyms within
an alternative, `#` starts a comment line, and {f}, [Br.], (optional words), <search keys> annotate.
Among the word entries are many example sentences ("Das Museum ist montags nicht geöffnet. ::
The museum is not open on Monday."): real parallel text, on every Debian machine, without a
download. The data keeps the dictionary's licence, so it is extracted on the user's machine and
never shipped or committed.

What is kept, in this order (the first test a candidate fails is the reason counted against it):

1. lines: not blank, not `#`, exactly one ` :: `, as many `|` alternatives on both sides
   (else `malformed` / `mismatched_alternatives`, counted per line);
2. each alternative pair: annotations removed ({...}, [...], (...), <...>, nested too); a bracket
   left unmatched drops the pair (`unbalanced_brackets`); whitespace collapsed, no space before
   punctuation; then every German synonym is paired with every English synonym (the dictionary
   gives them as equivalent renderings of one meaning);
3. each candidate pair, both sides: at least `min_words` words (`too_short`), at most `max_words`
   (`too_long`), ends like a sentence — . ! ? … possibly followed by a closing quote or bracket —
   when `sentence_end` (`not_sentence`), no dictionary placeholder such as jd./etw./sb./sth.
   (`placeholder`: templates, not text), no `a/b` slash variants (`slash_variant`: "Schöne/frohe
   Ostertage!" is two sentences in one), the two sides differ (`identical`: a Latin proverb on both
   sides teaches copying, not translating), not a repeat of a kept pair (`duplicate`).

The split: pairs that share a sentence on either side (synonyms: one German sentence with two
English renderings, or the same sentence under two entries) form one group, and a group goes to
val, test or train by the blake2b hash of its smallest-hashing German sentence, so that no test
sentence, German or English, is ever seen in training. The hash is of the German text whatever the
direction, so de->en and en->de share their test sentences. `val_fraction` / `test_fraction` of
the hash range go to val / test, capped at `max_val` / `max_test` pairs (the groups with the
smallest hashes are kept, the rest go to train) so that an evaluation stays quick. Each split is
written in the order of a hash of its pairs: the output depends only on the set of entries, not on
their order in the file (and the training file comes out shuffled).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
import unicodedata
from pathlib import Path

from lmforge.errors import LmforgeError, check_counts
from lmforge.fsutil import atomic_dir, atomic_file
from lmforge.jsonio import read_bytes, strict_decode

DEFAULT_DING = Path("/usr/share/trans/de-en")
INSTALL_HINT = "sudo apt-get install trans-de-en"
SPLITS = ("train", "val", "test")

# Reasons a candidate pair is dropped, in the order they are tested (see the module docstring).
PAIR_REASONS = ("too_short", "too_long", "not_sentence", "placeholder", "slash_variant", "identical", "duplicate")

_INNER_ANNOTATION = re.compile(r"\s*[{\[(<][^{}\[\]()<>]*[}\])>]")  # innermost first: nesting unwinds in a loop
_BRACKET = re.compile(r"[{}\[\]()<>]")
_SPACE = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,!?;:…])")
_SENTENCE_END = re.compile(r"[.!?…][\"'»«“”‘’)\]]*$")
# Dictionary placeholders (jemand/jemandem/jemanden/jemandes, etwas; somebody, something, one's).
_PLACEHOLDER = re.compile(r"(?<![\w.])(?:jd|jdm|jdn|jds|etw|sb|sth|sb's|sb’s)\.|(?<![\w.])(?:sb|sth)(?:'s|’s)?(?!\w)")


@dataclasses.dataclass
class DingConfig:
    """Which Ding entries become sentence pairs, and how they are split (see lmforge/data/ding.py)."""

    reverse: bool = False  # English -> German (source = English) instead of German -> English
    min_words: int = 3  # drop pairs with fewer whitespace-separated words on either side
    max_words: int = 64  # drop pairs with more words on either side (keeps batches short)
    sentence_end: bool = True  # keep only pairs whose both sides end like a sentence (. ! ? …)
    val_fraction: float = 0.02  # share of the hash range that goes to val
    test_fraction: float = 0.02  # share of the hash range that goes to test
    max_val: int = 1000  # cap on val pairs (the rest of its hash range goes to train), so eval stays quick
    max_test: int = 1000  # cap on test pairs (the rest of its hash range goes to train)

    def __post_init__(self) -> None:
        check_counts(self, at_least_0=("max_val", "max_test"), at_least_1=("min_words", "max_words"))
        if self.max_words < self.min_words:
            raise LmforgeError(f"--max-words ({self.max_words}) must be >= --min-words ({self.min_words})")
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise LmforgeError(f"--{name.replace('_', '-')} must be in [0, 1), got {v}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise LmforgeError(f"--val-fraction + --test-fraction must be < 1, got {self.val_fraction + self.test_fraction}")


@dataclasses.dataclass
class DingStats:
    """What an extraction read, dropped and kept; `lmforge data ding` prints it, stats.json holds it."""

    input: str = ""
    direction: str = "de-en"
    lines_read: int = 0  # every line of the file
    comments: int = 0  # `#` lines
    blank: int = 0
    entries: int = 0  # the other lines
    malformed: int = 0  # entries without exactly one ` :: `
    mismatched_alternatives: int = 0  # entries with a different number of `|` alternatives per side
    alternatives: int = 0  # alternative pairs in the entries kept
    unbalanced_brackets: int = 0  # alternative pairs dropped for a bracket left unmatched
    candidates: int = 0  # synonym pairs (German x English) of the alternatives kept
    dropped: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(PAIR_REASONS, 0))
    pairs: int = 0  # kept
    groups: int = 0  # groups of pairs sharing a sentence (each goes to one split)
    splits: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(SPLITS, 0))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def strip_annotations(text: str) -> str | None:
    """`text` without {...} [...] (...) <...> (nested ones too) and with tidy spaces; None when a
    bracket is left unmatched (the alternative cannot be trusted to be text)."""
    while True:
        stripped = _INNER_ANNOTATION.sub("", text)
        if stripped == text:
            break
        text = stripped
    if _BRACKET.search(text):
        return None
    text = _SPACE.sub(" ", text).strip()
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


def synonyms(text: str) -> list[str]:
    return [s for s in (part.strip() for part in text.split(";")) if s]


def parse_entry(line: str) -> tuple[str, list[tuple[str, str]] | None, int]:
    """One non-comment line -> (status, [(German, English) alternative pairs], unbalanced count);
    status is "ok", "malformed" or "mismatched_alternatives" (pairs None unless "ok")."""
    sides = line.split(" :: ")
    if len(sides) != 2:
        return "malformed", None, 0
    german, english = (side.split("|") for side in sides)
    if len(german) != len(english):
        return "mismatched_alternatives", None, 0
    pairs, unbalanced = [], 0
    for de, en in zip(german, english):
        de, en = strip_annotations(unicodedata.normalize("NFC", de)), strip_annotations(unicodedata.normalize("NFC", en))
        if de is None or en is None:
            unbalanced += 1
            continue
        pairs.append((de, en))
    return "ok", pairs, unbalanced


def drop_reason(de: str, en: str, config: DingConfig) -> str | None:
    """The first filter (module docstring, step 3) a candidate fails, or None; `duplicate` is the caller's."""
    words = (len(de.split()), len(en.split()))
    if min(words) < config.min_words:
        return "too_short"
    if max(words) > config.max_words:
        return "too_long"
    if config.sentence_end and not (_SENTENCE_END.search(de) and _SENTENCE_END.search(en)):
        return "not_sentence"
    if _PLACEHOLDER.search(de) or _PLACEHOLDER.search(en):
        return "placeholder"
    if "/" in de or "/" in en:
        return "slash_variant"
    if de == en:
        return "identical"
    return None


def read_ding(path: str | Path = DEFAULT_DING, config: DingConfig | None = None) -> tuple[list[tuple[str, str]], DingStats]:
    """The kept (German, English) pairs of the dictionary at `path`, in file order, and the counts."""
    config = config or DingConfig()
    path = Path(path)
    stats = DingStats(input=str(path), direction="en-de" if config.reverse else "de-en")
    raw = read_bytes(path, f"the Ding dictionary file (Debian's is {DEFAULT_DING})",
                     if_missing=f" (the Ding German-English dictionary; install it with: {INSTALL_HINT})")
    seen: set[tuple[str, str]] = set()
    kept: list[tuple[str, str]] = []
    for lineno, line_bytes in enumerate(raw.splitlines(), 1):
        stats.lines_read += 1
        line = strict_decode(line_bytes, f"{path}:{lineno}").strip()
        if not line:
            stats.blank += 1
            continue
        if line.startswith("#"):
            stats.comments += 1
            continue
        stats.entries += 1
        status, alternatives, unbalanced = parse_entry(line)
        if alternatives is None:
            setattr(stats, status, getattr(stats, status) + 1)
            continue
        stats.alternatives += len(alternatives) + unbalanced
        stats.unbalanced_brackets += unbalanced
        for de_alt, en_alt in alternatives:
            for de, en in itertools.product(synonyms(de_alt), synonyms(en_alt)):
                stats.candidates += 1
                reason = drop_reason(de, en, config)
                if reason is None and (de, en) in seen:
                    reason = "duplicate"
                if reason is not None:
                    stats.dropped[reason] += 1
                    continue
                seen.add((de, en))
                kept.append((de, en))
    stats.pairs = len(kept)
    return kept, stats


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def split_pairs(pairs: list[tuple[str, str]], config: DingConfig) -> tuple[dict[str, list[tuple[str, str]]], int]:
    """(German, English) pairs -> {split: pairs in hash order}, and the number of groups (module
    docstring): a function of the set of pairs alone, whatever their order."""
    # Union-find over sentences; a pair joins its German and its English sentence.
    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def find(x: tuple[str, str]) -> tuple[str, str]:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for de, en in pairs:
        a, b = find(("de", de)), find(("en", en))
        if a != b:
            parent[max(a, b)] = min(a, b)  # a deterministic root, whatever the order of the pairs
    group_key: dict[tuple[str, str], tuple[int, str]] = {}
    for de, _en in pairs:
        root = find(("de", de))
        key = (_hash64(de), de)  # text breaks a (2^-64) tie, so the order stays total
        if root not in group_key or key < group_key[root]:
            group_key[root] = key
    members: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for pair in pairs:
        members.setdefault(find(("de", pair[0])), []).append(pair)

    out: dict[str, list[tuple[str, str]]] = {name: [] for name in SPLITS}
    bounds = {"val": (0.0, config.val_fraction, config.max_val),
              "test": (config.val_fraction, config.val_fraction + config.test_fraction, config.max_test)}
    full = dict.fromkeys(bounds, False)
    for root in sorted(group_key, key=group_key.__getitem__):
        u = group_key[root][0] / 2.0**64
        name = "train"
        for split, (lo, hi, cap) in bounds.items():
            if lo <= u < hi:
                # Groups come in hash order: the first one that would overflow the cap closes the
                # split, so the kept ones are always those with the smallest hashes.
                if not full[split] and len(out[split]) + len(members[root]) <= cap:
                    name = split
                else:
                    full[split] = True
        out[name].extend(members[root])
    for name in SPLITS:
        out[name].sort(key=lambda p: (_hash64(p[0] + "\t" + p[1]), p))
    return out, len(group_key)


def extract_ding(out: str | Path, path: str | Path = DEFAULT_DING, config: DingConfig | None = None,
                 overwrite: bool = False) -> DingStats:
    """Read the dictionary, keep its sentence pairs, write OUT/{train,val,test}.jsonl (one
    {"source", "target"} object a line, in the config's direction) and OUT/stats.json, atomically."""
    config = config or DingConfig()
    pairs, stats = read_ding(path, config)
    if not pairs:
        raise LmforgeError(f"{path}: no sentence pairs kept out of {stats.entries} entries "
                           f"(dropped: {', '.join(f'{k} {v}' for k, v in stats.dropped.items() if v) or 'none'})")
    splits, stats.groups = split_pairs(pairs, config)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for name, items in splits.items():
            stats.splits[name] = len(items)
            with atomic_file(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for de, en in items:
                    source, target = (en, de) if config.reverse else (de, en)
                    f.write(json.dumps({"source": source, "target": target}, ensure_ascii=False) + "\n")
        with atomic_file(tmp / "stats.json", "w", encoding="utf-8") as f:
            json.dump({"stats": stats.as_dict(), "config": dataclasses.asdict(config)}, f, indent=2, ensure_ascii=False)
            f.write("\n")
    return stats


def describe(stats: DingStats, out: str | Path) -> str:
    """The counts as `lmforge data ding` prints them."""
    lines = [f"read {stats.lines_read} lines of {stats.input}: {stats.entries} entries, {stats.comments} comments, "
             f"{stats.blank} blank",
             f"  entries dropped: {stats.malformed} malformed, {stats.mismatched_alternatives} with mismatched alternatives",
             f"  {stats.alternatives} alternative pairs ({stats.unbalanced_brackets} dropped: unbalanced brackets) "
             f"-> {stats.candidates} synonym pairs"]
    lines += [f"  dropped {n:>7}  {reason}" for reason, n in stats.dropped.items()]
    lines.append(f"kept {stats.pairs} {stats.direction} sentence pairs in {stats.groups} groups: "
                 + ", ".join(f"{name} {n}" for name, n in stats.splits.items()))
    lines.append(f"wrote {out}/ ({', '.join(f'{s}.jsonl' for s in SPLITS)}, stats.json)")
    return "\n".join(lines)
