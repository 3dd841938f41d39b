"""Files fgrpo writes into a folder the user names (certificates, node keys, a report, a merged model), and the
manifest that proves which of them fgrpo wrote.

A user's files are sacred: such a folder may already hold the user's own `ca.crt` or `config.json`. So every
file written here is recorded, with its SHA-256, in the folder's `.fgrpo-files.json`. An existing file is
replaced only when the caller asked to (`--overwrite`) AND the manifest shows that fgrpo wrote exactly these
bytes; anything else (a file fgrpo never wrote, or one edited since) is refused before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from fgrpo.errors import ConfigError

MANIFEST_NAME = ".fgrpo-files.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read(folder: Path, key: str) -> dict[str, str]:
    try:
        data = json.loads((Path(folder) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    table = data.get(key) if isinstance(data, dict) else None
    if not isinstance(table, dict):
        return {}
    return {name: value for name, value in table.items() if isinstance(name, str) and isinstance(value, str)}


def read_manifest(folder: Path) -> dict[str, str]:
    """File name -> SHA-256 of what fgrpo wrote in `folder`; {} when there is no (readable, well-formed) manifest."""
    return _read(folder, "files")


def wrote(folder: Path, name: str, manifest: dict[str, str] | None = None) -> bool:
    """True when `folder/name` is a regular file whose bytes are what fgrpo recorded writing there."""
    path = Path(folder) / name
    manifest = read_manifest(folder) if manifest is None else manifest
    try:
        return name in manifest and path.is_file() and not path.is_symlink() and _sha256(path) == manifest[name]
    except OSError:
        return False


def describe(path: Path) -> str:
    """What sits at `path`, in words, for an error message ('a directory', 'a FIFO', ...)."""
    try:
        mode = path.lstat().st_mode
    except OSError:
        return "missing"
    for check, word in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if check(mode):
            return word
    return "a file"


def make_folder(folder: Path, what: str) -> None:
    """Create `folder` (and its parents), or say in one line why it cannot be (a file in the way, no permission)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{what} '{folder}' is {describe(folder)}, not a folder; name a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"{what} '{folder}': a part of this path is a file, not a folder; name a folder") from None
    except OSError as exc:
        raise ConfigError(f"{what} '{folder}' cannot be created: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} '{folder}' is not writable; choose another folder")


def check_replaceable(folder: Path, names: Iterable[str], *, overwrite: bool, what: str) -> None:
    """Refuse, before anything is written, when a file to write exists and may not be replaced (module docstring)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    existing = [name for name in names if os.path.lexists(folder / name)]
    if not existing:
        return
    shown = ", ".join(existing[:4]) + (f" and {len(existing) - 4} more" if len(existing) > 4 else "")
    if not overwrite:
        raise ConfigError(
            f"{what} '{folder}' already holds {shown}; pass --overwrite to replace files fgrpo wrote there, "
            "or choose another folder"
        )
    foreign = [name for name in existing if not wrote(folder, name, manifest)]
    if foreign:
        raise ConfigError(
            f"refusing to overwrite {', '.join(foreign[:4])} in '{folder}': fgrpo did not write "
            f"{'it' if len(foreign) == 1 else 'them'} (or the file changed since; see {MANIFEST_NAME}), and fgrpo "
            "replaces only its own files; move them away or choose another folder"
        )


def _record(folder: Path, digests: dict[str, str], what: str, dropped: Iterable[str] = ()) -> None:
    """Add `digests` (written by the `what` command) to the folder's manifest, forget `dropped`; atomically."""
    files = {**read_manifest(folder), **digests}
    writers = {**_read(folder, "written_as"), **{name: what for name in digests}}
    for name in dropped:
        files.pop(name, None)
        writers.pop(name, None)
    manifest = {"created_by": "fgrpo", "files": dict(sorted(files.items())), "written_as": dict(sorted(writers.items()))}
    tmp = folder / f"{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST_NAME)


def write_files(folder: Path, contents: dict[str, bytes], *, overwrite: bool, what: str, private: Iterable[str] = ()) -> list[Path]:
    """Write `contents` (name -> bytes) into `folder` under the manifest's rule; `private` files get mode 0600."""
    folder = Path(folder)
    make_folder(folder, what)
    check_replaceable(folder, contents, overwrite=overwrite, what=what)
    private = set(private)
    paths = []
    try:
        for name, data in contents.items():
            path = folder / name
            tmp = folder / f".{name}.fgrpo-tmp"
            if os.path.lexists(tmp):  # fgrpo's own leftover from an interrupted write (never followed if a link)
                tmp.unlink()
            # created anew (O_EXCL): a private key is never readable by others, not even for an instant
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if name in private else 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            paths.append(path)
    except OSError as exc:
        raise ConfigError(f"{what} '{folder}': cannot write {exc.filename or 'a file'}: {exc.strerror or exc}") from None
    finally:
        _record(folder, {p.name: hashlib.sha256(contents[p.name]).hexdigest() for p in paths}, what)
    return paths


@contextmanager
def staged_folder(folder: Path, *, overwrite: bool, what: str, names: Iterable[str] | None = None) -> Iterator[Path]:
    """A scratch folder inside `folder` to save into (e.g. `save_pretrained`, whose file names are known only
    afterwards); on success its files move into `folder` under the manifest's rule, and the files an earlier
    `what` save wrote there that this one did not are removed (if still fgrpo's bytes). On any error nothing in
    `folder` changes. `names`: every name the caller may write, checked before it starts; without them the
    folder must be empty unless `overwrite`."""
    folder = Path(folder)
    make_folder(folder, what)
    if names is not None:
        check_replaceable(folder, names, overwrite=overwrite, what=what)
    elif not overwrite:  # cheap refusal before the caller does expensive work
        present = [p.name for p in folder.iterdir() if p.name != MANIFEST_NAME]
        if present:
            raise ConfigError(
                f"{what} '{folder}' is not empty ({', '.join(sorted(present)[:4])}); pass --overwrite to replace "
                "files fgrpo wrote there, or choose an empty or new folder"
            )
    stage = Path(tempfile.mkdtemp(prefix=".fgrpo-stage-", dir=folder))
    try:
        yield stage
        written = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
        check_replaceable(folder, written, overwrite=overwrite, what=what)
        manifest = read_manifest(folder)
        writers = _read(folder, "written_as")
        stale = [n for n in manifest if n not in written and writers.get(n) == what and wrote(folder, n, manifest)]
        digests = {name: _sha256(stage / name) for name in written}
        for name in written:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / name, folder / name)
        for name in stale:
            (folder / name).unlink()
        _record(folder, digests, what, dropped=stale)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
