"""Model dirs: the one on-disk form of a model that every stage reads and writes.

    config.json        {"lmforge_model": ModelConfig.to_dict(), "format_version": 1, ...extra}
    model.safetensors  the weights (never pickle: loading a checkpoint must not run code);
                       a tied lm_head is stored once, as tok_emb.weight
    tokenizer.json     + tokenizer_config.json, when a tokenizer is given
    manifest.json      size + SHA-256 of every file, written last (see lmforge.manifest)

A training checkpoint saved under FSDP holds `model/` instead of model.safetensors: every rank's
shard of every weight, written through torch.distributed.checkpoint (safetensors files whose
headers carry each part's offsets). It loads like any model dir: the parts are assembled here.

The model class comes from the config: a GPT, or for "arch": "encoder-decoder" a Seq2Seq
(lmforge.model.seq2seq); both save and load through the same functions.

A quantized model dir (`lmforge quantize`, a GGUF import) adds config.json "quantization" and
stores the linear weights and the embedding as GGUF blocks (lmforge.quant.store); it loads as a
GPT whose layers compute on those blocks (lmforge.quant.modules), or as fp32 with dequantize=True.

Everything is checked on load (the manifest when there is one, keys, shapes, a complete
safetensors file, finite weights), and a problem is reported as an LmforgeError naming the file
and what is wrong, not as a torch traceback or NaN output.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError
from lmforge.fsutil import atomic_dir, atomic_file
from lmforge.jsonio import read_json  # noqa: F401  (also read through here by interop.hf)
from lmforge.manifest import previous_good_hint, verify_manifest, write_manifest
from lmforge.model.config import ModelConfig
from lmforge.model.gpt import GPT, build_empty, skip_init

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHT_SHARDS_DIR = "model"  # an FSDP checkpoint's weights, one part per rank (lmforge.train.checkpoint)
MODEL_KEY = "lmforge_model"
FORMAT_VERSION = 1


def model_class(config: ModelConfig) -> type:
    """The class a config builds: GPT for a decoder, Seq2Seq for an encoder-decoder."""
    if config.is_encoder_decoder:
        from lmforge.model.seq2seq import Seq2Seq

        return Seq2Seq
    return GPT


def model_state_dict(model: GPT, quantized: dict | None = None) -> dict[str, torch.Tensor]:
    """The weights to save: detached, contiguous, a tied lm_head left out (safetensors refuses
    two names for one storage, and the config says to re-tie it on load); a quantized layer's
    weight as its GGUF blocks (`quantized`: `_quantized_weights(model)` when the caller has it)."""
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    out = {k: v.detach().contiguous() for k, v in sd.items()}
    blocks = _quantized_weights(model) if quantized is None else quantized
    out.update({k: torch.from_numpy(t.blocks) for k, t in blocks.items()})
    return out


def _quantized_weights(model: GPT) -> dict:
    """A quantized model's weights as GGUF blocks ({name: QuantTensor}; {} for a plain model)."""
    if not any(hasattr(m, "packed") for m in model.modules()):
        return {}  # without importing lmforge.quant (numba): scoring and training never load it
    from lmforge.quant.modules import packed_weights

    return {k: w.to_blocks() for k, w in packed_weights(model).items()}


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint for `config` holds."""
    with skip_init():  # uninitialised CPU memory: free until written (meta ops cost ~2 s once)
        model = model_class(config)(config)
    return {k: tuple(v.shape) for k, v in model_state_dict(model).items()}


def check_state_dict(sd: dict[str, torch.Tensor], config: ModelConfig, source: str,
                     expected: dict[str, tuple[int, ...]] | None = None) -> None:
    """Raise an LmforgeError naming `source` unless `sd` has exactly the tensors `config` needs
    (`expected`: those shapes, when the caller has a model for `config` at hand already)."""
    expected = expected if expected is not None else expected_shapes(config)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if unexpected:
        hint = " (the config ties embeddings, so lm_head.weight is not stored)" if "lm_head.weight" in unexpected else ""
        raise LmforgeError(f"{source}: unexpected tensors {_few(unexpected)}{hint}")
    if missing:
        raise LmforgeError(f"{source}: missing tensors {_few(missing)}")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise LmforgeError(f"{source}: {k} has shape {list(sd[k].shape)}, the config needs {list(shape)}")


def _few(names: list[str], n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating tensor holding a NaN or Inf, with how many; None if all are finite.

    A sum is NaN/Inf whenever an element is, and costs one read (135M fp32 weights: ~0.05 s on one
    core, against ~1.3 s for isfinite(t).all() on all of them); only a tensor whose sum is not
    finite (a bad value, or finite values that overflow when added) gets the exact check.
    """
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel() and not torch.isfinite(t.sum()):
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                return f"{name} ({bad} of {t.numel()} values are NaN or Inf)"
    return None


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    bad = first_non_finite(tensors)
    if bad is not None:
        raise LmforgeError(f"{source}: non-finite weights in {bad}; the file is corrupt or training diverged")


