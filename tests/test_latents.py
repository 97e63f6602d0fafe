"""The latent dataset: layout, posterior means, statistics, identity, restarts, both VAE kinds."""

import filecmp
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msldm_jax import checkpointing
from msldm_jax import config_loading
from msldm_jax import joint_latent
from msldm_jax import stems
from msldm_jax import workdir_layout
from msldm_jax.data import input_iterator
from msldm_jax.data import pipeline
from msldm_jax.data import synthetic
from msldm_jax.latents import encode
from msldm_jax.latents import store
from msldm_jax.models import loading
from msldm_jax.models import source_vae
from msldm_jax.training import train_vae

NUM_TRAIN_TRACKS = 4
TRACK_SECONDS = 1.5  # 33075 samples: three 10232-sample chunks per track, tail dropped


def make_config(tfds_dir, **ldm):
  config = config_loading.load_config("configs/demo.py:variant=tiny")
  config.data.tfds_dir = str(tfds_dir)
  for key, value in ldm.items():
    config.ldm[key] = value
  return config


def write_vae_checkpoint(config, directory, seed=0):
  """A VAE stage checkpoint with random generator parameters, without compiling an init.

  The generator's leaves are drawn in numpy over `source_vae.abstract_params`' shapes (Snake
  alphas 1, weight-norm gains 0.3, so latents come out at about the scale of real ones); the
  discriminator and optimizer states are zeros of their abstract shapes. Returns the
  generator params.
  """
  spec = train_vae.make_train_spec(config.vae)
  window = pipeline.vae_window_spec(config.data, train=True).window
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "alpha" in name:
      return np.ones(leaf.shape, leaf.dtype)
    if "weight_g" in name:
      return np.full(leaf.shape, 0.3, leaf.dtype)
    scale = 0.01 if "bias" in name else 1.0
    return (scale * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

  zeros = lambda tree: jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), tree)
  generator = jax.tree_util.tree_map_with_path(
      draw, source_vae.abstract_params(spec.vae, samples=window))
  discriminator = jax.eval_shape(spec.discriminator.init, jax.random.key(0),
                                 jax.ShapeDtypeStruct((1, window), jnp.float32))
  state = train_vae.VAETrainState(
      step=np.zeros((), np.int32), generator=generator, discriminator=zeros(discriminator),
      generator_opt=zeros(jax.eval_shape(spec.generator_tx.init, generator)),
      discriminator_opt=zeros(jax.eval_shape(spec.discriminator_tx.init, discriminator)))
  manager = checkpointing.make_manager(str(directory))
  checkpointing.save(manager, 0, state, {"epoch": 0, "batch_in_epoch": 0},
                     loading.vae_record(spec.vae))
  manager.wait_until_finished()
  return generator


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  synthetic.write_dataset(str(path), {
      "train": synthetic.sine_tracks(NUM_TRAIN_TRACKS, TRACK_SECONDS),
      "validation": synthetic.sine_tracks(1, 1.0, seed=1, prefix="Val")}, name="minislakh")
  return path


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, tfds_dir):
  """One straight encoding on all 8 devices: (config, workdir, VAE params, store dir)."""
  workdir = str(tmp_path_factory.mktemp("work"))
  config = make_config(tfds_dir)
  params = write_vae_checkpoint(config, os.path.join(workdir, "vae", "checkpoints"))
  directory = encode.run(config, workdir)
  return config, workdir, params, directory


def _chunk_audio(config, workdir, split):
  """The diffusion view's evaluation chunks [n, stems, samples], in its order."""
  ds = pipeline.diffusion_chunks(workdir_layout.dataset_dir(config, workdir), split,
                                 data_config=config.data, batch_size=8, train=False)
  return np.concatenate([b[pipeline.AUDIO][b[pipeline.VALID]] for b in ds.as_numpy_iterator()])


