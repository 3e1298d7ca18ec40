"""GGUF (llama.cpp's single-file format) <-> lmforge: read, dequantize, import; write, export.

Reading goes through the `gguf` package (an interop extra, imported only here, on use):
metadata is the model config and the tokenizer; Q8_0/Q4_0/Q4_1 matrices are kept as their blocks
(lmforge.quant; a model dir of them is a quantized model dir, lmforge.quant.store) beside their
fp32 values, other tensors are dequantized to fp32 numpy with `gguf.quants.dequantize`. Two
layout differences from our (= Hugging Face's) weights, both undone on blocks as on values:

- Llama q/k rows: llama.cpp's converter permutes them so RoPE can rotate adjacent pairs
  (2i, 2i+1); we, like HF, rotate (i, i + head_dim/2). `_to_gguf_rows` is the converter's
  `permute`, `_from_gguf_rows` the inverse that transformers' GGUF loader applies.
- names: blk.{i}.attn_q / attn_k / attn_v are three tensors where we keep one fused qkv,
  ffn_gate / ffn_up two where we keep mlp.fc: concatenated on import, split on export.

GGUF "gpt2" files store every matrix as [out, in] like nn.Linear, so GPT-2 needs no transposes
(transformers transposes them back to its Conv1D layout).

The tokenizer is rebuilt from `tokenizer.ggml.*` as transformers' GGUF converter builds it for
byte-level BPE (`tokenizer.ggml.model == "gpt2"`): BPE over the file's vocabulary and merges, a
ByteLevel pre-tokenizer (GPT-2 regex) and decoder, control tokens added as special tokens. So a
text tokenizes to the same ids here as in `AutoTokenizer.from_pretrained(dir, gguf_file=...)`.
"""

from __future__ import annotations

import json
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.fsutil import atomic_path, check_output_free
from lmforge.interop.bundle import ModelBundle, assemble_model, save_bundle, stop_token_ids
from lmforge.interop.hf import family_of
from lmforge.model.config import ModelConfig
from lmforge.model.io import first_non_finite, model_state_dict
from lmforge.quant.formats import FORMATS, QuantTensor, from_gguf_bytes, quantize
from lmforge.quant.store import main_format
from lmforge.tokenizer import Tokenizer

ARCHITECTURES = ("llama", "gpt2")
# Tensor types we dequantize. The K-quants are read with gguf's reference dequantizers too; the
# i-quants and ternary types are refused: rare in files of the sizes lmforge targets.
READ_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
WRITE_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
# ggml type ids of the block formats an import keeps as blocks instead of dequantizing.
_KEPT_TYPES = frozenset(f.ggml_type for f in FORMATS.values())
# llama.cpp pre-tokenizer names whose split, on a vocabulary trained with it, gives the same
# tokens as GPT-2's ByteLevel regex (transformers builds exactly that for them). smollm and
# starcoder split digits one by one first, but their merges never join digits, so the result is
# the same.
BYTE_LEVEL_PRE = ("default", "gpt-2", "gpt2", "smollm", "starcoder", "refact", "codeshell")
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 3, 4, 5


def _gguf():
    try:
        import gguf
    except ImportError:
        raise LmforgeError("GGUF support needs the `gguf` package: pip install 'lmforge[interop]'") from None
    return gguf


@lru_cache(maxsize=1)
def _reader_class():
    gguf = _gguf()

    class PlainArrayReader(gguf.GGUFReader):
        """gguf's reader over a plain ndarray view of its memory map instead of the np.memmap.

        The reader slices its map once per metadata value (~250,000 times for a 49k-token
        vocabulary), and every np.memmap slice runs Python-level hooks: 4.5 s to open SmolLM2's
        file, 1 s with plain views of the same pages.
        """

        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, value):
            self._plain = value.view(np.ndarray) if isinstance(value, np.memmap) else value

        def _get(self, offset, dtype, count=1, override_order=None):
            # gguf returns a short slice past the end of the file: an array length read from a
            # damaged header then loops over empty reads, without end and growing in memory.
            arr = super()._get(offset, dtype, count, override_order)
            if len(arr) < int(count):
                raise ValueError(f"{int(count)} values at byte {offset} run past the end of the file ({len(self.data)} bytes)")
            return arr

    return PlainArrayReader


# -- reading ------------------------------------------------------------------------------------
@dataclass
class GgufFile:
    """An open GGUF: its metadata as plain Python values and its tensors (not yet dequantized)."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, Any]  # name -> gguf.ReaderTensor (data is a memory map of the file)

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def key(self, name: str, default: Any = None, *, required: bool = False) -> Any:
        """An architecture key, e.g. key("block_count") reads "llama.block_count"."""
        full = f"{self.arch}.{name}"
        if full not in self.metadata:
            if required:
                raise LmforgeError(f"{self.path}: metadata key {full!r} is missing")
            return default
        return self.metadata[full]

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in PyTorch order (GGUF lists dimensions innermost first)."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape))


def _field_value(field) -> Any:
    """A metadata value as Python: str, int, float, bool, or a list of them.

    Read from the field's raw parts (as transformers does) rather than `ReaderField.contents()`,
    which older gguf releases lack.
    """
    gguf = _gguf()
    T = gguf.GGUFValueType
    types = list(field.types)
    if not types:
        return None

    def one(part, vtype):
        if vtype == T.STRING:
            return bytes(part).decode("utf-8")
        value = part[0].item()
        if vtype == T.FLOAT32:  # the shortest decimal that is the same float32: 1e-05, not 9.99999974e-06
            return float(str(np.float32(value)))
        return bool(value) if vtype == T.BOOL else value

    if types[0] == T.ARRAY:
        if len(types) != 2:
            raise ValueError(f"nested arrays in {field.name} are not supported")
        return [one(field.parts[i], types[1]) for i in field.data]
    return one(field.parts[field.data[0]], types[0])


def open_gguf(path: str | os.PathLike) -> GgufFile:
    """Parse a GGUF's header, metadata and tensor table; a bad file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != b"GGUF":
        raise LmforgeError(f"{path}: not a GGUF file (it starts with {head[:4]!r}, a GGUF with b'GGUF')")
    if len(head) < 24:
        raise LmforgeError(f"{path}: truncated GGUF file ({size} bytes, shorter than its header)")
    n_tensors, n_kv = struct.unpack("<QQ", head[8:24])
    # Every tensor entry takes >= 24 bytes and every key >= 12: counts beyond that are garbage
    # (and would make the reader allocate or loop without end).
    if n_tensors * 24 + n_kv * 12 > size:
        raise LmforgeError(f"{path}: truncated or corrupt GGUF file (its header lists {n_tensors} tensors and "
                           f"{n_kv} keys, more than {size} bytes can hold)")
    try:
        reader = _reader_class()(path)
    except (ValueError, IndexError, OverflowError, KeyError, UnicodeDecodeError, struct.error, MemoryError) as e:
        raise LmforgeError(f"{path}: truncated or corrupt GGUF file ({e})") from None
    try:
        metadata = {name: _field_value(field) for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path}: corrupt GGUF metadata ({e})") from None
    return GgufFile(path, metadata, {t.name: t for t in reader.tensors})


def _dequantize(g: GgufFile, name: str) -> torch.Tensor:
    gguf = _gguf()
    t = g.tensors[name]
    qtype = t.tensor_type.name
    if qtype not in READ_TYPES:
        raise LmforgeError(
            f"{g.path}: tensor {name} is stored as {qtype}, which lmforge cannot dequantize "
            f"(supported: {', '.join(READ_TYPES)})"
        )
    arr = gguf.quants.dequantize(t.data, t.tensor_type)
    shape = g.shape(name)
    if arr.size != int(np.prod(shape)):
        raise LmforgeError(f"{g.path}: tensor {name} holds {arr.size} values, its shape {list(shape)} needs {int(np.prod(shape))}")
    arr = arr.reshape(shape)
    if isinstance(arr, np.memmap) or not arr.flags.writeable or arr.dtype != np.float32:
        arr = np.array(arr, dtype=np.float32)  # F32 tensors are views of the read-only file map
    return torch.from_numpy(_finite(g, name, arr))


