"""Input worker processes: light, started once, shared by every pipeline of the process.

Why not grain's worker processes: they are started with multiprocessing's spawn, which runs
the parent's main module again in every worker (for a training run, `dfer_clip_jax.main`:
jax, flax, orbax) and grain itself imports jax, so each worker cost ~3.5 s of CPU and the first
batch came 4-6 s late -- again for every evaluation, whose dataset is new each epoch. A worker
here is `python -m dfer_clip_jax.data.workers`: it imports numpy, PIL / OpenCV and
`loading.py` (the batch loaders and the sources they read), and is ready in ~0.2 s.

  pool = shared_pool(4)            # one pool per worker count, kept until the process exits
  batches = PoolBatches(pool, batch_loader, start=0, stop=100, depth=8)
  next(batches)                    # {'video': uint8 (B, T, H, W, 3), 'label', 'index', 'mask'}

Protocol: the parent sends `(request id, loader key, pickled loader or None, step, shared
memory name)` over a pipe; the worker unpickles a loader the first time it sees its key (each
side keeps the same least-recently-used set of keys, so a dataset is pickled to a worker once,
not per batch), writes the batch's video into the shared memory block and answers `(request
id, label, index, mask)` or the exception with the worker's traceback. Videos travel through
shared memory (tens of MB per batch: a pipe would cost the parent more CPU than decoding);
the parent copies each one out before reusing its block, and unlinks its blocks when the
iterator closes (and at exit), so none is left behind. A worker exits when its pipe closes,
i.e. when the parent exits or dies; a worker that dies fails the batches it held with its
exit status, and the next `shared_pool` call starts a fresh pool.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import mmap
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import threading
import traceback
import weakref
from concurrent import futures
from multiprocessing import connection, shared_memory
from typing import Any

import numpy as np

# Loaders (datasets) a worker keeps unpickled, and shared-memory blocks it keeps mapped.
_LOADER_CACHE = 8
_MAP_CACHE = 64
# Where POSIX shared memory lives on Linux (a tmpfs; Docker's default holds only 64 MB).
SHM_DIR = "/dev/shm"


class WorkerError(RuntimeError):
  """An input worker process died (killed, out of memory, crashed)."""


class _RemoteTraceback(Exception):
  """The worker's traceback, chained to the exception it raised."""

  def __str__(self) -> str:
    return str(self.args[0])


# -- worker side ---------------------------------------------------------------------------------


def _attach(name: str) -> mmap.mmap:
  """Maps the parent's shared-memory block `name` without registering it with a resource
  tracker (the parent owns and unlinks it; a tracker here would unlink it when we exit)."""
  if sys.version_info >= (3, 13):
    block = shared_memory.SharedMemory(name, track=False)
    return block._mmap  # pylint: disable=protected-access
  import _posixshmem  # pylint: disable=g-import-not-at-top

  fd = _posixshmem.shm_open("/" + name.lstrip("/"), os.O_RDWR, mode=0o600)
  try:
    return mmap.mmap(fd, os.fstat(fd).st_size)
  finally:
    os.close(fd)


def _serve(read_fd: int, write_fd: int) -> None:
  # Ctrl-C and a launcher's SIGTERM reach the whole process group: the parent handles them
  # (a preempted run still saves); a worker stops when the parent closes its pipe.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  requests = connection.Connection(read_fd, writable=False)
  replies = connection.Connection(write_fd, readable=False)
  loaders: collections.OrderedDict[int, Any] = collections.OrderedDict()
  maps: collections.OrderedDict[str, mmap.mmap] = collections.OrderedDict()
  while True:
    try:
      request_id, key, payload, step, block, shape = requests.recv()
    except (EOFError, OSError):
      return  # The parent closed the pipe (or exited): stop.
    if payload is not None:
      loaders[key] = payload  # Unpickled below, so that its errors are reported like others.
      if len(loaders) > _LOADER_CACHE:
        loaders.popitem(last=False)
    loaders.move_to_end(key)
    try:
      loader = loaders[key]
      if isinstance(loader, bytes):
        loader = loaders[key] = pickle.loads(loader)
      if block not in maps:
        maps[block] = _attach(block)
        if len(maps) > _MAP_CACHE:
          maps.popitem(last=False)[1].close()
      maps.move_to_end(block)
      out = np.frombuffer(maps[block], np.uint8, count=int(np.prod(shape))).reshape(shape)
      batch = loader(step, out=out)
      replies.send((request_id, {k: v for k, v in batch.items() if k != "video"}, None))
    except BaseException as e:  # pylint: disable=broad-except
      text = traceback.format_exc()
      try:
        replies.send((request_id, None, (e, text)))
      except Exception:  # The exception does not pickle: send its text.
        replies.send((request_id, None, (RuntimeError(f"{type(e).__name__}: {e}"), text)))


