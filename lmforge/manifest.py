"""manifest.json: the size and SHA-256 of every file in a folder lmforge wrote (model dirs, best/,
checkpoints, adapter dirs), written last, just before the folder is renamed into place.

Loading a folder that has one checks it, so a flipped byte or a truncated copy is refused with one
line naming the file instead of producing NaNs or garbage text. Folders without one (written by
older lmforge or by hand) load unchecked.

Hashing costs ~2 s for a 540 MB model, on every load. After a full check, a stamp in the cache
($LMFORGE_HOME/verified/) records each file's identity (device, inode, size, mtime and ctime in
ns); a later load whose files still have that identity skips the hashing. Any write to a file,
even one that restores its mtime, moves its ctime, so an edit or a flipped byte written through
the file system is always hashed again; what the stamp cannot see is a change beneath the file
system (a disk's own bit rot).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.fsutil import sha256_file, write_text_atomic

MANIFEST = "manifest.json"


def write_manifest(folder: Path) -> None:
    """Record every file under `folder`; call it after the last file is written."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[str(path.relative_to(folder))] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    write_text_atomic(folder / MANIFEST, json.dumps({"files": files}, indent=1))


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _stamp_path(folder: Path) -> Path:
    from lmforge.interop.registry import cache_dir  # the cache's one definition

    key = hashlib.sha256(str(folder.resolve()).encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return cache_dir() / "verified" / f"{key}.json"


def _identities(folder: Path, rels: list[str]) -> dict[str, list[int]]:
    return {rel: _identity(folder / rel) for rel in [MANIFEST, *rels]}


def _stamp_matches(folder: Path, rels: list[str]) -> bool:
    try:
        stamp = json.loads(_stamp_path(folder).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return stamp == {"folder": str(folder.resolve()), "files": _identities(folder, rels)}


def _write_stamp(folder: Path, rels: list[str]) -> None:
    """Best effort: a cache that cannot be written only means hashing again next time."""
    try:
        write_text_atomic(_stamp_path(folder), json.dumps({"folder": str(folder.resolve()), "files": _identities(folder, rels)}))
    except (OSError, LmforgeError):
        pass


def verify_manifest(folder: Path, *, required: bool = False) -> bool:
    """Check every file `folder`'s manifest lists: present, same size, same SHA-256.

    Returns False when there is no manifest and `required` is off (nothing to check); raises an
    LmforgeError naming the first file that differs.
    """
    manifest = folder / MANIFEST
    if not manifest.is_file():
        if required:
            raise LmforgeError(f"{folder}: incomplete (no {MANIFEST})")
        return False
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        entries = [(rel, int(info["bytes"]), str(info["sha256"])) for rel, info in files.items()]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError):
        raise LmforgeError(f"{manifest}: unreadable manifest") from None
    # Sizes of all files first: a truncated copy is caught without hashing anything.
    for rel, size, _ in entries:
        path = folder / rel
        if not path.is_file():
            raise LmforgeError(f"{path}: missing (listed in {MANIFEST})")
        if path.stat().st_size != size:
            raise LmforgeError(f"{path}: {path.stat().st_size} bytes, {MANIFEST} says {size} (truncated)")
    rels = [rel for rel, _, _ in entries]
    if _stamp_matches(folder, rels):
        return True
    for rel, _, sha in entries:
        if sha256_file(folder / rel) != sha:
            raise LmforgeError(f"{folder / rel}: SHA-256 differs from {MANIFEST} (corrupt: changed after it was written; "
                               f"if you edited it on purpose, delete {folder / MANIFEST} to load the folder unchecked)")
    _write_stamp(folder, rels)
    return True


def is_intact(folder: Path) -> bool:
    """A folder with a manifest that all its files match."""
    try:
        return verify_manifest(folder, required=True)
    except LmforgeError:
        return False


def previous_good_hint(folder: Path) -> str:
    """For a corrupt checkpoint `RUN/checkpoints/step-N`: which earlier one of the run is intact
    (a suffix for the error message); '' for a folder that is not a checkpoint."""
    if folder.parent.name != "checkpoints" or not folder.name.startswith("step-"):
        return ""
    earlier = sorted(p for p in folder.parent.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name < folder.name)
    for candidate in reversed(earlier):
        if is_intact(candidate):
            return f"; the previous good checkpoint is {candidate} (resume from it with --resume-from)"
    return "; no earlier good checkpoint"