def _from_gguf_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> rotate_half halves).
    It moves whole rows, so it works alike on values and on rows of blocks (a tensor or an array)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _to_gguf_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf.py `permute`: rotate_half halves -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_plan(config: ModelConfig, arch: str) -> list[tuple[str, list[str]]]:
    """(lmforge name, GGUF names concatenated along dim 0 to make it) for every stored tensor."""
    suffixes = ("weight", "bias") if config.bias else ("weight",)
    plan: list[tuple[str, list[str]]] = [("tok_emb.weight", ["token_embd.weight"])]
    if arch == "gpt2":
        plan.append(("pos_emb.weight", ["position_embd.weight"]))
    norm_suffixes = ("weight", "bias") if config.norm == "layernorm" and config.bias else ("weight",)
    for i in range(config.n_layer):
        ours, blk = f"blocks.{i}.", f"blk.{i}."
        for s in norm_suffixes:
            plan += [(f"{ours}norm_1.{s}", [f"{blk}attn_norm.{s}"]), (f"{ours}norm_2.{s}", [f"{blk}ffn_norm.{s}"])]
        for s in suffixes:
            if arch == "gpt2":
                plan += [(f"{ours}attn.qkv.{s}", [f"{blk}attn_qkv.{s}"]), (f"{ours}mlp.fc.{s}", [f"{blk}ffn_up.{s}"])]
            else:
                plan += [(f"{ours}attn.qkv.{s}", [f"{blk}attn_{p}.{s}" for p in "qkv"]),
                         (f"{ours}mlp.fc.{s}", [f"{blk}ffn_gate.{s}", f"{blk}ffn_up.{s}"])]
            plan += [(f"{ours}attn.proj.{s}", [f"{blk}attn_output.{s}"]), (f"{ours}mlp.proj.{s}", [f"{blk}ffn_down.{s}"])]
    plan += [(f"norm_f.{s}", [f"output_norm.{s}"]) for s in norm_suffixes]
    if not config.tie_embeddings:
        plan.append(("lm_head.weight", ["output.weight"]))
    return plan


def _rows_transform(config: ModelConfig, gguf_name: str) -> int | None:
    """The head count to (un)permute a Llama q/k tensor by, else None."""
    if ".attn_q." in gguf_name:
        return config.n_head
    if ".attn_k." in gguf_name:
        return config.n_kv_head
    return None


def _model_name(g: GgufFile) -> str:
    name = g.metadata.get("general.basename") or g.metadata.get("general.name") or g.path.stem
    size = g.metadata.get("general.size_label")
    label = f"{name}-{size}" if size and str(size).lower() not in str(name).lower() else str(name)
    return "-".join(label.lower().split())