# -- parent side ---------------------------------------------------------------------------------


class _Worker:
  def __init__(self, number: int):
    self.number = number
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    # The worker imports this package the way the parent does (also from a source checkout
    # or a test folder on sys.path), and finds every module a pickled source names.
    env = dict(os.environ)
    paths = [p or os.getcwd() for p in sys.path]
    env["PYTHONPATH"] = os.pathsep.join([str(pathlib.Path(__file__).parents[2]), *paths])
    self.process = subprocess.Popen(
      [sys.executable, "-m", "dfer_clip_jax.data.workers", str(req_r), str(rep_w)],
      pass_fds=(req_r, rep_w),
      env=env,
      stdin=subprocess.DEVNULL,
    )
    os.close(req_r)
    os.close(rep_w)
    self.requests = connection.Connection(req_w, readable=False)
    self.replies = connection.Connection(rep_r, writable=False)
    self.keys: collections.OrderedDict[int, None] = collections.OrderedDict()
    self.pending: dict[int, futures.Future] = {}
    self.lock = threading.Lock()
    self.dead: WorkerError | None = None
    self.reader = threading.Thread(
      target=self._read, name=f"input-worker-{number}-replies", daemon=True
    )
    self.reader.start()

  def _read(self) -> None:
    while True:
      try:
        request_id, meta, error = self.replies.recv()
      except (EOFError, OSError):
        break
      with self.lock:
        future = self.pending.pop(request_id, None)
      if future is None:
        continue
      if error is None:
        future.set_result(meta)
      else:
        exc, text = error
        exc.__cause__ = _RemoteTraceback(f"\nin input worker {self.number}:\n{text}")
        future.set_exception(exc)
    status = self.process.wait()
    with self.lock:
      self.dead = WorkerError(
        f"input worker {self.number} (pid {self.process.pid}) exited with status {status}"
        + {
          -9: " (killed: out of memory?)",
          -7: f" (bus error: is {SHM_DIR} full? see PoolBatches)",
        }.get(status, "")
      )
      pending, self.pending = self.pending, {}
    for future in pending.values():
      future.set_exception(self.dead)

  def submit(self, request_id, key, loader_bytes, step, block, shape) -> futures.Future:
    future: futures.Future = futures.Future()
    with self.lock:
      if self.dead is not None:
        raise self.dead
      # The same least-recently-used bookkeeping as the worker's: send a loader once.
      payload = None if key in self.keys else loader_bytes
      self.keys[key] = None
      self.keys.move_to_end(key)
      if len(self.keys) > _LOADER_CACHE:
        self.keys.popitem(last=False)
      self.pending[request_id] = future
      self.requests.send((request_id, key, payload, step, block, shape))
    return future

  @property
  def load(self) -> int:
    return len(self.pending)

  def close(self) -> None:
    self.requests.close()  # The worker sees EOF and exits.
    try:
      self.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self.process.kill()
      self.process.wait()
    self.reader.join(timeout=10)
    self.replies.close()


class WorkerPool:
  """`num_workers` worker processes; `submit` runs a batch loader's step in the least busy."""

  def __init__(self, num_workers: int):
    if num_workers < 1:
      raise ValueError(f"num_workers must be positive, got {num_workers}")
    self.workers = [_Worker(i) for i in range(num_workers)]
    self._ids = itertools.count()
    self._lock = threading.Lock()
    self._keys: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    self._key_bytes: dict[int, bytes] = {}

  @property
  def pids(self) -> list[int]:
    return [w.process.pid for w in self.workers]

  @property
  def broken(self) -> bool:
    return any(w.dead is not None or w.process.poll() is not None for w in self.workers)

  def _key(self, loader) -> tuple[int, bytes]:
    with self._lock:
      key = self._keys.get(loader)
      if key is None:
        key = self._keys[loader] = next(self._ids)
        self._key_bytes[key] = pickle.dumps(loader, protocol=pickle.HIGHEST_PROTOCOL)
        weakref.finalize(loader, self._key_bytes.pop, key, None)
      return key, self._key_bytes[key]

  def submit(self, loader, step: int, block: str, shape: tuple[int, ...]) -> futures.Future:
    """Runs `loader(step, out=<block as uint8 shape>)` in a worker; the future holds the
    batch's other entries (the video is in the block)."""
    key, data = self._key(loader)
    worker = min(self.workers, key=lambda w: w.load)
    return worker.submit(next(self._ids), key, data, int(step), block, tuple(shape))

  def close(self) -> None:
    for w in self.workers:
      w.close()


