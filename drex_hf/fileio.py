"""Writing folders so that readers never see half of them.

`staged_folder` gives a temporary folder beside the target; when the block completes, its files
move into place — by one rename when the target is new, else file by file: files not named in
`order` first, then `order` (its last file commits the set). On any error the temporary folder is
removed and the target is left as it was; a target that cannot be written is named in the error
(never the hidden temporary folder), before the block does any work where the OS says so.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from drex_hf.errors import OutputLocationError


@contextmanager
def staged_folder(target: Path, order: Sequence[str]) -> Iterator[Path]:
    """Yield a temporary folder; on success publish `order`'s files from it into `target`."""
    check_writable(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except PermissionError as err:
        raise _not_writable(target, target.parent, err) from None
    try:
        yield tmp
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; a published folder gets normal permissions
        for child in tmp.iterdir():  # and so do its files, whatever library wrote them
            if child.is_file():
                os.chmod(child, 0o666 & ~mask)
        try:
            if not target.exists():
                os.rename(tmp, target)
            else:
                others = sorted(set(os.listdir(tmp)) - set(order))  # files outside `order` go first
                for name in [*others, *order]:
                    os.replace(tmp / name, target / name)
        except PermissionError as err:
            raise _not_writable(target, target if target.exists() else target.parent, err) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable(target: Path) -> None:
    """Refuse, naming `target`, when the OS says it (or the folder it would be made in) is read-only."""
    where = target
    while not where.exists() and where != where.parent:
        where = where.parent
    if where.is_dir() and not os.access(where, os.W_OK | os.X_OK):
        raise _not_writable(target, where, None)


def _not_writable(target: Path, where: Path, err: OSError | None) -> OutputLocationError:
    what = "it" if where == target else f"{where}"
    reason = f" ({err.strerror})" if err is not None and err.strerror else ""
    return OutputLocationError(f"cannot write {target}: {what} is not writable{reason}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (changing it races with threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask
