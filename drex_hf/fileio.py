"""Writing folders so that readers never see half of them.

`staged_folder` gives a temporary folder beside the target; when the block completes, its files
move into place — by one rename when the target is new, else file by file: files not named in
`order` first, then `order` (its last file commits the set). On any error the temporary folder is
removed and the target is left as it was; a target that cannot be written is named in the error
(never the hidden temporary folder). `check_output_folder` refuses, before any work starts, a
folder that could not be written at the end; `staged_folder` runs it first.
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
    check_output_folder(target, "output folder", beside=True)
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


def check_output_folder(path: str | os.PathLike, what: str, beside: bool = False) -> Path:
    """`path`, if it is (or can be created as) a folder this process can write into; else an
    `OutputLocationError` naming `what` (the option or key that gave it) and the path. Writability is
    tried by creating and removing a file in the nearest existing folder (permission bits do not show
    a read-only mount, or what root may do). `beside`: also the folder that holds `path`, where
    `staged_folder` makes its temporary folder. Creates nothing."""
    path = Path(path).expanduser()
    folders = [path, path.parent] if beside and path.exists() else [path]
    for folder in folders:
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            where = "is a file" if existing == path else f"cannot be created: {existing} is a file"
            raise OutputLocationError(f"{what} {path} {where}, not a folder")
        try:
            handle, probe = tempfile.mkstemp(prefix=".drex-write-check-", dir=existing)
        except OSError as err:
            raise OutputLocationError(f"{what} {path}: {existing} is not writable ({err.strerror})") from None
        os.close(handle)
        os.unlink(probe)
    return path


@contextmanager
def removed_if_left_empty(folders: Sequence[str | os.PathLike]) -> Iterator[None]:
    """If the block raises, remove again the folders among `folders` (and their parents) that did
    not exist before it and are empty after it; a folder with anything in it stays."""
    new: list[Path] = []
    for folder in folders:
        folder = Path(folder).expanduser().absolute()
        while not folder.exists() and folder != folder.parent:
            new.append(folder)
            folder = folder.parent
    try:
        yield
    except BaseException:
        for folder in sorted(set(new), key=lambda p: len(p.parts), reverse=True):  # deepest first
            try:
                folder.rmdir()
            except OSError:  # not empty, or already gone
                pass
        raise


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
