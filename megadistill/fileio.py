"""Durable small writes: whole-line appends (a failed write leaves no partial line) and atomic file replacement."""
from __future__ import annotations

import os
from pathlib import Path

from megadistill.errors import UserError


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_error(path: Path, e: OSError) -> UserError:
    return UserError(f"could not write {path}: {e.strerror or e} (disk full or over a quota?). Nothing of this "
                     "write was kept; what was written before is intact. Free space, then resume with "
                     "train.resume=true")


def append_line(path, line: str) -> None:
    """Append one line (flush + fsync): on any write error the file is cut back to its previous length, so a reader
    never sees half a line, and a UserError says what happened."""
    path = Path(path)
    data = (line if line.endswith("\n") else line + "\n").encode("utf-8")
    fd = os.open(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise _write_error(path, e) from None
    finally:
        os.close(fd)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write to a temp name, fsync, rename: readers see the old or the new file, never a torn one; on a write error
    the temp file is removed and the old file stays."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, e) from None
    fsync_dir(path.parent)