def config_from_gguf(g: GgufFile, name: str | None = None) -> ModelConfig:
    """The ModelConfig a GGUF's metadata describes; what lmforge cannot represent is an error."""
    arch = g.arch
    if arch not in ARCHITECTURES:
        raise LmforgeError(f"{g.path}: unsupported architecture {arch!r} (lmforge imports {', '.join(ARCHITECTURES)})")
    for t in ("token_embd.weight", "output_norm.weight"):
        if t not in g.tensors:
            raise LmforgeError(f"{g.path}: tensor {t} is missing")
    vocab, n_embd = g.shape("token_embd.weight")
    n_head = int(g.key("attention.head_count", required=True))
    common = dict(
        name=name or _model_name(g), vocab_size=vocab, n_embd=n_embd,
        block_size=int(g.key("context_length", required=True)), n_layer=int(g.key("block_count", required=True)),
        n_head=n_head, intermediate_size=int(g.key("feed_forward_length", required=True)),
        tie_embeddings="output.weight" not in g.tensors,
    )
    if g.key("expert_count", 0):
        raise LmforgeError(f"{g.path}: mixture-of-experts models ({arch}.expert_count) are not supported")
    try:
        if arch == "gpt2":
            return ModelConfig(**common, n_kv_head=n_head, norm="layernorm", mlp="gelu", position="learned", bias=True,
                               norm_eps=float(g.key("attention.layer_norm_epsilon", required=True)))
        head_dim = n_embd // n_head
        rope_dims = g.key("rope.dimension_count", head_dim)
        if rope_dims != head_dim or g.key("attention.key_length", head_dim) != head_dim:
            raise LmforgeError(f"{g.path}: partial rotary or a head size other than embedding/heads "
                               f"(rope.dimension_count {rope_dims}, head size {head_dim}) is not supported")
        scaling = g.key("rope.scaling.type", "none")
        if scaling not in ("none", None) or "rope_freqs.weight" in g.tensors:
            raise LmforgeError(f"{g.path}: RoPE scaling ({scaling if scaling != 'none' else 'rope_freqs'}) is not supported")
        q_bias, mlp_bias = "blk.0.attn_q.bias" in g.tensors, "blk.0.ffn_up.bias" in g.tensors
        if q_bias != mlp_bias:
            raise LmforgeError(f"{g.path}: biases on the attention but not the MLP (or the reverse) are not supported")
        return ModelConfig(**common, n_kv_head=int(g.key("attention.head_count_kv", n_head)), norm="rmsnorm",
                           mlp="swiglu", position="rope", bias=q_bias,
                           norm_eps=float(g.key("attention.layer_norm_rms_epsilon", required=True)),
                           rope_theta=float(g.key("rope.freq_base", 10000.0)))
    except LmforgeError as e:
        msg = str(e)
        raise LmforgeError(msg if msg.startswith(str(g.path)) else f"{g.path}: {msg.removeprefix('model config: ')}") from None


def _blocks(g: GgufFile, name: str) -> QuantTensor | None:
    """A GGUF matrix stored in a block format lmforge keeps (Q8_0, Q4_0, Q4_1), as a QuantTensor
    over a copy of its bytes; None for any other type."""
    t = g.tensors[name]
    if int(t.tensor_type) not in _KEPT_TYPES or len(t.shape) != 2:
        return None
    try:
        # A copy: the reader's array is a read-only view of the file map, which torch cannot wrap.
        q = from_gguf_bytes(np.array(t.data, dtype=np.uint8), int(t.tensor_type), name)
    except LmforgeError as e:
        raise LmforgeError(f"{g.path}: tensor {e}") from None
    if q.shape != g.shape(name):
        raise LmforgeError(f"{g.path}: tensor {name} holds {q.format.name} blocks for shape {list(q.shape)}, "
                           f"its shape is {list(g.shape(name))}")
    return q


def _finite(g: GgufFile, name: str, arr: np.ndarray) -> np.ndarray:
    if not np.isfinite(arr).all():  # numpy's check: 25x faster than torch.isfinite here
        raise LmforgeError(f"{g.path}: tensor {name} holds NaN or infinite values (a corrupt file?)")
    return arr


