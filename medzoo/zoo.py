"""The user's local zoo: every model they trained or pulled, by name.

Each model is a folder with a ``medzoo.json`` manifest (see docs/model-folder.md); the index
``$MEDZOO_HOME/zoo.json`` maps names to folders. The index is written atomically under a lock, and an entry
is added only once its folder is complete, so an interrupted train or pull never leaves an entry that looks
usable.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from medzoo.host import unknown
from medzoo.objects import MedzooError

MANIFEST = "medzoo.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")


def home() -> Path:
    return Path(os.environ.get("MEDZOO_HOME") or Path.home() / ".cache" / "medzoo")


def index_path() -> Path:
    return home() / "zoo.json"


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yield a temp folder beside `final`; on success it takes `final`'s place by rename (an old `final` is moved
    aside first and removed after, so a folder stands there at every moment), on any error (Ctrl-C included)
    it is removed: nothing half-written ever stands at `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _locked():
    home().mkdir(parents=True, exist_ok=True)
    with open(home() / ".zoo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_index() -> dict:
    path = index_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MedzooError(f"{path}: the local zoo index is unreadable ({exc}); move it aside to start afresh") \
            from None
    if not isinstance(data, dict):
        raise MedzooError(f"{path}: the local zoo index must be a JSON object")
    return data


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MedzooError(f"{folder}: not a medzoo model folder (no {MANIFEST})") from None
    except (OSError, ValueError) as exc:
        raise MedzooError(f"{path}: unreadable manifest: {exc}") from None


def write_manifest(folder: Path, manifest: dict) -> None:
    for key in ("recipe", "method", "base_model"):
        if not manifest.get(key):
            raise MedzooError(f"{folder}/{MANIFEST}: manifest needs {key!r}")
    write_json_atomic(Path(folder) / MANIFEST, manifest)


def register(name: str, folder: Path, replace: bool = False) -> dict:
    """Add a complete model folder to the index under `name` and return its entry."""
    if not NAME.match(name):
        raise MedzooError(f"zoo name {name!r} may hold only letters, digits, '.', '_', '-', '@'")
    folder = Path(folder).resolve()
    manifest = read_manifest(folder)
    with _locked():
        index = _read_index()
        if name in index and not replace and Path(index[name]["path"]) != folder:
            raise MedzooError(f"zoo name {name!r} is taken by {index[name]['path']}; `medzoo rm {name}` first")
        entry = {"path": str(folder), "recipe": manifest["recipe"], "method": manifest["method"],
                 "base_model": manifest["base_model"], "source": manifest.get("source", ""),
                 "added": time.strftime("%Y-%m-%dT%H:%M:%S")}
        index[name] = entry
        write_json_atomic(index_path(), index)
    return entry


def entries() -> dict:
    with _locked():
        return _read_index()


def get(name_or_path: str) -> tuple[str, Path, dict]:
    """(name, folder, manifest) for a zoo name or a path to a model folder."""
    path = Path(name_or_path)
    if (path / MANIFEST).is_file():
        return path.name, path.resolve(), read_manifest(path)
    index = entries()
    if name_or_path not in index:
        raise MedzooError(unknown("local model", name_or_path, index).replace(
            "is not registered", "is not in your zoo (see `medzoo list --local`)"))
    folder = Path(index[name_or_path]["path"])
    if not (folder / MANIFEST).is_file():
        raise MedzooError(f"local model {name_or_path!r}: its folder {folder} is gone; `medzoo rm {name_or_path}`")
    return name_or_path, folder, read_manifest(folder)


def remove(name: str, delete_files: bool = True) -> Path:
    with _locked():
        index = _read_index()
        if name not in index:
            raise MedzooError(unknown("local model", name, index))
        folder = Path(index.pop(name)["path"])
        write_json_atomic(index_path(), index)
    if delete_files and folder.is_dir() and folder.resolve().is_relative_to(home().resolve()):
        shutil.rmtree(folder)  # only folders the zoo owns; a run under ./runs stays where it is
    return folder


def models_dir() -> Path:
    return home() / "models"
