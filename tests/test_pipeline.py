"""Tests of the tf.data views (msldm_jax/data/pipeline.py, data/windows.py).

The datasets are tiny TFDS datasets written by `data/synthetic.py` and read back with
`tfds.builder_from_directory`, as real builds are. To keep them tiny, the audio runs at
SAMPLE_RATE = 1000 Hz: the views convert seconds with `data.sample_rate`, so the windows are
1000 samples at hop 500 with jitter ±250 (training) and 5000 at hop 1000 (evaluation).

"Encoded" tracks make every sample say where it came from: sample n of stem s of track t
holds (4 t + s + 1) * 2**14 + n, exact in float32, so a window's first sample gives its
track, stem and start, and the rest must count up from it.
"""

import json

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from msldm_jax import config_loading
from msldm_jax import paper_config
from msldm_jax import stems
from msldm_jax.data import input_iterator
from msldm_jax.data import pipeline
from msldm_jax.data import synthetic
from msldm_jax.data import windows
from msldm_jax.parallel import mesh as mesh_lib

SAMPLE_RATE = 1000
WINDOW, HOP, JITTER = 1000, 500, 250
CHUNK = 1500
CODE = 2**14
# Track lengths in samples (< CODE): uneven, so grids and chunks end with partial tails.
ENCODED_LENGTHS = (6200, 8000, 7300, 5100, 9999, 4000)
# (track, stem) pairs marked absent; their audio stays encoded, so a leak would show.
ENCODED_ABSENT = {(1, 2), (3, 3), (4, 0)}

tfds.display_progress_bar(False)


def data_config(**vae_overrides):
  config = config_loading.load_config("configs/demo.py:variant=tiny").data
  config.sample_rate = SAMPLE_RATE
  config.chunks.samples = CHUNK
  config.chunks.shuffle_buffer = 8
  # The paper's window seconds, which the module docstring's sample counts follow (the tiny
  # variant trains on shorter ones).
  paper_windows = paper_config.get_paper_config().data.vae_windows
  for key in ("train_seconds", "train_hop_seconds", "jitter_seconds", "eval_seconds",
              "eval_hop_seconds"):
    config.vae_windows[key] = paper_windows[key]
  config.vae_windows.shuffle_buffer = 64
  for key, value in vae_overrides.items():
    config.vae_windows[key] = value
  return config


def encoded_tracks(lengths, absent):
  tracks = []
  for t, n in enumerate(lengths):
    audio = np.stack([(4 * t + s + 1) * CODE + np.arange(n) for s in range(stems.NUM_STEMS)])
    present = np.array([(t, s) not in absent for s in range(stems.NUM_STEMS)])
    tracks.append(synthetic.Track(f"Track{t:05d}", audio.astype(np.float32), present))
  return tracks


def decode(rows):
  """(track, stem, start) of each row of [..., n] encoded audio; asserts contiguity."""
  rows = np.asarray(rows).reshape(-1, np.shape(rows)[-1]).astype(np.int64)
  first = rows[:, 0]
  np.testing.assert_array_equal(rows, first[:, None] + np.arange(rows.shape[1]))
  code = first // CODE - 1
  return code // 4, code % 4, first % CODE


@pytest.fixture(scope="module")
def encoded_dir(tmp_path_factory):
  return synthetic.write_dataset(
      str(tmp_path_factory.mktemp("encoded")),
      {"train": encoded_tracks(ENCODED_LENGTHS, ENCODED_ABSENT),
       "validation": encoded_tracks(ENCODED_LENGTHS[:2], set())},
      name="encoded_stems")


def collect(ds):
  batches = list(ds.as_numpy_iterator())
  return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def vae_fn(dataset_dir, *, batch_size=32, seed=0):
  """A training `dataset_fn` for InputIterator over the encoded dataset."""
  def fn(epoch):
    return pipeline.vae_windows(dataset_dir, "train", data_config=data_config(),
                                batch_size=batch_size, train=True, seed=seed, epoch=epoch)
  return fn


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]))


def test_window_spec_of_the_reference_config():
  config = config_loading.load_config("configs/demo.py").data
  train = pipeline.vae_window_spec(config, train=True)
  assert (train.window, train.hop, train.jitter) == (22050, 11025, 5512)
  evaluation = pipeline.vae_window_spec(config, train=False)
  assert (evaluation.window, evaluation.hop, evaluation.jitter) == (110250, 22050, 0)
  assert train.stems == stems.STEM_NAMES and train.silence_threshold == 1.5e-5


def test_jittered_starts_stay_near_the_grid_and_inside_the_track():
  n, window, hop, jitter = 200_003, 100, 50, 25
  key = tf.constant([3, 4], tf.int64)
  starts = windows.jittered_starts(n, window, hop, jitter, key).numpy()
  grid = windows.grid_starts(n, window, hop).numpy()
  assert len(starts) == len(grid) == (n - window) // hop + 1
  shifts = starts - grid
  assert np.all(np.abs(shifts) <= jitter)
  assert shifts.min() == -jitter and shifts.max() == jitter  # Both ends are drawn.
  assert starts.min() >= 0 and starts.max() <= n - window
  assert starts[0] >= 0 and np.all(np.diff(starts) >= 0)
  np.testing.assert_array_equal(starts, windows.jittered_starts(n, window, hop, jitter, key))
  other = windows.jittered_starts(n, window, hop, jitter, tf.constant([3, 5], tf.int64))
  assert np.any(other.numpy() != starts)
  assert windows.grid_starts(window - 1, window, hop).shape == (0,)


