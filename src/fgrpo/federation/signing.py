"""The key that proves a file was written by fgrpo for this user: an HMAC key kept outside every run folder.

A plain SHA-256 inside a checkpoint only detects damage: anyone who can write
the run folder can change the state (say `server_round = -5`) and recompute
it. A keyed digest (HMAC-SHA-256) can be recomputed only by whoever holds the
key, so the key lives where a run folder never is: `checkpoint.key` in the
user's fgrpo cache (`FGRPO_CACHE`, default `~/.cache/fgrpo`), created on
first use with 32 random bytes and mode 0600, and refused when other users
could read it (as ssh refuses a private key that is readable by others).

Deleting the key costs only the ability to `--resume` the runs it signed:
they are then refused, since fgrpo can no longer tell that it wrote them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from fgrpo.cache import cache_root
from fgrpo.errors import ConfigError

KEY_NAME = "checkpoint.key"
KEY_BYTES = 32


def key_path() -> Path:
    return cache_root() / KEY_NAME


def _create_key(path: Path) -> None:
    """Write a fresh key with mode 0600; when another process wins the race, its key stands."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{KEY_NAME}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(secrets.token_hex(KEY_BYTES) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)  # atomic and never replaces: a reader sees no key or a whole one
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


def signing_key() -> bytes:
    """This user's checkpoint key, created on first use; a clear error when it is unsafe or unreadable."""
    path = key_path()
    try:
        if not path.exists():
            _create_key(path)
        info = path.stat()
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as error:
        why = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
        raise ConfigError(
            f"fgrpo's checkpoint key '{path}' cannot be read or created ({why}); set FGRPO_CACHE to a folder of "
            "your own"
        ) from None
    if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO)):
        raise ConfigError(
            f"fgrpo's checkpoint key '{path}' is not private (it must belong to you with mode 0600, like an ssh "
            f"key); run `chmod 600 {path}`, or delete it to make a new one (runs it signed can then not be resumed)"
        )
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigError(
            f"fgrpo's checkpoint key '{path}' is malformed (expected {2 * KEY_BYTES} hex digits); delete it to make "
            "a new one (runs it signed can then not be resumed)"
        )
    return key


def keyed_digest(key: bytes, parts) -> str:
    """HMAC-SHA-256 over `parts` (byte strings, in order)."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(part)
    return mac.hexdigest()


def same_digest(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("ascii", "replace"), b.encode("ascii", "replace"))
