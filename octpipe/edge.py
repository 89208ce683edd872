"""The edges every batch command shares: parallel tasks, folders written atomically, folder locks.

- :func:`run_tasks` runs one function over many items (volumes, files) on a
  ``dask.distributed`` cluster (a :func:`local_cluster` by default, or any scheduler
  address), or in this process for ``workers=0``.
- :func:`staged_dir` builds a folder under a temporary name and renames it into place
  when complete, so that a crash never leaves a half-written folder that looks finished.
  Renames are atomic on a local or POSIX network file system.
- :func:`folder_lock` lets one process at a time write a folder (a store, an export
  folder): an exclusive, non-blocking ``flock`` that the kernel drops when its holder
  dies, even by ``kill -9``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from octpipe.errors import OctpipeError

__all__ = ["run_tasks", "local_cluster", "staged_dir", "folder_lock", "LOCK_NAME"]

#: The lock file of a folder written by one process at a time (see :func:`folder_lock`).
LOCK_NAME = ".lock"

T = TypeVar("T")
R = TypeVar("R")


def local_cluster(n_workers: int, *, memory_limit: str = "auto"):
    """A LocalCluster of single-threaded worker processes tuned for per-volume tasks.

    Two settings measured by ``benchmarks/ingest.py``: Dask's default
    ``MALLOC_TRIM_THRESHOLD_=65536`` for workers makes glibc return medium buffers to the
    OS after every volume (4.6x the page faults, 15-22 % more CPU per volume), so it is
    unset; and Zarr's codec thread pool is limited to one thread per worker, so one
    worker uses one core and workers scale with cores.
    """
    import dask
    from dask.distributed import LocalCluster

    environ = "distributed.nanny.pre-spawn-environ"
    with dask.config.set({f"{environ}.MALLOC_TRIM_THRESHOLD_": None, f"{environ}.ZARR_THREADING__MAX_WORKERS": 1}):
        return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                            memory_limit=memory_limit, silence_logs=40)


def run_tasks(fn: Callable[[T], R], items: Sequence[T], *, workers: int | None = None, scheduler: str | None = None,
              memory_limit: str = "auto", ordered: bool = False,
              catch: bool = True) -> Iterator[tuple[T, R | Exception]]:
    """Run ``fn(item)`` once per item; yield ``(item, result)`` as the tasks finish.

    Parameters
    ----------
    fn : callable
        One task. On Dask it runs in worker processes, so it must pickle: a module-level
        function, or a :func:`functools.partial` of one for the arguments all tasks share.
    items : sequence
        One task each.
    workers : int, optional
        Worker processes of a :func:`local_cluster` started for this call and closed after
        it; default all cores. ``0`` (without ``scheduler``) runs every task in this
        process without Dask, in order: a task's exception then propagates with its
        traceback, whatever ``catch`` says (this mode is for debugging and small runs).
    scheduler : str, optional
        Address of an existing ``dask.distributed`` scheduler (``tcp://host:8786``);
        ``workers`` is then ignored.
    memory_limit : str
        Memory limit per LocalCluster worker (dask syntax, e.g. ``"2GB"``).
    ordered : bool
        Yield in the order of ``items``, with at most two tasks per worker submitted ahead,
        so that memory stays bounded when results are large. By default every task is
        submitted at once and results come as they finish.
    catch : bool
        On Dask, a task that raises yields its exception in place of its result and the
        other tasks go on (a worker that died, a bug in a reader). False: the exception
        propagates and the remaining tasks are dropped.

    Yields
    ------
    tuple
        ``(item, result)``, the result being the exception for a task that failed (with
        ``catch``).

    Examples
    --------
    >>> sorted(r for _, r in run_tasks(abs, [-2, 1, -3], workers=0))
    [1, 2, 3]
    """
    if workers == 0 and scheduler is None:
        for item in items:
            yield item, fn(item)
        return
    from dask.distributed import Client, as_completed

    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = local_cluster(workers or os.cpu_count() or 1, memory_limit=memory_limit)
        client = Client(cluster)
    try:
        if ordered:
            window = 2 * max(1, len(client.scheduler_info().get("workers", {})) or 1)
            pending: dict[int, object] = {}
            nxt = 0
            for number, item in enumerate(items):
                while nxt < len(items) and len(pending) < window:
                    pending[nxt] = client.submit(fn, items[nxt], pure=False)
                    nxt += 1
                future = pending.pop(number)
                yield item, _outcome(future, catch)
                del future
        else:
            futures = client.map(fn, items, pure=False)
            owner = {f.key: item for f, item in zip(futures, items, strict=True)}
            for future in as_completed(futures):
                yield owner[future.key], _outcome(future, catch)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _outcome(future, catch: bool) -> object:
    """A finished future's result, or (with ``catch``) the exception it raised."""
    if not catch:
        return future.result()
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - the caller records the failed task; the batch goes on
        return exc


@contextmanager
def staged_dir(target: str | Path, *, under: str | Path, prefix: str = "") -> Iterator[Path]:
    """Build a folder under a temporary name; on success rename it to ``target`` in one step.

    The ``with`` block writes into the yielded folder, ``under/<prefix><name>-<random>``
    (created, empty). When the block ends without an exception that folder becomes
    ``target``: an existing ``target`` is first moved aside under ``under`` and removed
    after the swap, so ``target`` is at every moment either the old folder or the new one.
    When the block raises, the staged folder is removed and ``target`` is untouched.

    Parameters
    ----------
    target : str or Path
        The finished folder.
    under : str or Path
        Folder for the temporary names, on the file system of ``target`` (a rename does
        not cross file systems); created when missing.
    prefix : str
        Start of the temporary names (to tell them apart, e.g. ``".staging-"``).

    Yields
    ------
    Path
        The folder to write.

    Raises
    ------
    FileExistsError
        ``target`` appeared between the check for it and the rename (another process
        finished the same folder at that moment); the staged copy is removed and theirs kept.

    Examples
    --------
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> with staged_dir(root / "done", under=root / ".staging") as tmp:
    ...     _ = (tmp / "data.txt").write_text("complete")
    >>> (root / "done" / "data.txt").read_text(), list((root / ".staging").iterdir())
    ('complete', [])
    """
    target = Path(target)
    under = Path(under)
    token = uuid.uuid4().hex[:8]
    staging = under / f"{prefix}{target.name}-{token}"
    staging.mkdir(parents=True)
    try:
        yield staging
        if target.exists():
            old = under / f"{prefix}old-{target.name}-{token}"
            os.rename(target, old)
            os.rename(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(staging, target)
            except OSError as exc:
                if target.exists():
                    raise FileExistsError(errno.EEXIST, "written by another process meanwhile", str(target)) from exc
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def folder_lock(folder: str | Path, *, command: str, busy: str, stale: str = "") -> Iterator[Path]:
    """Hold the write lock of an existing folder for the duration of a ``with`` block.

    Takes an exclusive, non-blocking ``flock`` on ``folder/.lock`` (:data:`LOCK_NAME`) and writes this
    process's pid and ``command`` into it. Holding the lock, it removes what a crashed run
    left behind (``stale``): no other writer can be using it.

    Parameters
    ----------
    folder : str or Path
        The folder (it must exist).
    command : str
        What holds the lock (``"ingest"``, ``"export"``), written beside the pid.
    busy : str
        Message of the error when another process holds the lock; ``{holder}`` in it
        becomes that process's command and pid (``"ingest process (pid 123)"``).
    stale : str, optional
        Glob pattern, relative to ``folder``, of what a dead run leaves (``".staging/*"``).

    Yields
    ------
    Path
        The folder.

    Raises
    ------
    OctpipeError
        Another process holds the lock (``busy``), or the lock cannot be taken.

    Examples
    --------
    >>> import tempfile
    >>> with folder_lock(tempfile.mkdtemp(), command="demo", busy="busy: {holder}") as p:
    ...     (p / ".lock").read_text().split()[1]
    'demo'
    """
    folder = Path(folder)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OctpipeError(f"cannot lock the folder: {exc.strerror or exc}", folder) from exc
            holder = os.pread(fd, 200, 0).decode("ascii", "replace").split()
            pid = holder[0] if holder else "unknown"
            what = f"{holder[1]} " if len(holder) > 1 else ""
            raise OctpipeError(busy.format(holder=f"{what}process (pid {pid})"), folder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {command}\n".encode("ascii"), 0)
        if stale:
            for path in folder.glob(stale):
                shutil.rmtree(path, ignore_errors=True)
        try:
            yield folder
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
