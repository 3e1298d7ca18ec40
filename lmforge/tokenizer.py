"""Tokenizers: train (BPE, WordPiece, Unigram, word, char), load, encode, decode, inspect.

Everything goes through Hugging Face `tokenizers`, and a tokenizer lives in a folder as
`tokenizer.json` (loadable unchanged by `tokenizers.Tokenizer.from_file` and transformers'
`PreTrainedTokenizerFast`) plus `tokenizer_config.json`, which names the special-token roles
(bos/eos/pad/unk) and the chat template the way transformers expects.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Optional, Sequence

from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.errors import LmforgeError
from lmforge.fsutil import atomic_dir, write_text_atomic
from lmforge.jsonio import read_json_object

TokenizerKind = Literal["bpe", "wordpiece", "unigram", "word", "char"]
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"

# ChatML, the layout SmolLM2 and many open chat models use; rendered by transformers' Jinja
# `apply_chat_template` and by lmforge's own chat code alike.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
DEFAULT_VOCAB_SIZE = 8192
# What "every token the corpus has" asks the trainers for: more than any alphabet holds.
UNLIMITED_VOCAB = 1 << 30


@dataclass
class TokenizerTrainConfig:
    kind: TokenizerKind = "bpe"
    vocab_size: Optional[int] = None  # including special tokens (default: 8192; for char, every character of the corpus)
    min_frequency: int = 2  # a merge / word must occur this often to enter the vocabulary
    bos_token: str | None = "<|endoftext|>"
    eos_token: str | None = "<|endoftext|>"  # appended between documents when packing
    pad_token: str | None = "<|pad|>"
    unk_token: str = "<|unk|>"  # used by every kind but byte-level BPE, which has no unknowns
    chat_tokens: bool = True  # add <|im_start|>/<|im_end|> and a ChatML chat template
    extra_special_tokens: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in ("bpe", "wordpiece", "unigram", "word", "char"):
            raise LmforgeError(f"--kind must be one of bpe, wordpiece, unigram, word, char; got {self.kind!r}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise LmforgeError(f"--vocab-size must be positive, got {self.vocab_size}")
        if self.min_frequency < 1:
            raise LmforgeError(f"--min-frequency must be >= 1, got {self.min_frequency}")

    @property
    def target_size(self) -> int | None:
        """The vocabulary asked for; None: as many tokens as the corpus gives (char without --vocab-size)."""
        if self.vocab_size is None:
            return None if self.kind == "char" else DEFAULT_VOCAB_SIZE
        return self.vocab_size

    def special_tokens(self) -> list[str]:
        tokens: list[str] = []
        candidates = [self.bos_token, self.eos_token, self.pad_token]
        if self.kind != "bpe":
            candidates.insert(0, self.unk_token)
        if self.chat_tokens:
            candidates.extend(CHAT_TOKENS)
        for tok in [*candidates, *self.extra_special_tokens]:
            if tok and tok not in tokens:
                tokens.append(tok)
        return tokens


def _build(cfg: TokenizerTrainConfig, show_progress: bool):
    special = cfg.special_tokens()
    size = cfg.target_size
    common = dict(vocab_size=UNLIMITED_VOCAB if size is None else size, special_tokens=special, show_progress=show_progress)
    if cfg.kind == "bpe":
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            min_frequency=cfg.min_frequency, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **common
        )
    elif cfg.kind == "wordpiece":
        tok = HFTokenizer(models.WordPiece(unk_token=cfg.unk_token))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(min_frequency=cfg.min_frequency, **common)
    elif cfg.kind == "unigram":
        tok = HFTokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(unk_token=cfg.unk_token, **common)
    elif cfg.kind == "word":
        tok = HFTokenizer(models.WordLevel(unk_token=cfg.unk_token))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(min_frequency=cfg.min_frequency, **common)
    else:  # char: every character its own token, the vocabulary the corpus's alphabet
        tok = HFTokenizer(models.WordLevel(unk_token=cfg.unk_token))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(min_frequency=cfg.min_frequency, **common)
    return tok, trainer


def check_tokenizer_config(config: dict, where: str | os.PathLike) -> None:
    """The entries lmforge reads, with the types transformers writes: a role token is a string,
    null or an AddedToken object ({"content": str, ...}); the chat template a string or
    transformers' list of named templates."""
    for role in ("bos", "eos", "pad", "unk"):
        token = config.get(f"{role}_token")
        if isinstance(token, dict):
            token = token.get("content")
        if token is not None and not isinstance(token, str):
            raise LmforgeError(f"{where}: {role}_token must be a string, null or {{\"content\": string}}, "
                               f"got {json.dumps(config[f'{role}_token'])[:60]}")
    template = config.get("chat_template")
    named = isinstance(template, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in template)
    if template is not None and not isinstance(template, str) and not named:
        raise LmforgeError(f"{where}: chat_template must be a string or a list of {{name, template}} objects")


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's stand-in characters -> the bytes they encode (GPT-2's scheme: printable
    Latin-1 bytes stand for themselves, the others for the characters from U+0100 on, in order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_OF_CHAR = _byte_level_alphabet()


