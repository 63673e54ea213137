"""Meta-training on several processes with ``mx.distributed``.

``mlx.launch -n N ...`` (or a hostfile) starts ``N`` ranks. Each draws the whole
meta-batch from the same seeded sampler and adapts its share, ``T / N`` consecutive
tasks (:func:`shard`); the learner averages the meta-update and the metrics across
the ranks (:func:`average`, ``mlx.nn.average_gradients``) inside its compiled
meta-step, so every rank commits the same meta-parameters. Evaluation splits its
tasks the same way and gathers their scores (:func:`gather_tasks`).

:func:`world` is the run's view of the ranks. Every wait for the others goes through
:meth:`World.deadline`: a rank that dies makes the collectives fail, one that hangs
makes them outlast the deadline, and either way the waiting rank stops with a message
naming the rank it lost, instead of waiting forever (mlx#4475 reports ``all_sum``
hanging on 3 or more ranks now and then). Without a launcher the world is this
process alone, and nothing here calls a collective.
"""

from __future__ import annotations

import faulthandler
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path

from metapeft.tasks.episodes import Episodes

__all__ = [
    "DistributedError",
    "World",
    "average",
    "check_divisible",
    "gather_tasks",
    "ranks_on_this_host",
    "shard",
    "share_cores",
    "task_range",
    "world",
]

logger = logging.getLogger("metapeft")

# The order in which mx.distributed.init(backend="any") tries the backends.
_BACKENDS = ("nccl", "ring", "mpi", "jaccl")


class DistributedError(RuntimeError):
    """The ranks of a run could not connect, or one of them was lost."""


# ------------------------------------------------------------------ tasks per rank


def task_range(num_tasks: int, group: mx.distributed.Group) -> tuple[int, int]:
    """The tasks ``[start, stop)`` of ``num_tasks`` that this rank takes: consecutive,
    as even as they split (some ranks get none when there are fewer tasks than ranks).

    Example:
        >>> task_range(10, mx.distributed.init())  # a world of one process
        (0, 10)
    """
    rank, size = group.rank(), group.size()
    return rank * num_tasks // size, (rank + 1) * num_tasks // size


def shard(episodes: Episodes, group: mx.distributed.Group) -> Episodes:
    """This rank's share of a meta-batch: its ``T / N`` consecutive tasks.

    Raises:
        ValueError: If the ``T`` tasks do not split evenly over the ``N`` ranks.

    Example:
        >>> shard(tasks.sample(24), group).num_tasks  # doctest: +SKIP
        12
    """
    check_divisible(episodes.num_tasks, group.size())
    start, stop = task_range(episodes.num_tasks, group)
    return Episodes(
        episodes.support_x[start:stop],
        episodes.support_y[start:stop],
        episodes.query_x[start:stop],
        episodes.query_y[start:stop],
    )


def check_divisible(meta_batch_size: int, world_size: int) -> None:
    """Raises ValueError unless a meta-batch splits evenly over the ranks.

    Example:
        >>> check_divisible(24, 3)  # 8 tasks per rank
    """
    if meta_batch_size % world_size:
        raise ValueError(
            f"meta_batch_size (T={meta_batch_size}) is not divisible by the world size "
            f"(N={world_size}): every rank adapts T/N tasks of each meta-batch"
        )


def average(tree: Any, group: mx.distributed.Group) -> Any:
    """The mean of ``tree`` over the ranks, ``mlx.nn.average_gradients`` (small leaves
    packed into few ``all_sum`` calls), with the structure of ``tree`` kept as it is
    (``average_gradients`` rebuilds its tree from paths, which fills gaps in lists).

    Example:
        >>> update, metrics = average((update, metrics), group)  # doctest: +SKIP
    """
    flat = tree_flatten(tree)
    leaves = nn.average_gradients([leaf for _, leaf in flat], group)
    averaged = {path: leaf for (path, _), leaf in zip(flat, leaves, strict=True)}
    return tree_map_with_path(lambda path, _: averaged[path], tree)


