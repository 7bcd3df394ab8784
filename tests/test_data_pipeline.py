"""grain pipelines: sharding, padding, determinism, resume, bad clips, global arrays."""

import io
import json

import grain
import numpy as np
import pytest
from PIL import Image

from dfer_clip_jax.data import annotations, augment, datasets, loading, pipeline, sampling

_T = 4  # Frames per clip.
_S = 16  # Output image size.
_NUM_CLIPS = 13  # Prime: never a multiple of the batch sizes used here.
_COUNTS = [5, 9, 12, 3, 7, 20, 4, 6, 8, 11, 2, 10, 15]  # Frames on disk per clip.


def _aug(dataset: str) -> augment.Augmentation:
  """The train augmentation of a registered dataset."""
  return augment.Augmentation(op=datasets.get(dataset).augment_op)


def _frame(seed: int) -> Image.Image:
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("clips")
  lines = []
  for c, count in enumerate(_COUNTS):
    (root / f"c{c:02d}").mkdir()
    for f in range(count):
      _frame(100 * c + f).save(root / f"c{c:02d}" / f"{f:04d}.jpg", quality=90)
    lines.append(f"c{c:02d} {count} {c % 7}\n")
  (root / "list.txt").write_text("".join(lines))
  return root


@pytest.fixture(scope="module")
def source(folder_dataset):
  return annotations.FrameFolderSource.from_file(folder_dataset / "list.txt", num_classes=7)


def _train(source, **kwargs):
  args = dict(
    seed=3, num_frames=_T, image_size=_S, augmentation=_aug("dfew"), batch_size=2, num_epochs=2
  )
  args.update(kwargs)
  return pipeline.make_train_dataset(source, **args)


def _eval(source, **kwargs):
  args = dict(batch_size=3, num_frames=_T, image_size=_S)
  args.update(kwargs)
  return pipeline.make_eval_dataset(source, **args)


@pytest.fixture(scope="module")
def train_batches(source):
  """Both epochs of two fake processes (batch 2 each, global batch 4)."""
  return [list(_train(source, process_index=p, process_count=2)) for p in range(2)]


def test_train_batch_structure(source, train_batches):
  batch = train_batches[0][0]
  assert set(batch) == {"video", "label", "index", "mask"}
  assert batch["video"].shape == (2, _T, _S, _S, 3) and batch["video"].dtype == np.uint8
  assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int32
  assert batch["mask"].dtype == np.bool_ and batch["mask"].all()
  for b in train_batches[0]:
    np.testing.assert_array_equal(b["label"], [source.labels[i] for i in b["index"]])


def test_two_process_train_epochs_cover_each_clip_once(train_batches):
  spe = loading.steps_per_epoch(_NUM_CLIPS, 4)
  assert spe == 3 and all(len(b) == 2 * spe for b in train_batches)
  orders = []
  for epoch in range(2):
    seen = np.concatenate(
      [
        np.concatenate([train_batches[0][step]["index"], train_batches[1][step]["index"]])
        for step in range(epoch * spe, (epoch + 1) * spe)
      ]
    )
    assert len(set(seen.tolist())) == len(seen) == 12  # 13 mod 4 = 1 clip dropped.
    np.testing.assert_array_equal(seen, loading.epoch_order(_NUM_CLIPS, 3, epoch)[:12])
    orders.append(seen)
  assert not np.array_equal(orders[0], orders[1])  # Reshuffled every epoch.


def test_global_batches_do_not_depend_on_process_count(source, train_batches):
  single = list(_train(source, batch_size=4))
  assert len(single) == 6
  for step, batch in enumerate(single):
    for key in batch:
      np.testing.assert_array_equal(
        batch[key], np.concatenate([train_batches[0][step][key], train_batches[1][step][key]])
      )


def test_reproducible_and_fresh_draws_each_epoch(source, train_batches):
  again = list(_train(source, process_index=0, process_count=2))
  for a, b in zip(again, train_batches[0]):
    np.testing.assert_array_equal(a["video"], b["video"])
  other_seed = next(iter(_train(source, seed=4, process_index=0, process_count=2)))
  assert not np.array_equal(other_seed["video"], train_batches[0][0]["video"])
  # A clip seen in both epochs is augmented differently in each.
  videos = {}
  for batch in train_batches[0] + train_batches[1]:
    for row, index in enumerate(batch["index"]):
      videos.setdefault(int(index), []).append(batch["video"][row])
  twice = [v for v in videos.values() if len(v) == 2]
  assert twice and all(not np.array_equal(a, b) for a, b in twice)


