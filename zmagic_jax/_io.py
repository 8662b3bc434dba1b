"""Outputs that never destroy a user's files, and never leave anything half-written.

* A folder this tool writes carries a marker file, :data:`MARKER`. :func:`check_output_dir`
  accepts a path that does not exist, an empty folder, or (with ``overwrite``) a folder holding
  the marker, and refuses everything else: a file, a symbolic link, a non-empty folder without
  the marker, the current folder or one that contains it, a place that cannot be written. Every
  command calls it before any work, so a bad ``--out`` costs nothing.
* :func:`atomic_output_dir` builds the new content in a hidden sibling (``.NAME.PID.XXXX.tmp``,
  marker inside from the start: the folder is made as ``.NAME.PID.XXXX.new``, the marker written
  into it atomically, then it is renamed to ``.tmp``), then swaps it in at the end: the old output is renamed to
  ``.NAME.old-PID``, the new one into place, the old one removed. An exception or signal
  (``KeyboardInterrupt``) removes the staging folder and leaves the earlier output untouched.
  Under :func:`interrupts_cancel_outputs` (the CLI runs every command in it) SIGINT and SIGTERM
  also mark the run as cancelled before raising, and a cancelled run never swaps its output in:
  a ``KeyboardInterrupt`` that Python swallows (one raised inside a garbage-collection callback
  or a destructor is only printed as "Exception ignored") still stops the commit.
* A run killed outright (SIGKILL, power loss) can leave a staging or ``old`` sibling behind. The
  next check of the same path cleans them up: a sibling whose marker names a process of this host
  that no longer runs is removed, and an ``old`` sibling is put back first when the output itself
  is missing (a kill between the two renames). A ``.new`` sibling of a process that no longer
  runs holds at most the marker (a kill before the rename to ``.tmp``); it is removed too, as it
  cannot hold anything else. Each clean-up is reported as a warning.
* Files: :func:`atomic_write_bytes` writes through a temporary file and a rename (none after a
  cancelling signal);
  :func:`check_output_file` applies the folder rules to a single output file (``convert``).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional

MARKER = ".zmagic-output.json"
_cancelled: Optional[int] = None  # the signal that cancelled this run (interrupts_cancel_outputs)


class OutputError(ValueError):
    """An output path this tool will not write to (the message names the path and the fix)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it a normal file's mode
        if _cancelled is not None:  # interrupts_cancel_outputs: a cancelled run writes nothing
            raise KeyboardInterrupt(f"signal {_cancelled}: the run was interrupted; {path} is not written")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- markers