def weights_from_gguf(g: GgufFile, config: ModelConfig, progress: Callable[[int, int], None] | None = None,
                      *, keep_blocks: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, QuantTensor]]:
    """(fp32 weights under lmforge names with q/k rows back in rotate_half order, the blocks kept).

    keep_blocks: every weight whose GGUF parts are all Q8_0, all Q4_0 or all Q4_1 matrices is also
    returned as those blocks, with the same rows permuted and concatenated (a block lies within
    one row, so rows of blocks move like rows of values); its fp32 value is then those blocks
    dequantized by lmforge.quant, the values a model dir of them loads as (and gguf's, tested).
    Other types (F32, F16, BF16, Q5_0, Q5_1, K-quants) and weights whose parts differ in type
    are fp32 only.
    """
    plan = _tensor_plan(config, g.arch)
    needed = {n for _, names in plan for n in names}
    missing = sorted(needed - set(g.tensors))
    if missing:
        raise LmforgeError(f"{g.path}: tensors missing for a {g.arch} model: {', '.join(missing[:5])}")
    extra = sorted(set(g.tensors) - needed - {"output.weight"})
    if extra:
        raise LmforgeError(f"{g.path}: tensors lmforge has no place for: {', '.join(extra[:5])}")
    sd: dict[str, torch.Tensor] = {}
    blocks: dict[str, QuantTensor] = {}
    for k, (ours, names) in enumerate(plan):
        held = [_blocks(g, n) for n in names] if keep_blocks else [None]
        if all(q is not None for q in held) and len({q.format for q in held}) == 1:
            rows = []
            for n, q in zip(names, held):
                heads = _rows_transform(config, n) if g.arch == "llama" else None
                rows.append(_from_gguf_rows(q.blocks, heads) if heads else q.blocks)
            whole = rows[0] if len(rows) == 1 else np.concatenate(rows, axis=0)
            q = QuantTensor(held[0].format, (whole.shape[0], held[0].shape[1]), np.ascontiguousarray(whole))
            values = q.dequantize()
            if not np.isfinite(values).all():  # an fp16 scale that is NaN/Inf: name the GGUF tensor
                bad_row = int(np.argwhere(~np.isfinite(values))[0][0])
                ends = np.cumsum([p.shape[0] for p in held])
                _finite(g, names[int(np.searchsorted(ends, bad_row, side="right"))], values)
            blocks[ours] = q
            sd[ours] = torch.from_numpy(values)
        else:
            parts = []
            for n in names:
                t = _dequantize(g, n)
                heads = _rows_transform(config, n) if g.arch == "llama" else None
                parts.append(_from_gguf_rows(t, heads) if heads else t)
            sd[ours] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            del parts
        del held
        if progress:
            progress(k + 1, len(plan))
    return sd, blocks


