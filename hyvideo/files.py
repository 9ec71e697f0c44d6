"""Files that are never seen half-written, and cheap fingerprints of weight files.

`write_atomic` is the one way this project writes a file that something later trusts (run
manifests and checkpoints, videos, quantized caches): temp file in the same folder, fsync, rename
over the target (atomic on POSIX), fsync the folder. A crash at any instant leaves either the old
file or the new one, never a mix; the temp file is removed on failure. A killed process cannot
remove its temp file (`temp_path`): `remove_dead_temps` clears those before a large rewrite.

`file_fingerprint` identifies a weight file without reading it: size, mtime (ns) and the sha256 of
its first and last MiB (2 MiB read per file). A re-downloaded, replaced or truncated file changes
it; resumable runs and the quantized caches both compare fingerprints with `fingerprint_mismatch`.
"""

import errno
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import HyVideoError

_MIB = 1 << 20


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (not possible on every platform: then skipped)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """Where this process builds `path` (a file or a folder) before renaming it into place."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_dead_temps(path: Path) -> None:
    """Remove the temp files or folders for `path` left by processes that no longer run (a killed
    quantize leaves one as large as the cache); those of running processes are kept."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rpartition("-")[2]
        if pid.isdigit() and not _running(int(pid)):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def write_atomic(path: Path, data: "bytes | Callable[[BinaryIO], None]", what: str) -> Path:
    """Write `data` (bytes, or a function that writes into the open binary file) to `path`
    atomically. On failure the previous file at `path` is untouched and a HyVideoError names
    `what` and the cause (a full disk as such)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise HyVideoError(f"the disk is full: could not save {what} to {path}") from None
        raise HyVideoError(f"could not save {what} to {path}: {error.strerror or error}") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    fsync_dir(path.parent)
    return path


def file_fingerprint(paths: list[Path], root: Path | None = None) -> list[dict]:
    """One entry per file, sorted by name: {"file" (relative to `root` when under it, else the
    file name), "size", "mtime_ns", "head_sha256", "tail_sha256"}."""
    prints = []
    for path in sorted({Path(p) for p in paths}):
        try:
            stat = path.stat()
            with open(path, "rb") as f:
                head = hashlib.sha256(f.read(_MIB)).hexdigest()
                f.seek(max(0, stat.st_size - _MIB))
                tail = hashlib.sha256(f.read(_MIB)).hexdigest()
        except OSError as error:
            raise HyVideoError(f"cannot read weight file {path}: {error.strerror or error}") from None
        name = str(path.relative_to(root)) if root is not None and path.is_relative_to(root) else path.name
        prints.append({"file": name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                       "head_sha256": head, "tail_sha256": tail})
    return prints


def fingerprint_mismatch(recorded: list[dict], current: list[dict]) -> str | None:
    """None if the files are the same, else a short reason naming the first one that differs."""
    old, new = {p["file"]: p for p in recorded}, {p["file"]: p for p in current}
    for name in sorted(old.keys() | new.keys()):
        if name not in new:
            return f"{name} is no longer there"
        if name not in old:
            return f"{name} was not part of the model the run started with"
        if old[name]["size"] != new[name]["size"]:
            return f"{name} changed size ({old[name]['size']} -> {new[name]['size']} bytes)"
        if old[name].get("head_sha256") != new[name].get("head_sha256") or old[name].get("tail_sha256") != new[name].get("tail_sha256"):
            return f"{name} has other contents"
        if old[name]["mtime_ns"] != new[name]["mtime_ns"]:
            return f"{name} was modified since"
    return None