def read_marker(folder) -> Optional[dict]:
    """The marker of a folder this tool wrote (``None`` if there is none or it is not ours)."""
    try:
        with open(Path(folder) / MARKER, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("tool") == "zmagic_jax" else None


def _marker(command: Optional[str]) -> dict:
    from zmagic_jax import __version__
    return {"tool": "zmagic_jax", "version": __version__, "command": command, "pid": os.getpid(),
            "host": socket.gethostname(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _stale(path: Path) -> bool:
    """A staging or ``old`` folder of this tool whose process, on this host, has ended."""
    marker = read_marker(path)
    if marker is None or marker.get("host") != socket.gethostname():
        return False
    return _ended(_name_pid(path) or marker.get("pid"))


def _name_pid(path: Path) -> Optional[int]:
    match = re.search(r"\.(?:old-)?(\d+)(?:\.[^.]*\.(?:tmp|new))?$", path.name)
    return int(match.group(1)) if match else None


def _ended(pid) -> bool:
    return isinstance(pid, int) and pid != os.getpid() and not _process_alive(pid)


def _stale_new(path: Path) -> bool:
    """A ``.new`` folder (see the module docstring) of a process that has ended: it holds nothing
    but the marker or the marker's temporary file, and its marker, if written, names this host."""
    marker = read_marker(path)
    if marker is not None and marker.get("host") != socket.gethostname():
        return False
    try:
        entries = os.listdir(path)
    except OSError:
        return False
    only_marker = all(e == MARKER or (e.startswith(f".{MARKER}.") and e.endswith(".tmp")) for e in entries)
    return only_marker and _ended(_name_pid(path))


def clean_stale_siblings(out_dir) -> list:
    """Remove what killed runs left next to ``out_dir`` (see the module docstring). Returns the
    removed paths; an ``old`` sibling that is put back is not among them."""
    out_dir = Path(out_dir)
    parent = out_dir.parent
    if not parent.is_dir():
        return []
    removed = []
    prefix = f".{out_dir.name}."
    for sibling in sorted(parent.iterdir()):
        name = sibling.name
        if not name.startswith(prefix) or not sibling.is_dir() or sibling.is_symlink():
            continue
        rest = name[len(prefix):]
        if rest.endswith(".new"):
            if not _stale_new(sibling):
                continue
        elif not (rest.startswith("old-") or rest.endswith(".tmp")) or not _stale(sibling):
            continue
        if rest.startswith("old-") and not os.path.lexists(out_dir):
            os.replace(sibling, out_dir)
            warnings.warn(f"{out_dir}: restored the previous output from {sibling.name}, left by a run that "
                          "was killed while swapping its result in.", RuntimeWarning, stacklevel=3)
            continue
        shutil.rmtree(sibling, ignore_errors=True)
        removed.append(sibling)
        warnings.warn(f"{out_dir}: removed {sibling}, a temporary folder left by an interrupted run.",
                      RuntimeWarning, stacklevel=3)
    return removed


# ----------------------------------------------------------------------------- checks

def _inside_cwd(path: Path) -> bool:
    cwd = Path.cwd().resolve()
    return path == cwd or path in cwd.parents


def _check_writable(folder: Path, what: str, flag: str) -> None:
    """Create ``folder``'s missing parents and prove we can create entries in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=".zmagic-probe.", dir=folder)
        os.rmdir(probe)
    except OSError as err:
        raise OutputError(f"{flag}: cannot write {what} into {folder} ({err.strerror or err}); "
                          "choose a folder you can write to.") from err


def check_output_dir(out_dir, *, overwrite: bool = False, flag: str = "out_dir") -> Path:
    """Check, before any work, that ``out_dir`` may receive a new output (rules in the module
    docstring); clean up what killed runs left next to it. Raises :class:`OutputError` naming the
    path and ``flag``. Returns the path."""
    out_dir = Path(os.fspath(out_dir)).expanduser()
    if out_dir.name in ("", ".", ".."):
        out_dir = out_dir.resolve()
    resolved = out_dir.resolve()
    if _inside_cwd(resolved):
        raise OutputError(f"{flag}: {str(out_dir)!r} is the current folder or contains it; outputs go to a folder "
                          "of their own, e.g. out/run1.")
    clean_stale_siblings(out_dir)
    if out_dir.is_symlink():
        raise OutputError(f"{flag}: {out_dir} is a symbolic link; give the real folder's path or a new one.")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{flag}: {out_dir} is a file, not a folder; zmagic never replaces it. Give a new "
                          "folder's path.")
    if out_dir.is_dir():
        try:
            entries = os.listdir(out_dir)
        except OSError as err:
            raise OutputError(f"{flag}: cannot read the folder {out_dir} ({err.strerror}).") from err
        if entries and read_marker(out_dir) is None:
            raise OutputError(f"{flag}: {out_dir} is a folder zmagic did not write (it holds {len(entries)} "
                              "entries and no zmagic marker); zmagic never replaces it. Give a new or empty "
                              "folder.")
        if entries and not overwrite:
            raise OutputError(f"{flag}: {out_dir} holds a previous zmagic output; pass --overwrite (overwrite=True "
                              "in Python) to replace it, or give another folder.")
    _check_writable(out_dir.parent, "an output", flag)
    return out_dir


def _marked_staging_dir(out_dir: Path, command: Optional[str]) -> Path:
    """The staging folder, which appears under its ``.tmp`` name with its marker already inside."""
    new = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{os.getpid()}.", suffix=".new", dir=out_dir.parent))
    try:
        os.chmod(new, 0o777 & ~_umask())  # mkdtemp makes it private; give it a normal folder's mode
        atomic_write_bytes(new / MARKER, (json.dumps(_marker(command), indent=1) + "\n").encode())
        tmp = new.with_suffix(".tmp")
        os.rename(new, tmp)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    return tmp


@contextlib.contextmanager
def interrupts_cancel_outputs():
    """Within this block SIGINT and SIGTERM cancel the run: the handler records the signal, then
    raises ``KeyboardInterrupt``; :func:`atomic_output_dir` refuses to commit after a recorded
    signal, even when the exception was swallowed on its way up. A SIGINT that is ignored
    (``nohup``, background jobs) or handled by the caller is left as it is. Main thread only;
    elsewhere this does nothing. The previous handlers are restored on exit."""
    import signal
    import threading

    global _cancelled
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def cancel(signum, frame):
        global _cancelled
        _cancelled = signum
        raise KeyboardInterrupt(f"signal {signum}")

    wanted = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) is signal.default_int_handler
                                 else [])
    _cancelled = None
    previous = {sig: signal.signal(sig, cancel) for sig in wanted}
    try:
        yield
        if _cancelled is not None:  # swallowed on the way up: the run still ends as interrupted
            raise KeyboardInterrupt(f"signal {_cancelled}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _cancelled = None


def _refuse_if_cancelled(tmp: Path) -> None:
    if _cancelled is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        raise KeyboardInterrupt(f"signal {_cancelled}: the run was interrupted; its output is not kept")


@contextlib.contextmanager
def atomic_output_dir(out_dir, *, overwrite: bool = False, flag: str = "out_dir", command: Optional[str] = None):
    """Build a folder's content in a hidden sibling, then swap it into place (module docstring).

    The destination is checked when entering (:func:`check_output_dir`) and again before the swap,
    in case it changed meanwhile; a finished result that cannot be swapped in stays in its staging
    folder, which the error names."""
    out_dir = check_output_dir(out_dir, overwrite=overwrite, flag=flag)
    tmp = _marked_staging_dir(out_dir, command)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _refuse_if_cancelled(tmp)
    try:
        check_output_dir(out_dir, overwrite=overwrite, flag=flag)
    except OutputError as err:
        raise OutputError(f"{err} The finished output is kept in {tmp}.") from err
    old = None
    _refuse_if_cancelled(tmp)  # the check above takes time: a signal may have landed meanwhile
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output_file(path, *, overwrite: bool = False, flag: str = "destination",
                      ours: Optional[Callable[[Path], bool]] = None) -> Path:
    """The file rules: a new path, or (with ``overwrite``) an existing file that ``ours(path)``
    recognises as this tool's output; never a folder or someone else's file. Checks that the
    folder can be written. Returns the path."""
    path = Path(os.fspath(path)).expanduser()
    if path.is_dir():
        raise OutputError(f"{flag}: {path} is a folder; give the path of the file to write, "
                          f"e.g. {path}/model.safetensors.")
    if os.path.lexists(path):
        if path.is_symlink() or not (ours is not None and ours(path)):
            raise OutputError(f"{flag}: {path} exists and was not written by zmagic; zmagic never replaces it. "
                              "Give a new file name.")
        if not overwrite:
            raise OutputError(f"{flag}: {path} holds a previous zmagic output; pass --overwrite (overwrite=True in "
                              "Python) to replace it, or give another name.")
    _check_writable(path.parent, "a file", flag)
    return path