_POOLS: dict[int, WorkerPool] = {}
_POOLS_LOCK = threading.Lock()
_LIVE_BATCHES: weakref.WeakSet = weakref.WeakSet()


def shared_pool(num_workers: int) -> WorkerPool:
  """The process's pool of `num_workers` workers, started on first use and kept (evaluations
  reuse the training's workers); a pool with a dead worker is replaced."""
  with _POOLS_LOCK:
    pool = _POOLS.get(num_workers)
    if pool is not None and pool.broken:
      pool.close()
      pool = None
    if pool is None:
      pool = _POOLS[num_workers] = WorkerPool(num_workers)
    return pool


def shutdown() -> None:
  """Closes every open batch iterator (unlinking its shared memory) and stops the workers."""
  for batches in list(_LIVE_BATCHES):
    batches.close()
  with _POOLS_LOCK:
    for pool in _POOLS.values():
      pool.close()
    _POOLS.clear()


atexit.register(shutdown)


def _check_shared_memory(depth: int, nbytes: int) -> None:
  """Fails before any batch is made when the shared-memory file system cannot hold `depth`
  blocks of `nbytes`: its pages are allocated as the workers write, and a worker writing past
  the limit dies of a bus error instead of reporting it."""
  try:
    st = os.statvfs(SHM_DIR)
  except OSError:
    return  # Not Linux: shared memory is not a mounted file system there.
  free = st.f_bavail * st.f_frsize
  if depth * nbytes > free:
    raise RuntimeError(
      f"the input worker processes need {depth * nbytes / 2**20:.0f} MB of shared memory "
      f"({depth} batches in flight of {nbytes / 2**20:.1f} MB) but {SHM_DIR} has "
      f"{free / 2**20:.0f} MB free: give it more (docker run --shm-size=...), or lower "
      "data.worker_count (0 decodes in threads of this process, without shared memory) or "
      "the batch size per host"
    )


class PoolBatches:
  """Iterator over `batch_loader`'s steps [start, stop) made by a pool, in order, with `depth`
  batches in flight (one shared-memory block each).

  `batch_loader(step, out=video)` must write the step's video into `out` and return the
  batch dict (`loading.BatchLoader`); `batch_loader.shape` is the video's shape.
  """

  def __init__(self, pool: WorkerPool, batch_loader, start: int, stop: int | None, depth: int):
    self.pool = pool
    self.loader = batch_loader
    self.shape = tuple(batch_loader.shape)
    self.stop = stop
    self.next_step = start
    nbytes = max(1, int(np.prod(self.shape)))
    _check_shared_memory(depth, nbytes)
    self.blocks = [shared_memory.SharedMemory(create=True, size=nbytes) for _ in range(depth)]
    self.free = collections.deque(range(depth))
    self.pending: collections.deque = collections.deque()
    self.consumed = 0
    _LIVE_BATCHES.add(self)

  def _fill(self) -> None:
    while self.free and (self.stop is None or self.next_step < self.stop):
      b = self.free.popleft()
      future = self.pool.submit(self.loader, self.next_step, self.blocks[b].name, self.shape)
      self.pending.append((b, future))
      self.next_step += 1

  def start_prefetch(self) -> None:
    self._fill()

  def __iter__(self) -> PoolBatches:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.blocks is None:
      raise StopIteration
    self._fill()
    if not self.pending:
      raise StopIteration
    b, future = self.pending.popleft()
    meta = future.result()  # Raises the worker's exception.
    view = np.frombuffer(self.blocks[b].buf, np.uint8, count=int(np.prod(self.shape)))
    video = view.reshape(self.shape).copy()  # The block is reused for a later step.
    del view
    self.free.append(b)
    self.consumed += 1
    self._fill()
    return {"video": video, **meta}

  @property
  def completed(self) -> int:
    """Batches the workers have finished so far (handed out or waiting in a block)."""
    return self.consumed + sum(future.done() for _, future in self.pending)

  def close(self) -> None:
    blocks, self.blocks = getattr(self, "blocks", None), None  # None: __init__ failed
    if blocks is None:
      return
    # Unlinking while a worker still writes is safe: its mapping stays valid until it
    # unmaps, and the memory is freed then.
    for block in blocks:
      block.close()
      block.unlink()
    self.pending.clear()
    _LIVE_BATCHES.discard(self)

  def __del__(self):
    self.close()


if __name__ == "__main__":
  _serve(int(sys.argv[1]), int(sys.argv[2]))