class Tokenizer:
    """An HF `tokenizers.Tokenizer` plus the special-token roles and chat template lmforge needs."""

    def __init__(self, hf: HFTokenizer, config: dict | None = None, raw_json: bytes | None = None):
        self.hf = hf
        self.config = dict(config or {})
        self._raw_json = raw_json if raw_json is not None else hf.to_str().encode("utf-8")
        self.sha256 = hashlib.sha256(self._raw_json).hexdigest()

    # -- loading and saving -------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load from a folder holding tokenizer.json (e.g. a model dir) or the file itself."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.exists():
            where = f"{path}: no {TOKENIZER_FILE} in this folder" if path.is_dir() else f"{path}: no such file"
            raise LmforgeError(where)
        raw = file.read_bytes()
        try:
            hf = HFTokenizer.from_str(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise LmforgeError(f"{file}: not a valid {TOKENIZER_FILE} (invalid UTF-8 at byte {e.start})") from None
        except BaseException as e:  # tokenizers raises bare Exceptions, and on some inputs a Rust panic (a BaseException)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LmforgeError(f"{file}: not a valid {TOKENIZER_FILE} ({first})") from None
        config = {}
        cfg_file = file.parent / CONFIG_FILE
        if cfg_file.exists():
            config = read_json_object(cfg_file, CONFIG_FILE)
            check_tokenizer_config(config, cfg_file)
        return cls(hf, config, raw)

    def save(self, folder: str | os.PathLike) -> None:
        """Write tokenizer.json byte for byte (its hash identifies the tokenizer) and the config."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / TOKENIZER_FILE, "wb") as f:
            f.write(self._raw_json)
        write_text_atomic(folder / CONFIG_FILE, json.dumps(self.config, indent=2, ensure_ascii=False))

    # -- single tokens ------------------------------------------------------------------
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for. Byte-level BPE tokens can hold part of a UTF-8
        character, which `decode([id])` shows as U+FFFD: these are the real bytes (OpenAI's
        log-prob `bytes` field). Added tokens are their text; other vocabularies their decoding."""
        added = self._added_tokens.get(token_id)
        if added is not None:
            return added.encode("utf-8")
        piece = self.hf.id_to_token(token_id)
        table = _BYTE_OF_CHAR if self._byte_level else None
        if piece is not None and table is not None and all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        return self.hf.decode([token_id], skip_special_tokens=False).encode("utf-8")

    @functools.cached_property
    def _added_tokens(self) -> dict[int, str]:
        return {i: t.content for i, t in self.hf.get_added_tokens_decoder().items()}

    @functools.cached_property
    def _byte_level(self) -> bool:
        decoder = json.loads(self._raw_json).get("decoder") or {}
        parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
        return any(d.get("type") == "ByteLevel" for d in parts)

    # -- special tokens -----------------------------------------------------------------
    def _role_id(self, role: str) -> int | None:
        token = self.config.get(f"{role}_token")
        if isinstance(token, dict):  # transformers sometimes stores AddedToken dicts
            token = token.get("content")
        return None if token is None else self.hf.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._role_id("bos")

    @property
    def eos_id(self) -> int | None:
        return self._role_id("eos")

    @property
    def pad_id(self) -> int | None:
        return self._role_id("pad")

    @property
    def chat_template(self) -> str | None:
        template = self.config.get("chat_template")
        if isinstance(template, list):  # transformers' named templates: "default" is the chat one
            template = next((t["template"] for t in template if t["name"] == "default"), None)
        return template

    def special_tokens(self) -> dict[str, int]:
        return {t.content: i for i, t in sorted(self.hf.get_added_tokens_decoder().items()) if t.special}

    def require_eos(self, where: str) -> int:
        eos = self.eos_id
        if eos is None:
            raise LmforgeError(
                f"{where}: the tokenizer names no eos token (set eos_token in {CONFIG_FILE})"
            )
        return eos

    # -- encoding -----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def kind(self) -> str:
        # The model object's class, not tokenizer.json's "model.type": tokenizers infers the model
        # when that key is missing (found by the fuzz suite, a KeyError before).
        return type(self.hf.model).__name__

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # The fast variant skips character offsets, which nothing here reads: 15-27% less time on
        # the stdlib corpus (bench/bench_data.py).
        return [e.ids for e in self.hf.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(i)


def train_tokenizer(
    texts: Iterable[str], cfg: TokenizerTrainConfig, *, source: str = "corpus", show_progress: bool = True,
    notify: Callable[[str], None] | None = None,
) -> Tokenizer:
    """Train on an iterator of documents; refuse a vocabulary larger than the corpus supports, and
    `notify` (one line) when it comes out larger than asked (byte-level BPE never has fewer than
    its 256 byte tokens plus the special tokens)."""
    hf, trainer = _build(cfg, show_progress)
    seen_chars = 0

    def counted(items: Iterable[str]) -> Iterator[str]:
        nonlocal seen_chars
        for text in items:
            seen_chars += len(text)
            yield text

    try:
        hf.train_from_iterator(counted(texts), trainer)
    except LmforgeError:
        raise
    except Exception as e:  # the Rust trainers raise plain Exceptions
        raise LmforgeError(f"{source}: tokenizer training failed ({e})") from None
    actual = hf.get_vocab_size(with_added_tokens=True)
    if seen_chars == 0:
        raise LmforgeError(f"{source}: no text to train on (the corpus is empty)")
    target = cfg.target_size
    if target is not None and actual < target:
        raise LmforgeError(
            f"{source}: the corpus supports only {actual} tokens for a {cfg.kind} tokenizer at "
            f"min-frequency {cfg.min_frequency}, less than --vocab-size {target}; "
            "lower --vocab-size or --min-frequency, or add text"
        )
    if target is not None and actual > target and notify is not None:
        floor = "256 byte tokens + " if cfg.kind == "bpe" else "its alphabet + "
        notify(f"--vocab-size {target} is below the smallest {cfg.kind} vocabulary for this corpus "
               f"({floor}{len(cfg.special_tokens())} special tokens): the tokenizer has {actual} tokens")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": cfg.bos_token,
        "eos_token": cfg.eos_token,
        "pad_token": cfg.pad_token,
        "unk_token": cfg.unk_token if cfg.kind != "bpe" else None,
        "clean_up_tokenization_spaces": False,
        "lmforge": {"kind": cfg.kind, "train_config": asdict(cfg)},
    }
    if cfg.chat_tokens:
        config["chat_template"] = CHATML_TEMPLATE
    return Tokenizer(hf, {k: v for k, v in config.items() if v is not None})


def save_tokenizer_dir(tok: Tokenizer, out: str | os.PathLike, overwrite: bool = False) -> Path:
    with atomic_dir(out, overwrite=overwrite) as tmp:
        tok.save(tmp)
    return Path(out)


@dataclass
class TokenizerReport:
    """What `lmforge tokenizer inspect` shows: the vocabulary made visible."""

    kind: str
    vocab_size: int
    special_tokens: dict[str, int]
    roles: dict[str, str | None]
    longest_tokens: list[str]
    sample_bytes: int = 0
    sample_tokens: int = 0
    most_frequent: list[tuple[str, int]] = field(default_factory=list)

    @property
    def bytes_per_token(self) -> float | None:
        return self.sample_bytes / self.sample_tokens if self.sample_tokens else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bytes_per_token"] = self.bytes_per_token
        return d


def _display(tok: Tokenizer, i: int) -> str:
    """A token as the text it stands for (byte-level symbols decoded), quoted to show spaces."""
    text = tok.decode([i])
    return json.dumps(text, ensure_ascii=False)


def inspect_tokenizer(tok: Tokenizer, sample: Iterable[str] = (), top: int = 20) -> TokenizerReport:
    specials = tok.special_tokens()
    vocab = tok.hf.get_vocab(with_added_tokens=False)
    ordinary = [i for i in vocab.values() if i not in specials.values()]
    longest = sorted(ordinary, key=lambda i: (-len(tok.decode([i]).encode("utf-8")), i))[:top]
    report = TokenizerReport(
        kind=tok.kind,
        vocab_size=tok.vocab_size,
        special_tokens=specials,
        roles={r: tok.config.get(f"{r}_token") for r in ("bos", "eos", "pad", "unk")},
        longest_tokens=[_display(tok, i) for i in longest],
    )
    counts: Counter[int] = Counter()
    for text in sample:
        ids = tok.encode(text)
        counts.update(ids)
        report.sample_bytes += len(text.encode("utf-8"))
        report.sample_tokens += len(ids)
    report.most_frequent = [(_display(tok, i), n) for i, n in counts.most_common(top)]
    return report