def gather_tasks(values: mx.array, num_tasks: int, group: mx.distributed.Group) -> mx.array:
    """Every rank's per-task ``values`` (a leading axis over its :func:`task_range`,
    possibly empty) put together in task order, ``(num_tasks, ...)``, on every rank:
    one ``all_sum`` of zeros around each rank's own rows.

    Example:
        >>> losses = gather_tasks(my_losses, 100, group)  # doctest: +SKIP
    """
    start, stop = task_range(num_tasks, group)
    full = mx.zeros((num_tasks, *values.shape[1:]), dtype=values.dtype)
    if stop > start:
        full[start:stop] = values
    return mx.distributed.all_sum(full, group=group)


# ------------------------------------------------------------------ cores per rank


def ranks_on_this_host() -> int:
    """How many ranks the ring launcher (``mlx.launch``) started on this rank's host:
    the entries of its ``MLX_HOSTFILE`` with this rank's addresses; 1 without one.

    It reads the launcher's environment, so it can run before MLX or the extension
    start their threads. A hostfile it cannot read counts as one rank per host
    (``mx.distributed.init`` then reports the problem).
    """
    path, rank = os.environ.get("MLX_HOSTFILE"), os.environ.get("MLX_RANK")
    if not path or rank is None:
        return 1
    try:
        hosts = json.loads(Path(path).read_text())
        ips = [{address.rpartition(":")[0] for address in host} for host in hosts]
        return max(1, ips.count(ips[int(rank)]))
    except (OSError, ValueError, TypeError, IndexError, AttributeError):
        return 1