def _assert_stem_major_posterior_means(config, params, audio, latents):
  """Row i, stem s of the store = the posterior mean of stem s of chunk i, encoded alone."""
  vae = source_vae.SourceVAE.from_config(config.vae.model)
  encode_stem = jax.jit(lambda p, x, s: vae.apply(p, x, s, method=vae.encode_stem)[0])
  joint = joint_latent.stack_sources(latents)
  latent_dim = config.vae.model.latent_dim
  for s in range(stems.NUM_STEMS):
    alone = encode_stem(params, audio[:, s], np.full((len(audio),), s, np.int32))
    # Encoded alone (one stem per row) vs all stems at once: the same maths, other sums.
    np.testing.assert_allclose(latents[:, s], alone, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(joint[:, s * latent_dim:(s + 1) * latent_dim], latents[:, s])


def test_layout_shapes_and_posterior_means(encoded):
  config, workdir, params, directory = encoded
  manifest = store.load_manifest(directory)
  latent_dim, frames = config.vae.model.latent_dim, 32
  assert manifest["shape"] == [stems.NUM_STEMS, latent_dim, frames]
  assert manifest["splits"]["train"]["num_chunks"] == 3 * NUM_TRAIN_TRACKS
  assert manifest["splits"]["validation"]["num_chunks"] == 2
  train = store.LatentStore(directory, "train")
  # Every chunk of every track once, each track's in time order (tracks in stored order).
  assert sorted(train.chunk_ids) == [(f"Track{t:05d}", c) for t in range(NUM_TRAIN_TRACKS)
                                     for c in range(3)]
  assert [c for _, c in train.chunk_ids] == [0, 1, 2] * NUM_TRAIN_TRACKS
  latents = train.read_all()
  assert latents.shape == (3 * NUM_TRAIN_TRACKS, stems.NUM_STEMS, latent_dim, frames)
  assert latents.dtype == np.float32
  # The stored rows follow the diffusion view's order, and the ids name their audio.
  audio = _chunk_audio(config, workdir, "train")
  tracks = {t.track_id: t.audio for t in synthetic.sine_tracks(NUM_TRAIN_TRACKS, TRACK_SECONDS)}
  chunk = config.data.chunks.samples
  np.testing.assert_array_equal(
      audio, np.stack([tracks[t][:, c * chunk:(c + 1) * chunk] for t, c in train.chunk_ids]))
  _assert_stem_major_posterior_means(config, params, audio, latents)


def test_statistics_equal_numpy(encoded):
  directory = encoded[3]
  manifest = store.load_manifest(directory)
  joint = joint_latent.stack_sources(store.LatentStore(directory, "train").read_all())
  values = np.asarray(joint, np.float64)
  stats = manifest["statistics"]
  assert stats["split"] == "train"
  assert stats["values_per_channel"] == values.shape[0] * values.shape[2]
  np.testing.assert_allclose(stats["mean"], values.mean(axis=(0, 2)), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(stats["std"], values.std(axis=(0, 2)), rtol=1e-10, atol=1e-12)
  assert len(stats["mean"]) == stems.NUM_STEMS * manifest["shape"][1]


def test_manifest_records_the_vae_and_the_dataset(encoded):
  config, workdir, params, directory = encoded
  manifest = store.load_manifest(directory)
  assert manifest["vae"]["checkpoint_dir"] == os.path.join(os.path.abspath(workdir), "vae",
                                                           "checkpoints")
  assert manifest["vae"]["step"] == 0
  assert manifest["vae"]["params_sha256"] == loading.params_sha256(params)
  settings = manifest["settings"]
  assert settings["dataset_dir"] == workdir_layout.dataset_dir(config, workdir)
  assert settings["chunk_samples"] == config.data.chunks.samples
  assert settings["latent_dim"] == config.vae.model.latent_dim and settings["frames"] == 32


def test_rerun_is_a_no_op_and_another_vae_is_an_error(encoded, tmp_path):
  config, workdir, _, directory = encoded
  before = {p: os.stat(os.path.join(directory, p)).st_mtime_ns
            for p in (store.MANIFEST, store.shard_file("train", 0))}

  def fail(split, index):
    raise AssertionError(f"re-run wrote shard {index} of {split}")

  assert encode.run(config, workdir, on_shard=fail) == directory
  assert before == {p: os.stat(os.path.join(directory, p)).st_mtime_ns for p in before}

  other = make_config(config.data.tfds_dir, vae_checkpoint=str(tmp_path / "other_vae"))
  write_vae_checkpoint(other, tmp_path / "other_vae", seed=1)
  with pytest.raises(ValueError, match="must not mix"):
    encode.run(other, workdir)


def _store_files(directory):
  files = []
  for root, _, names in os.walk(directory):
    files += [os.path.relpath(os.path.join(root, n), directory) for n in names]
  return sorted(files)


class _Killed(Exception):
  pass


def test_killed_encoding_resumes_to_the_same_files(encoded, tmp_path):
  config, workdir, _, straight = encoded
  # Batch 8 on the 8 devices: train's 12 chunks make shards of 8 and 4.
  resumed = make_config(config.data.tfds_dir, latents_dir=str(tmp_path / "resumed"))
  written = []

  def kill_at(split_and_index):
    def hook(split, index):
      written.append((split, index))
      if (split, index) == split_and_index:
        raise _Killed()
    return hook

  with pytest.raises(_Killed):
    encode.run(resumed, workdir, on_shard=kill_at(("train", 0)))
  # What a kill in the middle of the next shard's write leaves behind.
  with open(tmp_path / "resumed" / "train" / "shard-00001.npy.tmp-1", "wb") as f:
    f.write(b"partial")
  assert store.read_manifest(str(tmp_path / "resumed"))["status"] == store.STATUS_ENCODING
  encode.run(resumed, workdir, on_shard=kill_at(None))
  # Each shard was written once: the kill came after shard 0's write, which was kept.
  assert written == [("train", 0), ("train", 1), ("validation", 0)]

  resumed = str(tmp_path / "resumed")
  assert _store_files(straight) == _store_files(resumed)
  for name in _store_files(straight):
    assert filecmp.cmp(os.path.join(straight, name), os.path.join(resumed, name),
                       shallow=False), name


@pytest.mark.slow
def test_per_source_vae(encoded, tmp_path):
  config, workdir, _, _ = encoded
  per_source = make_config(config.data.tfds_dir, vae_checkpoint=str(tmp_path / "vae"),
                           latents_dir=str(tmp_path / "latents"))
  per_source.vae.model.per_source = True
  params = write_vae_checkpoint(per_source, tmp_path / "vae", seed=2)
  assert jax.tree.leaves(params)[0].shape[0] == stems.NUM_STEMS  # one parameter group per stem
  directory = encode.run(per_source, workdir)
  latents = store.LatentStore(directory, "train").read_all()
  audio = _chunk_audio(per_source, workdir, "train")
  _assert_stem_major_posterior_means(per_source, params, audio, latents)


def test_reader_batches_are_seeded_and_resumable(encoded):
  directory = encoded[3]
  all_latents = store.LatentStore(directory, "train").read_all()

  def epoch(e, seed=0, **kwargs):
    ds = store.latent_batches(directory, "train", batch_size=4, train=True, seed=seed,
                              epoch=e, **kwargs)
    return [b[store.LATENTS] for b in ds.as_numpy_iterator()]

  first = epoch(0)
  assert len(first) == 3 and first[0].shape == (4,) + all_latents.shape[1:]
  order = store.epoch_order(len(all_latents), 0, 0)
  np.testing.assert_array_equal(np.concatenate(first), all_latents[order])
  assert all(np.array_equal(x, y) for x, y in zip(first, epoch(0)))
  assert not np.array_equal(np.concatenate(first), np.concatenate(epoch(1)))
  # Two processes take the two halves of every global batch.
  halves = [epoch(0, process_index=i, process_count=2) for i in range(2)]
  for full, a, b in zip(first, *halves):
    np.testing.assert_array_equal(full, np.concatenate([a, b]))
  # InputIterator resumes mid-epoch and across epochs.
  dataset_fn = lambda epoch: store.latent_batches(directory, "train", batch_size=4,
                                                  train=True, seed=0, epoch=epoch)
  straight = input_iterator.InputIterator(dataset_fn)
  batches = [next(straight)[store.LATENTS] for _ in range(5)]
  resumed = input_iterator.InputIterator(dataset_fn, position={"epoch": 0, "batch_in_epoch": 2})
  for expected in batches[2:]:
    np.testing.assert_array_equal(next(resumed)[store.LATENTS], expected)
  # Evaluation: stored order, padded, with a mask.
  evaluation = list(store.latent_batches(directory, "train", batch_size=5,
                                         train=False).as_numpy_iterator())
  valid = np.concatenate([b[store.VALID] for b in evaluation])
  rows = np.concatenate([b[store.LATENTS] for b in evaluation])
  assert valid.sum() == len(all_latents) and not valid[len(all_latents):].any()
  np.testing.assert_array_equal(rows[valid], all_latents)