def test_train_clip_equals_direct_load(source, train_batches):
  """The pipeline's clip = sampling + augmentation seeded by (seed, epoch, clip)."""
  batch = train_batches[1][4]  # Epoch 1.
  index = int(batch["index"][1])
  record = source[index]
  rng = loading.clip_rng(3, 1, index)
  frames = sampling.train_indices(record["num_frames"], rng, _T)
  expected = augment.load_train_clip(
    record["frames"], frames, rng, augmentation=_aug("dfew"), size=_S
  )
  np.testing.assert_array_equal(batch["video"][1], expected)


def test_two_process_eval_sees_each_clip_once_with_padding(source):
  per_process = [list(_eval(source, process_index=p, process_count=2)) for p in range(2)]
  assert [len(b) for b in per_process] == [3, 3]  # ceil(13 / 6) for both processes.
  index = np.concatenate([b["index"] for batches in per_process for b in batches])
  mask = np.concatenate([b["mask"] for batches in per_process for b in batches])
  np.testing.assert_array_equal(np.sort(index[mask]), np.arange(_NUM_CLIPS))
  assert (index[~mask] == -1).all() and (~mask).sum() == 18 - _NUM_CLIPS
  last = per_process[1][-1]
  assert not last["mask"].any() and not last["video"].any()
  first = per_process[0][0]
  np.testing.assert_array_equal(first["index"], [0, 1, 2])
  record = source[2]
  np.testing.assert_array_equal(
    first["video"][2],
    augment.load_test_clip(
      record["frames"], sampling.test_indices(record["num_frames"], _T), size=_S
    ),
  )
  np.testing.assert_array_equal(first["label"], [0, 1, 2])


def test_iterator_state_resumes_the_same_sequence(source, tmp_path):
  dataset = _train(source, num_epochs=None)
  it = iter(dataset)
  for _ in range(2):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert state["step"] == 2
  grain.checkpoint.CheckpointHandler().save(tmp_path, item=it)  # What Orbax would call.
  expected = [next(it) for _ in range(5)]  # Crosses into epoch 2 (steps 6..).
  resumed = iter(_train(source, num_epochs=None))
  resumed.set_state(state)
  restored = grain.checkpoint.CheckpointHandler().restore(
    tmp_path, item=iter(_train(source, num_epochs=None))
  )
  for a in expected:
    for other in (resumed, restored):
      b = next(other)
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
  assert resumed.get_state()["step"] == restored.step == 7
  with pytest.raises(ValueError, match="seed: saved 3, now 9"):
    iter(_train(source, seed=9, num_epochs=None)).set_state(state)
  # Every augmentation setting is in the fingerprint (derived from the `Augmentation` value).
  milder = augment.Augmentation(op="brightness", crop_min_area=0.5)
  with pytest.raises(ValueError, match="crop_min_area: saved 0.08, now 0.5"):
    iter(_train(source, augmentation=milder, num_epochs=None)).set_state(state)
  # A run saved on the other decode path is told how to continue it.
  with pytest.raises(ValueError, match=r"add --config.data.fast_decode=False$"):
    iter(_train(source, fast_decode=True, num_epochs=None)).set_state(state)
  with pytest.raises(TypeError, match="repeats forever"):
    len(dataset)
  for iterator in (it, resumed, restored):
    iterator.close()


def test_worker_processes_give_identical_batches(source):
  inline = list(_train(source, num_epochs=1, augmentation=_aug("ferv39k")))
  workers = list(_train(source, num_epochs=1, augmentation=_aug("ferv39k"), worker_count=2))
  assert len(inline) == len(workers) == 6
  for a, b in zip(inline, workers):
    for key in a:
      np.testing.assert_array_equal(a[key], np.asarray(b[key]))