def share_cores() -> None:
    """Gives this rank its share of the host's cores: ``OPENBLAS_NUM_THREADS`` and
    ``METAPEFT_NUM_THREADS`` (the fused kernels' threads) are the cores divided by
    :func:`ranks_on_this_host`, unless already set. It must run before the extension
    loads (``import metapeft`` calls it first).

    Raises:
        ValueError: If ``METAPEFT_NUM_THREADS`` is set to anything but a positive integer.
    """
    ranks = ranks_on_this_host()
    if ranks > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        share = str(max(1, (cores or os.cpu_count() or 1) // ranks))
        os.environ.setdefault("OPENBLAS_NUM_THREADS", share)
        os.environ.setdefault("METAPEFT_NUM_THREADS", share)
    cap = os.environ.get("METAPEFT_NUM_THREADS")
    if cap is not None and not (cap.strip().isdigit() and int(cap) > 0):
        raise ValueError(f"METAPEFT_NUM_THREADS must be a positive integer, got {cap!r}")


# ----------------------------------------------------------------------- the world


class World:
    """The ranks of this run as this process sees them.

    Attributes:
        group: The ``mx.distributed`` group of all ranks (one process: a group of one).
        backend: ``ring``, ``jaccl``, ``mpi`` or ``nccl``; ``none`` for one process.
        timeout: Seconds any wait for the other ranks may last (:meth:`deadline`).
    """

    def __init__(self, group: mx.distributed.Group, backend: str, timeout: float) -> None:
        self.group = group
        self.backend = backend
        self.timeout = timeout
        self.rank = group.rank()
        self.size = group.size()
        # (host id, pid) of every rank, once :meth:`agree` has exchanged them.
        self._processes: list[tuple[int, int]] = []
        self._watchdog: _Watchdog | None = None

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size}, backend={self.backend!r})"

    @property
    def name(self) -> str:
        """``rank 1/4``: how this rank signs its messages."""
        return f"rank {self.rank}/{self.size}"

    def deadline(self, what: str) -> AbstractContextManager[None]:
        """Bounds a block that waits for the other ranks (``what`` names it, e.g.
        ``"meta-step 12"``): if it outlasts :attr:`timeout`, this process prints which
        rank it lost and exits with status 1; if a collective in it fails (a peer's
        connection closed), it raises :class:`DistributedError` saying the same. With
        one process, nothing is checked.
        """
        return nullcontext() if self.size == 1 else self._bounded(what)

    @contextmanager
    def _bounded(self, what: str) -> Iterator[None]:
        if self._watchdog is None:
            self._watchdog = _Watchdog(self._expired)
        with self._watchdog.armed(what, self.timeout):
            try:
                yield
            except RuntimeError as e:
                if not str(e).startswith(f"[{self.backend}]"):  # not a failed collective
                    raise
                raise DistributedError(f"{what} failed ({e}); {self.lost()}") from e

    @contextmanager
    def reporting_termination(self) -> Iterator[None]:
        """Within the block, SIGTERM (which ``mlx.launch`` sends every rank once one has
        exited) raises :class:`DistributedError` naming the lost rank, so that a rank
        says why it stops. If the block ends with an error, a later SIGTERM no longer
        kills the process at once, which could cut short its report of that error: the
        process then exits within :attr:`timeout` seconds. Only in the main thread of a
        world of several ranks; a rank blocked in a collective meanwhile is ended by its
        deadline instead."""
        if self.size == 1 or threading.current_thread() is not threading.main_thread():
            yield
            return

        def terminated(signum: int, frame: Any) -> None:  # noqa: ARG001
            raise DistributedError(f"stopped by SIGTERM; {self.lost()}")

        def reporting(signum: int, frame: Any) -> None:  # noqa: ARG001
            message = f"{self.name}: stopped by SIGTERM while it reported an error"
            timer = threading.Timer(self.timeout, _exit_with, [message])
            timer.daemon = True
            timer.start()

        previous = signal.signal(signal.SIGTERM, terminated)
        try:
            yield
        except BaseException:
            signal.signal(signal.SIGTERM, reporting)
            raise
        else:
            signal.signal(signal.SIGTERM, previous)

    def any(self, flag: bool, what: str) -> bool:
        """Whether ``flag`` is true on any rank (one ``all_sum``, bounded as
        :meth:`deadline` with ``what``; none with one process)."""
        if self.size == 1:
            return flag
        with self.deadline(what):
            total = mx.distributed.all_sum(mx.array(int(flag)), group=self.group)
            mx.eval(total)  # waits with the GIL released: the watchdog can run
        return total.item() > 0

    def agree(self, values: dict[str, str]) -> None:
        """Checks with one ``all_gather`` that every rank was started with the same
        ``values`` (e.g. ``{"config": ...}``); the ranks also learn each other's
        process ids, by which :meth:`lost` names a lost rank.

        Raises:
            ValueError: On every rank, if two ranks differ on a value: the message names
                the value, which ranks hold which version (a digest), and this rank's
                own version when it is short.
        """
        if self.size == 1:
            return
        host = np.array([zlib.crc32(socket.gethostname().encode())], dtype=np.uint32)
        record = [int(host.view(np.int32)[0]), os.getpid()]
        for value in values.values():
            digest = hashlib.sha256(value.encode()).digest()[:8]
            record.extend(np.frombuffer(digest, dtype=np.int32).tolist())
        mine = mx.array([record], dtype=mx.int32)
        with self.deadline("exchanging the ranks' settings"):
            gathered = mx.distributed.all_gather(mine, group=self.group)
            mx.eval(gathered)  # waits with the GIL released: the watchdog can run
        table = np.array(gathered)
        self._processes = [(int(row[0]), int(row[1])) for row in table]
        for i, (name, value) in enumerate(values.items()):
            digests = [row[2 + 2 * i : 4 + 2 * i].tobytes().hex() for row in table]
            if len(set(digests)) == 1:
                continue
            holders: dict[str, list[int]] = {}
            for rank, digest in enumerate(digests):
                holders.setdefault(digest, []).append(rank)
            held = "; ".join(f"{_ranks(ranks)}: {digest}" for digest, ranks in holders.items())
            own = f"; this rank's: {value}" if len(value) <= 200 else ""
            raise ValueError(f"the ranks were started with different {name}s ({held}){own}")

    def lost(self) -> str:
        """Which rank this one lost, as far as it can tell: the ranks on this host whose
        process has exited or is stopped; in a world of two, the other rank; else the
        ranks on other hosts, which it cannot look at."""
        others = [r for r in range(self.size) if r != self.rank]
        if not self._processes:
            if len(others) == 1:
                return f"lost rank {others[0]}"
            return f"lost one of ranks {_list(others)} (they had not yet exchanged process ids)"
        host = self._processes[self.rank][0]
        found, remote = [], []
        for r in others:
            peer_host, pid = self._processes[r]
            if peer_host != host:
                remote.append(r)
                continue
            state = _process_state(pid)
            if state != "running":
                found.append(f"rank {r} (pid {pid}, {state})")
        if found:
            return "lost " + ", ".join(found)
        if len(others) == 1:
            where = "on another host" if remote else f"pid {self._processes[others[0]][1]}"
            return f"lost rank {others[0]} ({where})"
        if remote:
            return f"no rank on this host was lost: one of ranks {_list(remote)} (on other hosts)"
        return (
            f"every rank's process is still running (pids "
            f"{', '.join(str(pid) for _, pid in self._processes)}): a collective that never "
            "completed (mlx#4475)"
        )

    def _expired(self, what: str) -> None:
        message = f"{self.name}: {what} did not finish within {self.timeout:g} s; {self.lost()}"
        if logger.handlers:  # rank 0's run log
            logger.error(message)
        _exit_with(message)


