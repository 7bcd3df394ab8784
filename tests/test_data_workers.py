"""Input worker processes: light imports, one pool kept across evaluations, errors, cleanup."""

import os
import pathlib
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from dfer_clip_jax.data import annotations, augment, loading, pipeline, workers

_REPO = pathlib.Path(__file__).resolve().parents[1]
_T, _S = 4, 16


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  root = tmp_path_factory.mktemp("clips")
  rng = np.random.default_rng(0)
  lines = []
  for c in range(10):
    (root / f"c{c}").mkdir()
    for f in range(6 + c):
      pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(root / f"c{c}" / f"{f:03d}.jpg")
    lines.append(f"c{c} {6 + c} {c % 7}\n")
  (root / "list.txt").write_text("".join(lines))
  return annotations.FrameFolderSource.from_file(root / "list.txt", num_classes=7)


def _eval(source, worker_count):
  return pipeline.make_eval_dataset(
    source, batch_size=3, num_frames=_T, image_size=_S, worker_count=worker_count
  )


def _train(source, worker_count, **kwargs):
  return pipeline.make_train_dataset(
    source,
    seed=1,
    num_frames=_T,
    image_size=_S,
    augmentation=augment.Augmentation(op="brightness"),
    batch_size=2,
    num_epochs=1,
    worker_count=worker_count,
    **kwargs,
  )


def _shm_exists(name: str) -> bool:
  return pathlib.Path("/dev/shm", name.lstrip("/")).exists()


def test_a_worker_imports_neither_jax_grain_nor_tfds(source, tmp_path):
  """What a worker process runs -- the workers module, then unpickling a batch loader and
  loading a batch -- in a fresh interpreter, whose modules are then listed."""
  loader = _train(source, 0).batch_loader
  (tmp_path / "loader.pkl").write_bytes(pickle.dumps(loader))
  script = textwrap.dedent(
    f"""
    import pickle, sys, time
    start = time.perf_counter()
    import dfer_clip_jax.data.workers
    loader = pickle.loads(open({str(tmp_path / "loader.pkl")!r}, "rb").read())
    batch = loader(0)
    heavy = sorted({{m.split(".")[0] for m in sys.modules}} & {{"jax", "grain",
                    "tensorflow_datasets", "tensorflow", "flax", "orbax", "torch"}})
    print(heavy, batch["video"].shape, time.perf_counter() - start)
    """
  )
  out = subprocess.run(
    [sys.executable, "-c", script],
    capture_output=True,
    text=True,
    check=True,
    env={**os.environ, "PYTHONPATH": str(_REPO)},
  ).stdout.split()
  assert out[0] == "[]", f"a worker imports heavy modules: {out}"


def test_workers_are_kept_across_evaluations_and_leave_no_shared_memory(source):
  workers.shutdown()
  expected = list(_eval(source, 0))
  pids, blocks = [], []
  for _ in range(3):  # three evaluations, as three epochs would run them
    dataset = _eval(source, 2)
    it = iter(dataset)
    got = [next(it)]
    inner = it._it
    blocks += [b.name for b in inner.blocks]
    assert all(_shm_exists(name) for name in blocks[-len(inner.blocks) :])
    got += list(it)
    pids.append(tuple(workers.shared_pool(2).pids))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
  assert len(set(pids)) == 1, f"new worker processes per evaluation: {pids}"
  assert not any(_shm_exists(name) for name in blocks), "shared memory left behind"


def test_a_bad_clip_in_a_worker_names_the_clip_and_the_worker_traceback(source, tmp_path):
  (tmp_path / "broken").mkdir()
  lst = tmp_path / "broken.txt"
  lst.write_text(f"{source.annotations[0].frame_dir} 6 0\nbroken 3 1\n")
  bad = annotations.FrameFolderSource.from_file(lst)
  with pytest.raises(loading.BadClipError, match=r"clip 1 'broken' \(.*broken.txt:2\)") as e:
    list(_eval(bad, 1))
  assert "in input worker" in str(e.value.__cause__)


def test_a_killed_worker_fails_the_pipeline_and_the_next_one_starts_fresh(source):
  workers.shutdown()
  it = iter(_eval(source, 1))
  next(it)
  pool = workers.shared_pool(1)
  os.kill(pool.pids[0], signal.SIGKILL)
  with pytest.raises(workers.WorkerError, match=r"exited with status -9"):
    for _ in range(10):
      next(it)
  assert len(list(_eval(source, 1))) == 4  # a fresh pool
  assert workers.shared_pool(1) is not pool


def test_workers_exit_with_their_parent_and_nothing_is_leaked(source, tmp_path):
  """A parent that exits normally unlinks its blocks without resource-tracker warnings; one
  that is killed takes its workers with it."""
  (tmp_path / "source.pkl").write_bytes(pickle.dumps(source))
  script = textwrap.dedent(
    f"""
    import pickle, sys
    from dfer_clip_jax.data import augment, pipeline, workers
    source = pickle.loads(open({str(tmp_path / "source.pkl")!r}, "rb").read())
    ds = pipeline.make_eval_dataset(source, batch_size=3, num_frames=4, image_size=16,
                                    worker_count=2)
    it = iter(ds)
    next(it)
    print(" ".join(map(str, workers.shared_pool(2).pids)), flush=True)
    if sys.argv[1] == "hang":
      import time; time.sleep(600)
    """
  )
  env = {**os.environ, "PYTHONPATH": str(_REPO)}
  done = subprocess.run(
    [sys.executable, "-c", script, "exit"], capture_output=True, text=True, env=env, check=True
  )
  assert "leaked" not in done.stderr and "Traceback" not in done.stderr, done.stderr
  hang = subprocess.Popen(
    [sys.executable, "-c", script, "hang"], stdout=subprocess.PIPE, text=True, env=env
  )
  pids = [int(p) for p in hang.stdout.readline().split()]
  hang.kill()
  hang.wait()
  deadline = time.time() + 20
  while time.time() < deadline and any(pathlib.Path(f"/proc/{p}").exists() for p in pids):
    time.sleep(0.1)
  alive = [p for p in pids if pathlib.Path(f"/proc/{p}/status").exists()]
  alive = [p for p in alive if "zombie" not in pathlib.Path(f"/proc/{p}/status").read_text()]
  assert not alive, f"workers {alive} outlived their killed parent"


def test_too_little_shared_memory_fails_before_any_worker_writes(source, monkeypatch):
  """A worker writing past a full /dev/shm (Docker's default is 64 MB) would die of a bus
  error; the pipeline says what it needs and how to get it instead."""
  real = os.statvfs

  def statvfs(path):
    st = real(path)
    if path != workers.SHM_DIR:
      return st
    return os.statvfs_result((*st[:4], 0, *st[5:]))  # f_bavail = 0 blocks

  monkeypatch.setattr(os, "statvfs", statvfs)
  before = set(os.listdir(workers.SHM_DIR))
  with pytest.raises(RuntimeError, match=r"need \d+ MB of shared memory .* has 0 MB free"):
    next(iter(_eval(source, 2)))
  assert set(os.listdir(workers.SHM_DIR)) <= before  # no block was created
