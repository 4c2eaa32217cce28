"""Outputs of the command line: checked before any work, written beside their place and moved in when complete.

A file is written to a temporary name in its directory and moved over the old one with ``os.replace``; a directory is
written as a temporary sibling, then the old one is renamed aside, the new one renamed into place and the old one
removed. A run that fails or is interrupted removes what it wrote and leaves an old output as it was.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ._cli_checks import CliError, one_line

if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import FrameType

Kind = Literal["file", "dir"]

#: Set by the SIGINT handler of :func:`noticing_interrupts`, so an interrupt a library swallowed is still seen.
_interrupt = threading.Event()


def check_out(path: Path, *, overwrite: bool, kind: Kind) -> None:
    """Refuse an output that exists (unless ``overwrite``) or cannot be written, before any work.

    Writability is tried: a probe directory is created and removed in the nearest existing folder on the way to
    ``path``, where the output's missing parents and its temporary sibling will be created.
    """
    if os.path.lexists(path) and not overwrite:
        msg = f"--out {path} exists; pass --overwrite to replace it"
        raise CliError(msg)
    if kind == "file" and path.is_dir():
        msg = f"--out {path} is a directory; give a file name"
        raise CliError(msg)
    folder = path.absolute().parent
    while not os.path.lexists(folder):
        folder = folder.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".cellcircuits-probe-", dir=folder))
    except OSError as err:
        msg = f"--out {path} cannot be written: cannot create files in {folder} ({err.strerror or one_line(err)})"
        raise CliError(msg) from None


@contextmanager
def staged(path: Path, kind: Kind) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write the output into, put in its place when the block ends without error.

    On any exception (``KeyboardInterrupt`` included) the temporary output and the parent folders made for it are
    removed, and the exception goes on. An interrupt seen by :func:`noticing_interrupts` but swallowed on the way
    is raised here, before the output is put in place.
    """
    made = _make_parents(path.absolute().parent)
    try:
        temp = _temporary(path, kind)
    except BaseException:
        _remove_empty(made)
        raise
    try:
        yield temp
        if _interrupt.is_set():
            raise KeyboardInterrupt
        _put_in_place(temp, path)
    except BaseException:
        _remove(temp)
        _remove_empty(made)
        raise


@contextmanager
def noticing_interrupts() -> Iterator[threading.Event]:
    """Within the block SIGINT raises ``KeyboardInterrupt`` as usual and also sets the returned event.

    Outside the main thread, where signal handlers cannot be set, the event is only cleared.
    """
    _interrupt.clear()
    if threading.current_thread() is not threading.main_thread():
        yield _interrupt
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        _interrupt.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield _interrupt
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def _default_mode(directory: bool) -> int:
    """The permissions a new file or directory gets under the current umask (temporary ones are private)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _temporary(path: Path, kind: Kind) -> Path:
    folder = path.absolute().parent
    if kind == "dir":
        temp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=folder))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=folder)
        os.close(fd)
        temp = Path(name)
    os.chmod(temp, _default_mode(kind == "dir"))
    return temp


def _put_in_place(temp: Path, path: Path) -> None:
    """Move the complete ``temp`` to ``path``: one ``os.replace`` for a file, renames aside and in for a directory."""
    if temp.is_file():
        os.replace(temp, path)
        return
    with _sigint_deferred():
        if not os.path.lexists(path):
            os.rename(temp, path)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.absolute().parent))
        os.rmdir(old)
        os.rename(path, old)
        try:
            os.rename(temp, path)
        except BaseException:
            os.rename(old, path)
            raise
        _remove(old)


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """SIGINT within the block is held back and raised as ``KeyboardInterrupt`` when it ends (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)
        _interrupt.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if pending:
        raise KeyboardInterrupt


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the ones created, deepest first."""
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    for f in reversed(missing):
        f.mkdir(exist_ok=True)
    return missing


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink(missing_ok=True)


def _remove_empty(folders: list[Path]) -> None:
    for f in folders:
        try:
            f.rmdir()
        except OSError:
            break
