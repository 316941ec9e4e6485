"""Cache entries that concurrent runs build once: a file lock per entry, held while it is built, under which the
builder checks the cache again (another process may have built it meanwhile) and removes the temporaries of
builders that were killed mid-write. Only a lock holder removes them, so a live builder's are never touched.

A lock lives at `<cache_dir>/.locks/<the entry's path inside cache_dir>.lock`, so a cache directory lists only its
entries. Lock files stay after release: deleting one that another process is waiting on would let a third process
lock a new file of the same name while the second holds the old one."""

from __future__ import annotations

import glob
import logging
import shutil
import time
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

LOCKS_DIR = ".locks"
TMP_PREFIX = ".tmp-"  # temporaries in the cache start with this (atomic_io, the database's units, converted models)


class CacheLock:
    """`with CacheLock(cache_dir, entry, "what it is") as lock:` holds `entry`'s lock, waiting (and saying so) while
    another process holds it."""

    def __init__(self, cache_dir: str | Path, entry: str | Path, what: str) -> None:
        cache_dir, self.entry = Path(cache_dir), Path(entry)
        inside = self.entry.relative_to(cache_dir)  # a ValueError for an entry outside the cache
        self.path = cache_dir / LOCKS_DIR / inside.parent / f"{inside.name}.lock"
        self.what = what
        self._lock = FileLock(self.path)

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def __enter__(self) -> "CacheLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            log.info("%s %s: another process is building it; waiting for it (lock %s)", self.what, self.entry, self.path)
            start = time.monotonic()
            self._lock.acquire()
            log.info("%s %s: lock acquired after %.1f s", self.what, self.entry, time.monotonic() - start)
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def remove_stale(self, directory: Path, prefix: str = TMP_PREFIX) -> list[Path]:
        """Remove the files and directories in `directory` whose names start with `prefix`: temporaries of builders
        killed before their rename. Only while holding the lock, and only with a `directory` and `prefix` that no
        builder under another lock writes to."""
        if not self.held:
            raise RuntimeError(f"removing temporaries in {directory} needs the lock {self.path}")
        removed = sorted(Path(directory).glob(glob.escape(prefix) + "*"))
        for stale in removed:
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)
        if removed:
            log.info("%s %s: removed what an interrupted build left: %s", self.what, self.entry,
                     ", ".join(p.name for p in removed))
        return removed
