"""Writes that lose nothing, and imports of optional extras that say how to install them.

:func:`write_atomically` writes a file as a whole or not at all: the data go to a temporary
file in the destination's folder, which is flushed to disk and then renamed over the
destination with :func:`os.replace` (atomic on POSIX and Windows). A write that fails
partway (a full disk, an exception in the writer) removes the temporary file and leaves
whatever was at the destination untouched. An existing file is replaced only when asked.

:func:`import_extra` imports a module of an optional extra (``pyroflows[parquet]``, ...)
and, when it is missing, raises an ``ImportError`` that names the extra to install.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType


def check_destination(
    path: str | os.PathLike, *, overwrite: bool = False, allow: str = "overwrite=True"
) -> Path:
    """Refuse a destination that cannot be written, before any work is done for it.

    The folder must exist and be writable, ``path`` must not be a folder, and an existing
    file is refused unless ``overwrite``; ``allow`` is how the caller's user allows it
    (named in the error, e.g. ``"--force"`` on the command line).

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> check_destination(folder / "model.pt").name
        'model.pt'
        >>> (folder / "model.pt").write_text("a good model")
        12
        >>> check_destination(folder / "model.pt")
        Traceback (most recent call last):
        ...
        FileExistsError: '...model.pt' already exists; pass overwrite=True to replace it
        >>> check_destination(folder / "missing" / "model.pt")
        Traceback (most recent call last):
        ...
        FileNotFoundError: cannot write '...model.pt': there is no folder '...missing'; ...
    """
    file = Path(path)
    name, folder = os.fspath(path), file.parent
    if file.is_dir():
        raise IsADirectoryError(f"cannot write {name!r}: it is a folder; give a file name")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"cannot write {name!r}: there is no folder {str(folder)!r}; create it first"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {name!r}: the folder {str(folder)!r} is read-only")
    if not overwrite and os.path.lexists(file):
        raise _exists(path, allow)
    return file


def write_atomically(
    path: str | os.PathLike,
    write: Callable[[str], object],
    *,
    overwrite: bool = False,
    allow: str = "overwrite=True",
) -> None:
    """Call ``write(temporary_path)``, then move the temporary file to ``path`` in one step.

    The temporary file (``.NAME.RANDOM.tmp`` in the folder of ``path``) gets the usual
    permissions of a new file, or those of the file it replaces. If ``write`` raises, the
    temporary file is removed, the error propagates and ``path`` is as it was. The checks of
    :func:`check_destination` run first, and the one for an existing file again just before
    the move.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "notes.txt"
        >>> write_atomically(target, lambda tmp: Path(tmp).write_text("first"))
        >>> def fail_partway(tmp):
        ...     Path(tmp).write_text("half a fi")
        ...     raise OSError(28, "No space left on device")
        >>> write_atomically(target, fail_partway, overwrite=True)
        Traceback (most recent call last):
        ...
        OSError: [Errno 28] No space left on device
        >>> target.read_text(), [p.name for p in target.parent.iterdir()]
        ('first', ['notes.txt'])
    """
    file = check_destination(path, overwrite=overwrite, allow=allow)
    temporary = _new_temporary(file)
    try:
        write(os.fspath(temporary))
        with open(temporary, "rb+") as handle:  # on disk before the rename makes it visible
            os.fsync(handle.fileno())
        if os.path.lexists(file):
            if not overwrite:  # it appeared while we wrote
                raise _exists(path, allow)
            shutil.copymode(file, temporary)
        os.replace(temporary, file)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _exists(path: str | os.PathLike, allow: str) -> FileExistsError:
    return FileExistsError(f"{os.fspath(path)!r} already exists; pass {allow} to replace it")


def _new_temporary(file: Path) -> Path:
    """Create an empty, new, hidden file beside ``file`` (mode 0o666 less the umask)."""
    while True:
        temporary = file.with_name(f".{file.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return temporary


def import_extra(module: str, *, purpose: str, package: str, extra: str) -> ModuleType:
    """Import ``module``, or say which pyroflows extra installs it.

    ``purpose`` says what needs it (``"reading Parquet"``), ``package`` is the name to
    install (``"pyarrow"``) and ``extra`` the pyroflows extra that has it (``"parquet"``).

    Example:
        >>> import_extra("json", purpose="reading JSON", package="json", extra="all").__name__
        'json'
        >>> import_extra("no_such_module", purpose="the demo", package="nothing", extra="demo")
        Traceback (most recent call last):
        ...
        ImportError: the demo needs nothing: pip install 'pyroflows[demo]'
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs {package}: pip install 'pyroflows[{extra}]'"
        ) from error