def state_dict_from_gguf(g: GgufFile, config: ModelConfig,
                         progress: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
    """Dequantized fp32 weights under lmforge names, q/k rows back in rotate_half order."""
    return weights_from_gguf(g, config, progress, keep_blocks=False)[0]


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what byte-level BPE vocabularies are spelled in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_from_gguf(g: GgufFile) -> Tokenizer:
    """The file's tokenizer as an HF `tokenizers` BPE + tokenizer_config (roles, chat template)."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    md = g.metadata
    kind, tokens = md.get("tokenizer.ggml.model"), md.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise LmforgeError(f"{g.path}: no tokenizer in this file (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    if kind != "gpt2":
        raise LmforgeError(f"{g.path}: tokenizer type {kind!r} is not supported "
                           "(lmforge reads byte-level BPE, tokenizer.ggml.model = 'gpt2')")
    pre = md.get("tokenizer.ggml.pre", "default")
    if pre not in BYTE_LEVEL_PRE:
        raise LmforgeError(f"{g.path}: pre-tokenizer {pre!r} is not supported (supported: {', '.join(BYTE_LEVEL_PRE)})")
    merges_raw = md.get("tokenizer.ggml.merges")
    if not merges_raw:
        raise LmforgeError(f"{g.path}: byte-level BPE tokenizer without tokenizer.ggml.merges")
    merges = []
    for m in merges_raw:
        pair = m.split(" ")
        if len(pair) != 2:
            raise LmforgeError(f"{g.path}: malformed merge {m!r} in tokenizer.ggml.merges")
        merges.append((pair[0], pair[1]))
    types = md.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise LmforgeError(f"{g.path}: {len(tokens)} tokens but {len(types)} token types")
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    # As transformers does: a token not spelled in the byte alphabet is respelled through it.
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)}
    try:
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                    end_of_word_suffix="", fuse_unk=False))
    except Exception as e:  # tokenizers raises plain Exceptions, e.g. for a merge of unknown tokens
        raise LmforgeError(f"{g.path}: the tokenizer's vocabulary and merges do not fit together ({e})") from None
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
               if ty == _TOKEN_CONTROL and set(t) <= alphabet]
    if control:
        hf.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types)
            if ty == _TOKEN_USER_DEFINED and t in vocab]
    if user:
        hf.add_tokens(user)

    def role(key: str) -> str | None:
        i = md.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": role("bos_token_id"), "eos_token": role("eos_token_id"),
        "pad_token": role("padding_token_id"), "unk_token": role("unknown_token_id"),
        "add_bos_token": bool(md.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(md.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "chat_template": md.get("tokenizer.chat_template"),
        "model_max_length": g.key("context_length"),
        "lmforge": {"gguf": {"model": kind, "pre": pre}},
    }
    return Tokenizer(hf, {k: v for k, v in config.items() if v is not None})


def read_gguf(path: str | os.PathLike, name: str | None = None,
              progress: Callable[[int, int], None] | None = None, *, keep_blocks: bool = True) -> ModelBundle:
    """A GGUF file as a bundle: fp32 model, tokenizer, stop tokens, provenance, and (keep_blocks)
    its Q8_0/Q4_0/Q4_1 matrices as blocks (see weights_from_gguf)."""
    g = open_gguf(path)
    config = config_from_gguf(g, name)
    tokenizer = tokenizer_from_gguf(g)  # before the weights: a missing tokenizer fails fast
    if tokenizer.vocab_size > config.vocab_size:
        raise LmforgeError(f"{g.path}: the tokenizer has {tokenizer.vocab_size} tokens, the embedding only {config.vocab_size} rows")
    sd, blocks = weights_from_gguf(g, config, progress, keep_blocks=keep_blocks)
    if not config.tie_embeddings and "lm_head.weight" in sd and torch.equal(sd["lm_head.weight"], sd["tok_emb.weight"]):
        # llama.cpp's converter writes GPT-2's output matrix as a copy of the embedding: tie it again
        # (exact, and one matrix less in memory).
        del sd["lm_head.weight"]
        blocks.pop("lm_head.weight", None)
        config = config.replace(tie_embeddings=True)
    model = assemble_model(config, sd, str(g.path))
    del sd
    extra = [g.metadata.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    generation = {"stop_token_ids": stop_token_ids(tokenizer, [i for i in extra if isinstance(i, int)])}
    types = sorted({t.tensor_type.name for t in g.tensors.values()})
    source = {"format": "gguf", "path": str(Path(path).resolve()), "file_size": g.path.stat().st_size,
              "architecture": g.arch, "tensor_types": types, "name": g.metadata.get("general.name")}
    return ModelBundle(model, tokenizer, generation, source, blocks, main_format(blocks) if blocks else None)


IMPORT_DTYPES = (None, "fp32")  # None: keep the blocks; "fp32": dequantize every tensor


def import_gguf(path: str | os.PathLike, out: str | os.PathLike, *, name: str | None = None,
                overwrite: bool = False, source: dict | None = None, dtype: str | None = None) -> Path:
    """Convert a GGUF into a model dir (weights, tokenizer files, generation.json).

    dtype None: a quantized model dir keeping the file's Q8_0/Q4_0/Q4_1 matrices as their blocks
    (lmforge.quant.store), everything else fp32; "fp32": every weight dequantized to fp32."""
    if dtype not in IMPORT_DTYPES:
        raise LmforgeError(f"GGUF import dtype must be fp32 or None (keep the file's blocks); got {dtype!r}")
    check_output_free(out, overwrite)
    bundle = read_gguf(path, name, keep_blocks=dtype is None)
    if source:
        bundle.source.update(source)
    return save_bundle(bundle, out, overwrite=overwrite)


# -- writing ------------------------------------------------------------------------------------
def _byte_level_pre(tokenizer: Tokenizer, where: str) -> str:
    """The llama.cpp pre-tokenizer name that splits text as this tokenizer's pre-tokenizer does."""
    raw = json.loads(tokenizer.hf.to_str())
    if raw["model"]["type"] != "BPE" or (raw.get("decoder") or {}).get("type") != "ByteLevel":
        raise LmforgeError(f"{where}: only byte-level BPE tokenizers can be written to GGUF "
                           f"(this one is {raw['model']['type']} with a {(raw.get('decoder') or {}).get('type')} decoder)")
    recorded = (tokenizer.config.get("lmforge") or {}).get("gguf", {}).get("pre")
    if recorded:
        return recorded
    pre = raw.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers") or []
    if (pre.get("type") == "Sequence" and len(steps) == 2 and steps[0] == {"type": "Digits", "individual_digits": True}
            and steps[1].get("type") == "ByteLevel" and steps[1].get("use_regex", True)):
        return "smollm"
    raise LmforgeError(f"{where}: no llama.cpp pre-tokenizer matches this tokenizer's pre-tokenizer ({json.dumps(pre)[:120]})")


def _gguf_vocab(tokenizer: Tokenizer, n_vocab: int, where: str) -> tuple[list[str], list[int], list[str]]:
    """tokens (ids 0..n_vocab-1, unused ids padded as llama.cpp's converter does), types, merges."""
    if tokenizer.vocab_size > n_vocab:
        raise LmforgeError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens, the model only {n_vocab}")
    by_id = {i: t for t, i in tokenizer.hf.get_vocab(with_added_tokens=True).items()}
    added = tokenizer.hf.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(n_vocab):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(_TOKEN_NORMAL if i not in added else _TOKEN_CONTROL if added[i].special else _TOKEN_USER_DEFINED)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(_TOKEN_UNUSED)
    merges = json.loads(tokenizer.hf.to_str())["model"].get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return tokens, types, merges


@contextmanager
def _closed_on_error(writer):
    """GGUFWriter leaves its file open when a write fails (a full disk): close it, ignoring the
    flush of bytes that do not fit either, so removing the temp file frees its space."""
    try:
        yield writer
    except BaseException:
        for f in writer.fout or []:
            try:
                f.close()
            except OSError:
                pass
        writer.fout = None
        raise


def write_gguf(bundle: ModelBundle, path: str | os.PathLike, *, dtype: str = "f32",
               overwrite: bool = False) -> dict[str, Any]:
    """Write a bundle as a GGUF llama.cpp runs: 2-D weights as `dtype` (f32, f16, q8_0, q4_0 or
    q4_1), norms and biases in f32 as llama.cpp's converter keeps them. A bundle's blocks are
    written as they are (rows split and permuted, never requantized): all of them, each in its
    own format, when `dtype` is the bundle's main block format (a q4_1 dir's q8_0 embedding stays
    q8_0); otherwise those already in `dtype`. Returns what was written."""
    gguf = _gguf()
    path = Path(path)
    config, tokenizer = bundle.config, bundle.tokenizer
    where = str(path)
    if dtype not in WRITE_TYPES:
        raise LmforgeError(f"GGUF dtype must be one of {', '.join(WRITE_TYPES)}; got {dtype!r}")
    arch = family_of(config)
    if arch == "gpt2" and config.mlp != "gelu":
        raise LmforgeError(f"model {config.name!r}: llama.cpp's gpt2 uses the tanh GELU; this model's "
                           f"mlp={config.mlp} (exact erf GELU) has no GGUF equivalent")
    check_output_free(path, overwrite)
    pre = _byte_level_pre(tokenizer, where)
    tokens, types, merges = _gguf_vocab(tokenizer, config.vocab_size, where)
    Q = gguf.GGMLQuantizationType
    qtype = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}[dtype]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                 "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[dtype]
    block_types = (Q.Q8_0, Q.Q4_0, Q.Q4_1)
    main = bundle.quant_format or (main_format(bundle.blocks) if bundle.blocks else None)
    kept = {name: q for name, q in bundle.blocks.items() if dtype == main or q.format.name == dtype}

    sd = model_state_dict(bundle.model)
    bad = first_non_finite(sd)
    if bad is not None:  # llama.cpp would load them and print garbage
        raise LmforgeError(f"{where}: not written: model {config.name!r} has non-finite weights in {bad}")
    # llama.cpp's GPT-2 graph reads output.weight; its converter writes the tied matrix twice.
    plan = _tensor_plan(config.replace(tie_embeddings=config.tie_embeddings and arch == "llama"), arch)
    if "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    written: dict[str, int] = {}
    with atomic_path(path) as tmp, _closed_on_error(gguf.GGUFWriter(tmp, arch)) as w:
        w.add_name(config.name)
        w.add_context_length(config.block_size)
        w.add_embedding_length(config.n_embd)
        w.add_block_count(config.n_layer)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(config.n_head)
        if arch == "llama":
            w.add_head_count_kv(config.n_kv_head)
            w.add_layer_norm_rms_eps(config.norm_eps)
            w.add_rope_freq_base(config.rope_theta)
            w.add_rope_dimension_count(config.head_dim)
            w.add_vocab_size(config.vocab_size)
        else:
            w.add_layer_norm_eps(config.norm_eps)
        w.add_file_type(file_type)
        if qtype in block_types:
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        for role, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id)):
            i = getattr(tokenizer, f"{role}_id")
            if i is not None:
                add(i)
        w.add_add_bos_token(bool(tokenizer.config.get("add_bos_token", False)))
        if tokenizer.chat_template:
            w.add_chat_template(tokenizer.chat_template)
        eot = [i for i in bundle.generation.get("stop_token_ids", []) if i != tokenizer.eos_id]
        if eot:
            w.add_eot_token_id(int(eot[0]))
        for ours, names in plan:
            sizes = config.fused_parts(ours) if arch == "llama" else []  # gpt2 keeps attn_qkv fused
            # Blocks are whole rows, so splitting and permuting rows works on them as on fp32.
            stored = ours if ours in kept else ("tok_emb.weight" if ours == "lm_head.weight" and "tok_emb.weight" in kept
                                                and config.tie_embeddings else None)
            source = torch.from_numpy(kept[stored].blocks) if stored else sd[ours]
            parts = source.split(sizes, dim=0) if sizes else [source]
            for n, part in zip(names, parts):
                heads = _rows_transform(config, n) if arch == "llama" else None
                t = (_to_gguf_rows(part, heads) if heads else part).detach().contiguous()
                if stored:
                    own = Q(kept[stored].format.ggml_type)
                    w.add_tensor(n, t.numpy(), raw_dtype=own)
                    written[own.name] = written.get(own.name, 0) + 1
                    continue
                t = t.float().numpy()
                t_type = qtype if t.ndim == 2 else Q.F32
                if t_type in block_types and t.shape[-1] % 32:
                    t_type = Q.F16  # blocks need rows in blocks of 32, as in llama.cpp
                if t_type == Q.F16 and t.size and np.abs(t).max() > np.finfo(np.float16).max:
                    raise LmforgeError(f"{where}: not written: {ours} has values beyond f16's range (±65504); "
                                       "export with --dtype f32 or q8_0")
                if t_type in block_types:  # lmforge's quantizer: the bytes ggml's reference code makes
                    data = quantize(t, dtype, ours).blocks
                else:
                    data = gguf.quants.quantize(t, t_type)
                w.add_tensor(n, data, raw_dtype=t_type if t_type in block_types else None)
                written[t_type.name] = written.get(t_type.name, 0) + 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return {"path": str(path), "architecture": arch, "dtype": dtype, "tensor_types": written,
            "bytes": path.stat().st_size}