def model_from_state_dict(config: ModelConfig, sd: dict[str, torch.Tensor], *, source: str = "state dict",
                          device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> GPT:
    """Check `sd` against `config` and load it into a new model (a GPT, or a Seq2Seq for an
    encoder-decoder config; in eval mode).

    The model takes over `sd`'s tensors (converted to `device`/`dtype` where they differ) instead
    of copying them: a copy doubles peak memory, and tensors from `load_file` are memory maps of
    the file, so a model dir loads without reading all of it up front.
    """
    model = build_empty(config, device=device, dtype=dtype, cls=model_class(config))
    check_state_dict(sd, config, source, {k: tuple(v.shape) for k, v in model_state_dict(model).items()})
    sd = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in sd.items()}
    with torch.no_grad():
        model.load_state_dict(sd, strict=not config.tie_embeddings, assign=True)  # tied: lm_head is tok_emb
    model.tie_weights()  # assign replaced tok_emb.weight: point lm_head at the new one
    check_finite(sd, source)  # after the dtype conversion: a huge fp32 weight is Inf in fp16
    return model.eval()


def write_model_files(model: GPT, folder: str | os.PathLike, tokenizer=None,
                      extra_config: dict[str, Any] | None = None, weights: dict[str, torch.Tensor] | None = None,
                      with_weights: bool = True) -> None:
    """Write config.json, model.safetensors and the tokenizer into an existing folder.

    weights: what model.safetensors holds instead of the model's own state dict (a quantized
    model dir's blocks: lmforge.quant.store). with_weights=False: no model.safetensors (an FSDP
    checkpoint, whose ranks write the weights' shards themselves).

    Not atomic by itself: `save_model_dir` and the trainer's checkpoint writer call it inside a
    temporary folder that is renamed into place once complete.
    """
    folder = Path(folder)
    extra = dict(extra_config or {})
    if MODEL_KEY in extra:
        raise LmforgeError(f"extra_config must not contain {MODEL_KEY!r}: it is written from the model itself")
    if weights is None and with_weights:
        quantized = _quantized_weights(model)  # repacked once, for the entry and the file
        if quantized:  # a model loaded from a quantized dir saves its blocks as they are
            from lmforge.quant.store import QUANT_KEY, quant_entry

            extra[QUANT_KEY] = quant_entry(quantized)
        weights = model_state_dict(model, quantized)
    config = {MODEL_KEY: model.config.to_dict(), "format_version": FORMAT_VERSION, **extra}
    with atomic_file(folder / CONFIG_FILE, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    if with_weights:
        save_file({k: v.cpu() for k, v in weights.items()}, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(folder)


def save_model_dir(model: GPT, path: str | os.PathLike, tokenizer=None,
                   extra_config: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write a complete model dir at `path`, atomically (temp folder, fsync, rename)."""
    with atomic_dir(path, overwrite=overwrite) as tmp:
        write_model_files(model, tmp, tokenizer=tokenizer, extra_config=extra_config)
        write_manifest(tmp)
    return Path(path)


def read_model_config(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """The ModelConfig of a model dir, plus the whole config.json (for the extra entries)."""
    path = Path(path)
    if not path.is_dir():
        raise LmforgeError(f"{path}: not a folder (a model dir holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    file = path / CONFIG_FILE
    if not file.exists():
        raise LmforgeError(f"{path}: no {CONFIG_FILE} here, so not a model dir")
    raw = read_json(file)
    if not isinstance(raw, dict) or MODEL_KEY not in raw:
        hint = " (a Hugging Face model? import it first)" if isinstance(raw, dict) and "architectures" in raw else ""
        raise LmforgeError(f"{file}: no {MODEL_KEY!r} entry{hint}")
    return ModelConfig.from_dict(raw[MODEL_KEY], source=f"{file} {MODEL_KEY}"), raw


def read_safetensors(file: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    if not file.exists():
        raise LmforgeError(f"{file}: no such file")
    try:
        return load_file(str(file), device=str(device))
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) on bad files
        raise LmforgeError(f"{file}: not a complete safetensors file ({e})") from None


def load_model_dir(path: str | os.PathLike, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, dequantize: bool = False) -> tuple[GPT, ModelConfig]:
    """Load a model dir's model (a GPT, or a Seq2Seq for an encoder-decoder; in eval mode) and its
    ModelConfig, after checking its files against its manifest (when it has one). A quantized
    dir's layers compute on their blocks on the CPU in fp32; with dequantize=True, or another
    device or dtype, on fp32 copies."""
    path = Path(path)
    config, raw = read_model_config(path)
    verify_model_files(path)
    file = path / WEIGHTS_FILE
    if "quantization" in raw:  # GGUF blocks (lmforge.quant.store)
        if config.is_encoder_decoder:
            raise LmforgeError(f"{path}: a quantized encoder-decoder model dir is not supported")
        sd = read_safetensors(file, "cpu")
        if dequantize or torch.device(device).type != "cpu" or dtype != torch.float32:
            # The kernels are CPU fp32 code: another device or dtype computes on fp32 weights.
            from lmforge.quant.store import dequantize_state_dict

            sd = dequantize_state_dict(sd, raw["quantization"], str(file))
        else:
            return _model_from_quantized(config, sd, raw["quantization"], str(file)), config
    elif not file.exists() and (path / WEIGHT_SHARDS_DIR).is_dir():
        file = path / WEIGHT_SHARDS_DIR
        sd = {k: v.to(device) for k, v in read_weight_shards(file).items()}
    else:
        sd = read_safetensors(file, device)
    return model_from_state_dict(config, sd, source=str(file), device=device, dtype=dtype), config


@contextlib.contextmanager
def through_dcp(distributed: bool):
    """Around a torch.distributed.checkpoint call: it wraps any failure in a CheckpointException (a
    BaseException), which would bypass the one-line errors (a full disk says so, ENOSPC inside it
    is the cause): the first rank's own exception is raised instead. And without a process group
    (`distributed` False) it warns on every call that it assumes one process, which is exactly
    what is meant."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        if not distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            yield
        except dcp.CheckpointException as e:
            cause = next(iter(e.failures.values()), (None, None))[0]
            if isinstance(cause, Exception):
                raise cause from None
            raise


def read_weight_shards(folder: Path) -> dict[str, torch.Tensor]:
    """The whole weights of an FSDP checkpoint's `model/`, assembled in this process from every
    rank's parts (torch.distributed.checkpoint reads the offsets from the files' headers)."""
    import torch.distributed.checkpoint as dcp

    try:
        with through_dcp(distributed=False):
            reader = dcp.HuggingFaceStorageReader(str(folder))
            shapes = reader.read_metadata().state_dict_metadata
            weights = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in shapes.items()}
            dcp.load(weights, storage_reader=reader, no_dist=True)
    except Exception as e:  # a torn header, a missing part: safetensors and DCP raise their own kinds
        raise LmforgeError(f"{folder}: the weight shards do not assemble: {type(e).__name__}: {e}") from None
    return weights


def _model_from_quantized(config: ModelConfig, sd: dict[str, torch.Tensor], entry: Any, source: str) -> GPT:
    """A GPT whose listed layers compute on their blocks (lmforge.quant.modules); the rest of
    the weights loaded as `model_from_state_dict` loads them."""
    from lmforge.quant.modules import install_quantized
    from lmforge.quant.store import quant_tensors

    tensors = quant_tensors(sd, entry, source)
    # The modules with a block kernel: projections, the head and the token table. Anything else
    # stored in blocks (GPT-2's position table, which a GGUF export quantizes) is read as fp32.
    computed = {k: t for k, t in tensors.items() if k in ("tok_emb.weight", "lm_head.weight") or k.startswith("blocks.")}
    sd = {**sd, **{k: torch.from_numpy(np.ascontiguousarray(t.dequantize())) for k, t in tensors.items() if k not in computed}}
    tensors = computed
    model = build_empty(config)
    rest = {k: v for k, v in sd.items() if k not in tensors}
    # The fp32 tensors are checked here; the quantized ones' names and shapes where they are installed.
    expected = {k: tuple(v.shape) for k, v in model_state_dict(model).items() if k not in tensors}
    check_state_dict(rest, config, source, expected)
    with torch.no_grad():
        model.load_state_dict(rest, strict=False, assign=True)
    # After the biases were loaded (QuantLinear keeps them); sd is this function's own file map.
    install_quantized(model, tensors, source, release_source=True)
    model.tie_weights()
    check_finite(rest, source)
    return model.eval()


def is_quantized_dir(path: str | os.PathLike) -> bool:
    """Whether a model dir stores block-quantized weights (config.json "quantization")."""
    try:
        return "quantization" in read_json(Path(path) / CONFIG_FILE)
    except (LmforgeError, OSError):
        return False


def verify_model_files(path: Path) -> None:
    """Check a model (or adapter) dir against its manifest.json; a dir without one loads unchecked
    (older lmforge, or assembled by hand). A corrupt checkpoint names the run's previous good one."""
    try:
        verify_manifest(path)
    except LmforgeError as e:
        raise LmforgeError(f"{e}{previous_good_hint(path)}") from None