def test_train_windows_jitter_stems_and_lengths(encoded_dir):
  config = data_config()
  got = collect(pipeline.vae_windows(encoded_dir, "train", data_config=config, batch_size=1,
                                     train=True, seed=0))
  assert got["audio"].shape[1:] == (WINDOW,) and got["audio"].dtype == np.float32
  assert got["stem"].dtype == np.int32
  track, stem, start = decode(got["audio"])
  np.testing.assert_array_equal(stem, got["stem"])
  shifted = 0
  for t, n in enumerate(ENCODED_LENGTHS):
    for s in range(stems.NUM_STEMS):
      mine = np.sort(start[(track == t) & (stem == s)])
      if (t, s) in ENCODED_ABSENT:
        assert mine.size == 0, f"absent stem {s} of track {t} was windowed"
        continue
      grid = np.arange((n - WINDOW) // HOP + 1) * HOP
      assert mine.size == grid.size, (t, s)
      # Jittered starts keep the grid's order (hop >= 2 jitter), so sorting pairs them up.
      assert np.all(np.abs(mine - grid) <= JITTER)
      assert mine.min() >= 0 and mine.max() <= n - WINDOW
      shifted += np.count_nonzero(mine != grid)
  assert shifted > 0.8 * len(start)  # Jitter really moves windows (not clamped ones).


def test_only_selected_stems(encoded_dir):
  config = data_config(stems="piano, bass")
  got = collect(pipeline.vae_windows(encoded_dir, "train", data_config=config, batch_size=1,
                                     train=True, seed=0))
  assert set(got["stem"].tolist()) == {0, 3}
  _, stem, _ = decode(got["audio"])
  np.testing.assert_array_equal(stem, got["stem"])


def test_stem_batches_hold_one_stem_each_in_turn(encoded_dir):
  """Per-source VAE training: batch k holds stem k mod (stems) only, on every process, and
  those are the same windows the mixed view cuts."""
  config = data_config(stems="bass,guitar,piano")
  batches = []
  for index in range(2):
    ds = pipeline.vae_windows(encoded_dir, "train", data_config=config, batch_size=4,
                              train=True, seed=0, process_index=index, process_count=2,
                              stem_batches=True)
    batches.append(list(ds.as_numpy_iterator()))
  turn = [0, 2, 3]
  for process_batches in batches:
    assert len(process_batches) >= 3
    for k, batch in enumerate(process_batches):
      assert set(batch["stem"].tolist()) == {turn[k % 3]}
      _, stem, _ = decode(batch["audio"])
      np.testing.assert_array_equal(stem, batch["stem"])
  mixed = collect(pipeline.vae_windows(encoded_dir, "train", data_config=config, batch_size=1,
                                       train=True, seed=0))
  every_window = {tuple(decode(row[None])[i][0] for i in (0, 1, 2)) for row in mixed["audio"]}
  for batch in batches[0]:
    for row in batch["audio"]:
      assert tuple(decode(row[None])[i][0] for i in (0, 1, 2)) in every_window
  with pytest.raises(ValueError, match="stem_batches"):
    pipeline.vae_windows(encoded_dir, "train", data_config=config, batch_size=4,
                         train=False, stem_batches=True)


def _sine(n, amplitude, period=37.0):
  return (amplitude * np.sin(2 * np.pi * np.arange(n) / period)).astype(np.float32)


@pytest.mark.parametrize("train", [True, False])
def test_silence_rule_drops_exactly_the_quiet_windows(tmp_path, train):
  n = 12_000
  audio = np.zeros((stems.NUM_STEMS, n), np.float32)
  audio[0] = _sine(n, 0.5)
  audio[0, 3000:6500] = 0.0                       # A stretch of true silence.
  audio[1] = 0.0                                  # Present, silent throughout.
  audio[2] = _sine(n, 0.5)                        # Loud, but absent: must not appear.
  # Quiet regions on either side of the threshold. With the reference's norm / N rule (not
  # RMS, which would call all of them loud), a 1 s sine is silent below amplitude ~6.7e-4 and
  # a 5 s one below ~1.5e-3.
  audio[3] = np.concatenate([_sine(4000, 5e-4), _sine(4000, 9e-4), _sine(4000, 2e-3)])
  present = np.array([True, True, False, True])
  path = synthetic.write_dataset(str(tmp_path), {"train": [
      synthetic.Track("Track00000", audio, present)]}, name="quiet_stems")
  config = data_config(jitter_seconds=0.0)  # Known starts, so the expectation is exact.
  spec = pipeline.vae_window_spec(config, train)
  got = collect(pipeline.vae_windows(path, "train", data_config=config, batch_size=1,
                                     train=train, seed=0))
  if not train:
    assert got.pop("valid").all()
  for s in range(stems.NUM_STEMS):
    expected = []
    for start in range(0, n - spec.window + 1, spec.hop):
      x = audio[s, start:start + spec.window]
      ratio = np.linalg.norm(x.astype(np.float64)) / spec.window / spec.silence_threshold
      assert abs(ratio - 1) > 1e-3, "test audio too close to the threshold"
      if present[s] and ratio >= 1:
        expected.append(x)
    mine = got["audio"][got["stem"] == s]
    assert len(mine) == len(expected), f"stem {s}"
    assert sorted(map(bytes, mine)) == sorted(map(bytes, expected))
  assert 0 < len(got["audio"]) < 3 * len(range(0, n - spec.window + 1, spec.hop))


def test_eval_windows_are_deterministic_and_padded(encoded_dir):
  def run():
    return list(pipeline.vae_windows(encoded_dir, "validation", data_config=data_config(),
                                     batch_size=7, train=False, seed=123).as_numpy_iterator())
  first, second = run(), run()
  assert_same_batches(first, second)
  valid = np.concatenate([b["valid"] for b in first])
  expected = sum(stems.NUM_STEMS * ((n - 5000) // 1000 + 1) for n in ENCODED_LENGTHS[:2])
  assert valid.sum() == expected and len(valid) == 7 * len(first) > expected
  last = first[-1]
  assert np.all(last["audio"][~last["valid"]] == 0)
  track, stem, start = decode(np.concatenate([b["audio"][b["valid"]] for b in first]))
  assert np.all(start % 1000 == 0)


def test_mixture_windows_are_the_sum_of_the_present_stems(encoded_dir):
  # Sample i of stem s of track t is (4t + s + 1)·CODE + i, so a window of the mixture of
  # the present stems S starting at `start` is Σ_{s∈S} (4t + s + 1)·CODE + |S|·(start + j).
  def rows_by_track(audio, window, absent):
    found = {}
    for row in audio:
      for t in range(len(ENCODED_LENGTHS)):
        present = [s for s in range(stems.NUM_STEMS) if (t, s) not in absent]
        offset = sum(4 * t + s + 1 for s in present) * CODE
        start = (row[0] - offset) / len(present)
        if (start == int(start) and 0 <= start <= ENCODED_LENGTHS[t] - window and np.array_equal(
            row, offset + len(present) * (start + np.arange(window)))):
          found.setdefault(t, []).append(int(start))
          break
      else:
        raise AssertionError(f"window starting {row[0]} is no track's mixture")
    return found

  # Evaluation: every grid window of each validation track's mixture, stem index 0.
  got = collect(pipeline.vae_windows(encoded_dir, "validation", data_config=data_config(),
                                     batch_size=5, train=False, mixture=True))
  audio = got["audio"][got["valid"]]
  assert np.all(got["stem"] == 0)
  found = rows_by_track(audio, 5000, absent=set())
  for t, n in enumerate(ENCODED_LENGTHS[:2]):
    assert sorted(found[t]) == list(range(0, n - 5000 + 1, 1000))
  # Training: jittered windows of every track's mixture; absent stems are left out.
  got = collect(pipeline.vae_windows(encoded_dir, "train", data_config=data_config(),
                                     batch_size=1, train=True, seed=0, mixture=True))
  found = rows_by_track(got["audio"], WINDOW, absent=ENCODED_ABSENT)
  assert sorted(found) == list(range(len(ENCODED_LENGTHS)))
  for t, n in enumerate(ENCODED_LENGTHS):
    assert len(found[t]) == (n - WINDOW) // HOP + 1


def test_chunks_are_stem_aligned(encoded_dir):
  got = collect(pipeline.diffusion_chunks(encoded_dir, "train", data_config=data_config(),
                                          batch_size=1, train=True, seed=0))
  assert got["audio"].shape[1:] == (stems.NUM_STEMS, CHUNK)
  track, stem, start = decode(got["audio"])
  track, stem, start = (v.reshape(-1, stems.NUM_STEMS) for v in (track, stem, start))
  assert np.all(track == track[:, :1]) and np.all(start == start[:, :1])
  np.testing.assert_array_equal(stem, np.broadcast_to(np.arange(stems.NUM_STEMS), stem.shape))
  assert np.all(start % CHUNK == 0)
  for t, n in enumerate(ENCODED_LENGTHS):  # Final partial chunks are dropped.
    assert sorted(start[track[:, 0] == t, 0]) == list(range(0, n - CHUNK + 1, CHUNK))
  # Evaluation: the stored track order, each track's chunks in time order.
  got = collect(pipeline.diffusion_chunks(encoded_dir, "train", data_config=data_config(),
                                          batch_size=4, train=False))
  track, _, start = decode(got["audio"][got["valid"]][:, 0])
  runs = [t for i, t in enumerate(track) if i == 0 or t != track[i - 1]]
  assert sorted(runs) == list(range(len(ENCODED_LENGTHS)))  # One run per track.
  for t, n in enumerate(ENCODED_LENGTHS):
    assert start[track == t].tolist() == list(range(0, n - CHUNK + 1, CHUNK))


def test_process_splits_are_disjoint_and_cover_the_split(encoded_dir):
  for view, min_length in ((pipeline.vae_windows, 5000), (pipeline.diffusion_chunks, CHUNK)):
    seen = []
    for index in range(2):
      ds = view(encoded_dir, "train", data_config=data_config(), batch_size=2, train=False,
                process_index=index, process_count=2)
      assert ds.element_spec["audio"].shape[0] == 1  # Global batch 2: 1 row per process.
      got = collect(ds)
      seen.append(set(decode(got["audio"][got["valid"]])[0].tolist()))
    assert not seen[0] & seen[1], view.__name__
    # Every track long enough for one evaluation window or chunk is read by one process.
    expected = {t for t, n in enumerate(ENCODED_LENGTHS) if n >= min_length}
    assert seen[0] | seen[1] == expected, view.__name__


def test_same_seed_same_batches_other_seed_other_order(encoded_dir):
  # ~9 batches per epoch: 12 batches cross into the second epoch.
  def batches(seed):
    return take(input_iterator.InputIterator(vae_fn(encoded_dir, seed=seed)), 12)
  first, again, other = batches(0), batches(0), batches(1)
  assert_same_batches(first, again)
  assert any(not np.array_equal(a["audio"], b["audio"]) for a, b in zip(first, other))
  epoch0 = collect(vae_fn(encoded_dir)(epoch=0))
  epoch1 = collect(vae_fn(encoded_dir)(epoch=1))
  assert not np.array_equal(epoch0["audio"][:32], epoch1["audio"][:32])


@pytest.mark.parametrize("view", ["vae", "chunks"])
def test_resume_continues_exactly(encoded_dir, view):
  if view == "vae":
    fn, total, stops = vae_fn(encoded_dir), 14, (5, 11)  # ~9 batches per epoch.
  else:
    def fn(epoch):
      return pipeline.diffusion_chunks(encoded_dir, "train", data_config=data_config(),
                                       batch_size=8, train=True, seed=5, epoch=epoch)
    # 24 chunks: 3 batches per epoch; stopping after 6 saves the end of an epoch.
    total, stops = 9, (4, 6)
  uninterrupted = take(input_iterator.InputIterator(fn), total)
  epochs = set()
  for k in stops:
    it = input_iterator.InputIterator(fn)
    take(it, k)
    state = json.loads(json.dumps(it.state()))
    assert set(state) == {"epoch", "batch_in_epoch"}
    epochs.add(state["epoch"])
    resumed = input_iterator.InputIterator(fn, position=state)
    assert resumed.state() == state
    assert_same_batches(take(resumed, total - k), uninterrupted[k:])
  assert max(epochs) >= 1  # Some resumption starts past the first epoch.


def test_global_batches_are_sharded_over_the_mesh(encoded_dir):
  mesh = mesh_lib.make_mesh()
  assert mesh.devices.size == 8
  fn = vae_fn(encoded_dir, batch_size=16)
  batch = next(input_iterator.InputIterator(fn, mesh=mesh))
  local = next(input_iterator.InputIterator(fn))
  for key, shape in (("audio", (16, WINDOW)), ("stem", (16,))):
    array = batch[key]
    assert isinstance(array, jax.Array) and array.shape == shape
    assert array.sharding.is_equivalent_to(mesh_lib.batch_sharding(mesh), len(shape))
    assert len(array.addressable_shards) == 8
    assert all(s.data.shape == (2,) + shape[1:] for s in array.addressable_shards)
    np.testing.assert_array_equal(np.asarray(array), local[key])

  def chunk_fn(epoch):
    return pipeline.diffusion_chunks(encoded_dir, "validation", data_config=data_config(),
                                     batch_size=8, train=False, epoch=epoch)
  batches = list(input_iterator.InputIterator(chunk_fn, mesh=mesh, num_epochs=1))
  assert batches[0]["audio"].shape == (8, stems.NUM_STEMS, CHUNK)
  assert int(sum(b["valid"].sum() for b in batches)) == 4 + 5


def test_errors_name_the_value_at_fault(encoded_dir):
  config = data_config()
  with pytest.raises(ValueError, match="'nope'"):
    pipeline.vae_windows(encoded_dir, "nope", data_config=config, batch_size=4, train=True)
  with pytest.raises(ValueError, match="batch_size=3"):
    pipeline.vae_windows(encoded_dir, "train", data_config=config, batch_size=3, train=True,
                         process_count=2, process_index=0)
  with pytest.raises(ValueError, match="'violin'"):
    pipeline.vae_windows(encoded_dir, "train", data_config=data_config(stems="violin"),
                         batch_size=4, train=True)
  with pytest.raises(ValueError, match="batch_in_epoch"):
    input_iterator.InputIterator(vae_fn(encoded_dir), position={"epoch": 1})
  with pytest.raises(ValueError, match="no batch"):
    next(input_iterator.InputIterator(vae_fn(encoded_dir, batch_size=4096)))
