"""Putting a finished run directory in place so that a kill at any instant leaves a state the
next run recovers.

A run is written into ``.NAME.partial-XXXX`` beside ``--out`` (with an owner file naming the
process) and then put in place:

* on Linux by one atomic ``renameat2(RENAME_EXCHANGE)`` that swaps the new directory with the
  earlier run (``--overwrite``); the earlier run is then under the ``.partial-`` name and is
  removed. A kill leaves either the earlier run in place or the new one, never neither;
* elsewhere by two renames (the earlier run to ``.NAME.replaced-XXXX``, the new one into place).

Whatever a kill leaves beside ``--out`` (``.partial-``/``.replaced-`` folders whose owner is no
longer running) is found by :func:`recover` at the start of the next run for the same
``--out``: an earlier run that is not in place is put back, leftovers are removed, and each
action is reported.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import tempfile
from pathlib import Path

OWNER = ".inferopt-owner"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def staging_dir(out_dir: Path) -> Path:
    """A new, empty ``.NAME.partial-XXXX`` beside ``out_dir``, owned by this process."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    (tmp / OWNER).write_text(str(os.getpid()))
    return tmp


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2); False where unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return done == 0


def put_in_place(tmp: Path, out_dir: Path) -> Path | None:
    """Move the finished ``tmp`` to ``out_dir``, replacing an earlier run there. Returns where
    the earlier run now is (to be removed by the caller), or None when there was none."""
    (tmp / OWNER).unlink(missing_ok=True)
    if not out_dir.exists():
        tmp.rename(out_dir)
        return None
    if _exchange(tmp, out_dir):
        return tmp  # the earlier run, under the staging name
    old = out_dir.with_name(f".{out_dir.name}.replaced-{tmp.name[-8:]}")
    out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except BaseException:
        # interrupted between the two renames: the earlier run goes back (a hard kill here
        # is what recover() finds next time)
        if not out_dir.exists():
            old.rename(out_dir)
        raise
    return old


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_running(folder: Path) -> bool:
    try:
        return _alive(int((folder / OWNER).read_text().strip()))
    except (OSError, ValueError):
        return False


def recover(out_dir: Path, manifest: str) -> list[str]:
    """Clean up after runs for ``out_dir`` that were killed: put an earlier run back when it is
    not in place, remove the rest. Returns one line per action, for the log and the report."""
    parent = out_dir.parent
    if not parent.is_dir():
        return []
    notes: list[str] = []
    leftovers = sorted(p for p in parent.glob(f".{out_dir.name}.partial-*") if p.is_dir())
    replaced = sorted(p for p in parent.glob(f".{out_dir.name}.replaced-*") if p.is_dir())
    # staging folders of runs still going (another process) are not ours to touch
    leftovers = [p for p in leftovers if not _owner_running(p)]
    complete = [p for p in [*replaced, *leftovers]
                if (p / manifest).is_file() and not (p / OWNER).exists()]
    if not out_dir.exists() and complete:
        # killed between moving the earlier run aside and putting the new one in place:
        # the earlier run (a .replaced- folder, or a finished one) comes back
        back = next((p for p in complete if p in replaced), complete[0])
        back.rename(out_dir)
        notes.append(f"restored the run in {out_dir} from {back.name}, left by a run that was "
                     "killed while replacing it")
        replaced = [p for p in replaced if p != back]
        leftovers = [p for p in leftovers if p != back]
    for folder in [*replaced, *leftovers]:
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        what = ("an earlier run that had been replaced" if folder in replaced
                or (folder / manifest).is_file() else "an unfinished run")
        shutil.rmtree(folder, ignore_errors=True)
        notes.append(f"removed {folder.name} ({what}, {size / 1e6:.1f} MB), left by a run that "
                     "was killed")
    return notes