_world: World | None = None


def world(timeout: float) -> World:
    """The ranks of this run, connected on the first call (``mx.distributed.init()``;
    one process without a launcher) and the same :class:`World` afterwards.

    Args:
        timeout: Seconds the ranks may take to connect, and (set again on every call)
            any later wait of the world for its ranks.

    Raises:
        DistributedError: If the backend fails to connect the ranks; if they do not
            connect within ``timeout`` seconds, the process exits with status 1.

    Example:
        >>> world(30.0).size  # without a launcher
        1
    """
    global _world
    if _world is None:
        group = _connect_all_ranks(timeout)
        _world = World(group, _backend(group), timeout)
    _world.timeout = timeout
    return _world


def _connect_all_ranks(timeout: float) -> mx.distributed.Group:
    """``mx.distributed.init()``, which waits for every rank to connect, even one that
    never started, holding the GIL: only faulthandler's own thread can end it after
    ``timeout`` seconds (printing ``Timeout`` and this function among the frames)."""
    faulthandler.dump_traceback_later(timeout, exit=True, file=2)  # stderr, even if replaced
    try:
        return mx.distributed.init()
    except RuntimeError as e:
        raise DistributedError(f"the ranks could not connect: {e}") from e
    finally:
        faulthandler.cancel_dump_traceback_later()


def _backend(group: mx.distributed.Group) -> str:
    """The backend ``mx.distributed.init()`` chose for ``group`` (asked in its order,
    each backend it tried before answers as a group of one again)."""
    if group.size() == 1:
        return "none"
    for name in _BACKENDS:
        if name == "nccl" and not mx.cuda.is_available():
            continue
        if mx.distributed.init(backend=name).size() == group.size():
            return name
    return "unknown"


def _exit_with(message: str) -> None:
    """Ends the process at once, status 1, with ``message`` on stderr (written to the
    file descriptor: the main thread may be inside a progress display or MLX)."""
    os.write(2, f"error: {message}\n".encode())
    os._exit(1)


class _Watchdog:
    """One thread that ends the process when a block armed with a deadline outlasts it.
    The main thread waits inside MLX with the GIL released, so this thread still runs."""

    def __init__(self, expire: Callable[[str], None]) -> None:
        self._expire = expire
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._what = ""
        threading.Thread(target=self._watch, name="metapeft-watchdog", daemon=True).start()

    @contextmanager
    def armed(self, what: str, seconds: float) -> Iterator[None]:
        with self._cond:
            self._deadline, self._what = time.monotonic() + seconds, what
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._deadline = None

    def _watch(self) -> None:
        with self._cond:
            while True:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            what = self._what
        self._expire(what)


def _process_state(pid: int) -> str:
    """``exited``, ``stopped`` or ``running``: a process of this host, by ``ps``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "exited"
    except PermissionError:
        return "running"
    try:
        stat = subprocess.run(
            ["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "running"
    if not stat or stat.startswith("Z"):
        return "exited"
    return "stopped" if stat.startswith("T") else "running"


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {_list(ranks)}"


def _list(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks)