def test_fast_decode_batches_identical_across_worker_counts(source):
  # OpenCV in worker processes (its own thread pool off) gives the in-process pixels.
  inline = list(_train(source, num_epochs=1, fast_decode=True))
  workers = list(_train(source, num_epochs=1, fast_decode=True, worker_count=1))
  exact = list(_train(source, num_epochs=1))
  assert len(inline) == len(workers) == len(exact) == 6
  for a, b, e in zip(inline, workers, exact):
    for key in a:
      np.testing.assert_array_equal(a[key], np.asarray(b[key]))
    np.testing.assert_array_equal(a["label"], e["label"])
    assert np.abs(a["video"].astype(int) - e["video"].astype(int)).mean() < 8


def _bytes_source(num_clips: int, bad: set[int]):
  """An in-memory source with encoded frames (the packed-record layout)."""
  records = []
  for c in range(num_clips):
    frames = []
    for f in range(6):
      buf = io.BytesIO()
      _frame(c * 10 + f).save(buf, "JPEG")
      frames.append(buf.getvalue())
    if c in bad:
      frames[3] = frames[3][: len(frames[3]) // 3]
    records.append({"clip_id": f"clip{c}", "label": c % 3, "num_frames": 6, "frames": frames})
  return records


def test_bad_clip_error_names_the_clip(folder_dataset):
  (folder_dataset / "broken").mkdir(exist_ok=True)
  lst = folder_dataset / "broken.txt"
  lst.write_text("c00 5 0\nc01 9 1\nbroken 4 2\nc02 12 3\n")  # 'broken' has no frames.
  source = annotations.FrameFolderSource.from_file(lst)
  with pytest.raises(loading.BadClipError, match=r"clip 2 'broken' \(.*broken.txt:3\)"):
    list(_eval(source, batch_size=4))
  with pytest.raises(loading.BadClipError, match=r"0 frames found, the annotation says 4"):
    list(_train(source, batch_size=4, num_epochs=1))


def test_bad_clip_skip_replaces_and_reports():
  source = _bytes_source(7, bad={1, 4})
  dataset = pipeline.make_train_dataset(
    source,
    seed=0,
    num_frames=_T,
    image_size=_S,
    augmentation=_aug("mafw"),
    batch_size=3,
    num_epochs=2,
    bad_clip_policy="skip",
  )
  batches = list(dataset)
  used = np.concatenate([b["index"] for b in batches])
  assert not {1, 4} & set(used.tolist()) and np.concatenate([b["mask"] for b in batches]).all()
  planned = np.concatenate([loading.epoch_order(7, 0, e)[:6] for e in range(2)])
  assert len(dataset.skipped) == int(np.isin(planned, [1, 4]).sum()) > 0
  for skip in dataset.skipped:
    assert skip.index in (1, 4) and skip.clip_id == f"clip{skip.index}"
    assert "truncated" in skip.reason.lower() and skip.replaced_by not in (1, 4)
  # Evaluation: the bad clips' rows are masked out and reported; the rest are intact.
  evaluation = _eval(source, batch_size=4, bad_clip_policy="skip")
  rows = list(evaluation)
  index = np.concatenate([b["index"] for b in rows])
  mask = np.concatenate([b["mask"] for b in rows])
  np.testing.assert_array_equal(index, [0, 1, 2, 3, 4, 5, 6, -1])
  np.testing.assert_array_equal(mask, [1, 0, 1, 1, 0, 1, 1, 0])
  assert sorted(s.index for s in evaluation.skipped) == [1, 4]


def test_argument_checks(source):
  with pytest.raises(ValueError, match="do not fill one global batch"):
    _train(source, batch_size=7, process_count=2)
  with pytest.raises(ValueError, match="bad_clip_policy"):
    _eval(source, bad_clip_policy="ignore")
  with pytest.raises(ValueError, match="process_index"):
    _eval(source, process_index=2, process_count=2)
  assert len(_train(source, num_epochs=3)) == 3 * 6


def test_split_train_val_is_stratified_and_deterministic():
  labels = [0] * 20 + [1] * 9 + [2] * 3 + [3]
  train, val = pipeline.split_train_val(labels, 0.2, seed=0)
  assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
  val_labels = np.asarray(labels)[val]
  assert [(val_labels == c).sum() for c in range(4)] == [4, 2, 1, 0]
  again = pipeline.split_train_val(labels, 0.2, seed=0)
  assert np.array_equal(again[1], val)
  assert not np.array_equal(pipeline.split_train_val(labels, 0.2, seed=1)[1], val)
  assert len(pipeline.split_train_val(100, 0.25, seed=0)[1]) == 25
  with pytest.raises(ValueError, match="val_fraction"):
    pipeline.split_train_val(labels, 1.0, seed=0)


def test_subset_source(source):
  train, val = pipeline.split_train_val(source, 0.3, seed=0)
  subset = loading.SubsetSource(source, val)
  assert len(subset) == len(val) and subset.labels == [source.labels[i] for i in val]
  assert subset[0] == source[int(val[0])]
  batch = next(iter(_eval(subset, batch_size=2)))
  np.testing.assert_array_equal(batch["index"], [0, 1])


def test_to_global_batch_shards_the_leading_axis():
  import jax
  from jax.sharding import Mesh

  devices = np.array(jax.devices()[:8]).reshape(4, 2)
  mesh = Mesh(devices, ("data", "fsdp"))
  batch = {"video": np.arange(8 * 2 * 3, dtype=np.uint8).reshape(8, 2, 3), "mask": np.ones(8, bool)}
  out = pipeline.to_global_batch(batch, mesh)
  assert out["video"].shape == (8, 2, 3) and out["video"].dtype == np.uint8
  assert out["video"].sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_array_equal(np.asarray(out["video"]), batch["video"])
  assert {s.data.shape for s in out["video"].addressable_shards} == {(1, 2, 3)}
  only_data = Mesh(devices.reshape(8), ("data",))
  assert pipeline.to_global_batch(batch, only_data)["mask"].sharding.spec[0] == "data"
  with pytest.raises(ValueError, match="do not split over the 8 shards"):
    pipeline.to_global_batch({"x": np.zeros(6)}, mesh)
  with pytest.raises(ValueError, match="none of the batch axes"):
    pipeline.to_global_batch(batch, Mesh(devices, ("a", "b")))


@pytest.mark.parametrize("size", [0, 1, 3])
def test_prefetch_to_device_keeps_order_and_runs_ahead(size):
  import jax
  from jax.sharding import Mesh

  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  pulled = []

  def host_batches(n):
    for i in range(n):
      pulled.append(i)
      yield {"x": np.full((8, 2), i, np.int32)}

  out = pipeline.prefetch_to_device(host_batches(5), mesh, size=size)
  first = next(out)
  assert isinstance(first["x"], jax.Array) and first["x"].sharding.spec[0] == "data"
  assert len(pulled) == 1 + size  # the yielded batch plus `size` already on the devices
  rest = [int(np.asarray(b["x"])[0, 0]) for b in out]
  assert [int(np.asarray(first["x"])[0, 0])] + rest == [0, 1, 2, 3, 4]
  with pytest.raises(ValueError, match="prefetch size"):
    next(pipeline.prefetch_to_device(host_batches(1), mesh, size=-1))


def test_iterator_state_at_rewinds_a_prefetching_iterator(source):
  """Checkpointing under device prefetch: the state saved for step s, restored, gives exactly
  the batches from step s on, although the iterator had run ahead."""
  import jax
  from jax.sharding import Mesh

  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  it = iter(_train(source))
  device_batches = pipeline.prefetch_to_device(it, mesh, size=2)
  seen = [np.asarray(next(device_batches)["index"]) for _ in range(3)]
  assert it.step == 5  # three yielded, two more on the devices
  state = json.loads(json.dumps(pipeline.iterator_state_at(it, 3)))
  resumed = iter(_train(source))
  resumed.set_state(state)
  expected = [b["index"] for b in list(_train(source))[3:5]]
  np.testing.assert_array_equal(next(resumed)["index"], expected[0])
  np.testing.assert_array_equal(np.asarray(next(device_batches)["index"]), expected[0])
  np.testing.assert_array_equal(next(resumed)["index"], expected[1])
  assert len(seen) == 3
  with pytest.raises(ValueError, match="behind the requested"):
    pipeline.iterator_state_at(it, 99)
