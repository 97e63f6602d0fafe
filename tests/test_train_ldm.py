"""The latent diffusion trainer: sharding invariance, exact resume, non-finite guard, learning.

Most tests train on a synthetic latent store (`store.write_latents`), so no VAE runs; the last
one goes through the whole chain (VAE checkpoint, `--mode=encode_latents`, `--mode=train_ldm`
with a periodic sample, `load_denoiser`) through `main.run`.

Most trainers here compile the same step program; the persistent compilation cache that
conftest.py turns on makes each distinct program compile once.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from msldm_jax import checkpointing
from msldm_jax import config_loading
from msldm_jax import main
from msldm_jax import stems
from msldm_jax import workdir_layout
from msldm_jax.data import synthetic
from msldm_jax.diffusion import edm
from msldm_jax.latents import store
from msldm_jax.models import loading
from msldm_jax.parallel import mesh as mesh_lib
from msldm_jax.training import loop
from msldm_jax.training import train_ldm

# Shared with the latent dataset's tests: a VAE checkpoint without compiling an init (pytest
# puts this folder on sys.path).
import test_latents  # pylint: disable=g-bad-import-order

LATENT_DIM, FRAMES = 8, 32  # the tiny VAE's latents of a tiny chunk (10232 samples)


def synthetic_latents(num_chunks, seed=0):
  """Smooth latents [n, stems, D, T] at the reference's scale: a few sinusoids per channel."""
  rng = np.random.default_rng(seed)
  t = np.arange(FRAMES) / FRAMES
  shape = (num_chunks, stems.NUM_STEMS, LATENT_DIM, 1)
  latents = np.zeros(shape[:-1] + (FRAMES,))
  for harmonic in (1, 2, 3):
    amplitude = rng.normal(0.0, 0.5 / harmonic, shape)
    phase = rng.uniform(0, 2 * np.pi, shape)
    latents += amplitude * np.sin(2 * np.pi * harmonic * t + phase)
  return latents.astype(np.float32)


def make_config(tmp_path, num_chunks=16, **train):
  config = config_loading.load_config("configs/demo.py:variant=tiny")
  config.ldm.latents_dir = str(tmp_path / "latents")
  config.ldm.train.sample_every = 0
  config.ldm.train.log_every = 1
  for key, value in train.items():
    config.ldm.train[key] = value
  if store.read_manifest(config.ldm.latents_dir) is None:
    store.write_latents(
        config.ldm.latents_dir, {"train": synthetic_latents(num_chunks)},
        vae_identity={"checkpoint_dir": "synthetic", "step": 0, "params_sha256": "0" * 64},
        settings={}, chunks_per_shard=8)
  return config


def _batch(seed=0):
  return {store.LATENTS: synthetic_latents(8, seed=seed)}


def _assert_trees_close(a, b, **tolerance):
  a_leaves, b_leaves = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(a_leaves) == len(b_leaves)
  for x, y in zip(a_leaves, b_leaves):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tolerance)


def test_sigma_buckets_cover_every_sigma():
  edges = train_ldm.SIGMA_BUCKET_EDGES
  assert len(edges) == 7 and edges[0] == pytest.approx(0.01) and edges[-1] == pytest.approx(3.0)
  sigma = jnp.array([1e-4, 0.011, 0.03, 0.1, 0.2, 0.5, 1.2, 2.9, 80.0])
  np.testing.assert_array_equal(train_ldm.sigma_buckets(sigma), [0, 0, 1, 2, 3, 4, 5, 5, 5])
  assert train_ldm.SIGMA_BUCKET_NAMES[0] == "loss/sigma_bucket_0_0.01-0.0259"


@pytest.mark.parametrize("denoiser", ["dit", "unet"])
def test_sharded_step_equals_single_device_step_and_fsdp(tmp_path, denoiser):
  """Either denoiser (the DiT, the release's U-Net) through the same trainer."""
  config = make_config(tmp_path)
  config.ldm.denoiser = denoiser
  reference = train_ldm.LDMTrainer(config, str(tmp_path))
  initial = jax.device_get(reference.initial_state())
  batch = _batch()
  results = []
  for devices, strategy in ((jax.devices(), "replicate"), (jax.devices()[:1], "replicate"),
                            (jax.devices(), "fsdp")):
    config.ldm.sharding = strategy
    trainer = train_ldm.LDMTrainer(config, str(tmp_path), mesh=mesh_lib.make_mesh(devices))
    if strategy == "fsdp":
      specs = {s.spec for s in jax.tree.leaves(trainer.compiled.state_shardings.params)}
      assert jax.sharding.PartitionSpec() in specs and len(specs) > 1  # some leaves split
    state, metrics = trainer.compiled.step(
        jax.device_put(initial, trainer.compiled.state_shardings), batch)
    results.append((jax.device_get(state), jax.device_get(metrics)))
  (state_8, metrics_8), others = results[0], results[1:]
  # Adam's first update is lr·g/(|g| + ε): ±lr wherever |g| ≫ ε = 1e-8, but where |g| is
  # within a few ε of zero, the ~1e-10 summation-order noise of a split batch moves it by a
  # visible fraction of lr. Of the U-Net's ~300 k first-step gradients a few are that small
  # (one of 3072 entries of a conv weight off by 1.3e-5 at lr 2e-4); the loss and gradient
  # norm above stay equal to 1e-5 all the same.
  learning_rate = float(metrics_8["learning_rate"])
  atol = 1e-6 if denoiser == "dit" else 0.25 * learning_rate
  for state, metrics in others:
    for name in metrics_8:
      np.testing.assert_allclose(metrics[name], metrics_8[name], rtol=1e-5, atol=1e-6,
                                 err_msg=name)
    _assert_trees_close(state.params, state_8.params, rtol=1e-5, atol=atol)
    _assert_trees_close(state.ema_params, state_8.ema_params, rtol=1e-5, atol=atol)
  # The step moved the parameters, and the EMA followed them by (1 - decay).
  assert int(state_8.step) == 1
  decay = config.ldm.ema_decay
  expected_ema = jax.tree.map(lambda p0, p1: decay * p0 + (1 - decay) * p1, initial.params,
                              state_8.params)
  _assert_trees_close(state_8.ema_params, expected_ema, rtol=1e-6, atol=1e-7)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(initial.params),
                                                      jax.tree.leaves(state_8.params)))
  assert metrics_8["sigma_bucket_count"].sum() == 8
  assert float(metrics_8["learning_rate"]) == pytest.approx(
      config.ldm.optimizer.learning_rate / config.ldm.optimizer.warmup_steps)


class _Interrupted(Exception):
  pass


class _HookedTrainer(train_ldm.LDMTrainer):
  """A trainer whose input batch number k (1-based, counted from this run's start) goes
  through `hook(k, batch)` first: to inject bad values or to simulate a kill."""

  def __init__(self, *args, hook, **kwargs):
    super().__init__(*args, **kwargs)
    self._hook = hook

  def train_inputs(self, position=None):
    inputs = super().train_inputs(position)
    hook = self._hook

    class Hooked:
      count = 0

      def __next__(self):
        Hooked.count += 1
        return hook(Hooked.count, next(inputs))

      def state(self):
        return inputs.state()

    return Hooked()


def _losses(workdir):
  with open(os.path.join(workdir, "ldm", workdir_layout.METRICS_FILE)) as f:
    return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def test_resume_continues_the_same_run(tmp_path):
  config = make_config(tmp_path, num_steps=8, checkpoint_every=4)
  straight = str(tmp_path / "straight")
  train_ldm.run(config, straight)

  resumed = str(tmp_path / "resumed")

  def kill_at_7(count, batch):
    if count == 7:  # after step 6: checkpoint 4 is the last, steps 5 and 6 are logged
      raise _Interrupted()
    return batch

  with pytest.raises(_Interrupted):
    _HookedTrainer(config, resumed, hook=kill_at_7).train()
  assert [s for s, _ in _losses(resumed)] == [1, 2, 3, 4, 5]
  train_ldm.run(config, resumed)

  assert _losses(resumed) == _losses(straight)
  assert [s for s, _ in _losses(straight)] == list(range(1, 9))
  for use_ema in (False, True):
    a = loading.load_denoiser(straight, use_ema=use_ema)
    b = loading.load_denoiser(resumed, use_ema=use_ema)
    assert a.identity["step"] == 8 and a.identity["use_ema"] == use_ema
    _assert_trees_close(a.params, b.params, rtol=0, atol=0)
    assert a.identity["params_sha256"] == b.identity["params_sha256"]
  assert os.path.exists(os.path.join(straight, "ldm", train_ldm.LOSS_PLOT))


def test_a_trainer_of_the_same_settings_reuses_the_compiled_programs(tmp_path):
  """The loop's settings, the workdir and the store's path may differ; the network may not."""
  first = train_ldm.LDMTrainer(make_config(tmp_path / "a", num_steps=4), str(tmp_path / "a"))
  again = train_ldm.LDMTrainer(make_config(tmp_path / "b", num_steps=8), str(tmp_path / "b"))
  assert again.compiled is first.compiled and again.spec is first.spec
  wider = make_config(tmp_path / "a")
  wider.ldm.model.width = 2 * int(wider.ldm.model.width)
  assert train_ldm.LDMTrainer(wider, str(tmp_path / "a")).compiled is not first.compiled


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_time_budget_stops_at_a_log_step_with_a_checkpoint(tmp_path, clock):
  config = make_config(tmp_path, num_steps=1000, checkpoint_every=500, log_every=3,
                       max_seconds=1e-9, budget_clock=clock)
  workdir = str(tmp_path / "run")
  train_ldm.run(config, workdir)
  # The clock starts after step 1 (compilation); step 3 is the first log step past it.
  assert [s for s, _ in _losses(workdir)] == [3]
  assert loading.load_denoiser(workdir).identity["step"] == 3
  # The budget spans restarts: run again, the spent budget trains nothing more.
  train_ldm.run(config, workdir)
  assert [s for s, _ in _losses(workdir)] == [3]
  assert loading.load_denoiser(workdir).identity["step"] == 3
  # A larger budget continues, counting the seconds already spent.
  first = loop.read_metrics(os.path.join(workdir, "ldm"))[0][loop.BUDGET_SECONDS]
  config.ldm.train.max_seconds, config.ldm.train.num_steps = 1e6, 6
  train_ldm.run(config, workdir)
  records = [r for r in loop.read_metrics(os.path.join(workdir, "ldm")) if "loss" in r]
  assert [r["step"] for r in records] == [3, 6]
  assert 0 < first < records[1][loop.BUDGET_SECONDS]
  config.ldm.train.budget_clock = "sundial"
  with pytest.raises(ValueError, match="budget_clock='sundial'"):
    train_ldm.run(config, str(tmp_path / "other"))


def test_budget_spent_reads_or_interpolates_the_log(tmp_path):
  assert loop.budget_spent(str(tmp_path), 10) is None  # no log
  with open(tmp_path / workdir_layout.METRICS_FILE, "w") as f:
    for step, seconds in ((25, 10.0), (50, 20.0), (75, 40.0)):
      f.write(json.dumps({"step": step, loop.BUDGET_SECONDS: seconds}) + "\n")
    f.write(json.dumps({"step": 80, "loss": 1.0}) + "\n")  # a record without the clock
  assert loop.budget_spent(str(tmp_path), 50) == 20.0
  # A checkpoint written when a run was stopped, between two logging steps.
  assert loop.budget_spent(str(tmp_path), 60) == pytest.approx(28.0)
  assert loop.budget_spent(str(tmp_path), 10) is None
  assert loop.budget_spent(str(tmp_path), 80) is None


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
  config = make_config(tmp_path, num_steps=8, checkpoint_every=4)
  workdir = str(tmp_path / "run")

  def nan_at_6(count, batch):
    if count == 6:
      return {store.LATENTS: batch[store.LATENTS] * jnp.nan}
    return batch

  trainer = _HookedTrainer(config, workdir, hook=nan_at_6)
  with pytest.raises(FloatingPointError, match=r"non-finite loss = nan at step 6"):
    trainer.train()
  manager = checkpointing.make_manager(os.path.join(workdir, "ldm", "checkpoints"))
  assert manager.all_steps() == [4]
  state, _, step = checkpointing.restore_latest(manager, trainer.compiled.abstract_state)
  assert step == 4 and int(state.step) == 4
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


@pytest.mark.parametrize("denoiser,system,streams", [
    ("dit", "msldm", 0), ("unet", "msldm", 0), ("dit", "isldm", 0), ("dit", "msldm", 4)])
def test_loss_goes_down_on_a_handful_of_latents(tmp_path, denoiser, system, streams):
  config = make_config(tmp_path, num_chunks=8, num_steps=50, checkpoint_every=50)
  config.ldm.denoiser = denoiser
  config.system = system
  config.ldm.model.stem_streams = streams  # 4: the stem-coupled DiT
  metrics = train_ldm.run(config, str(tmp_path))
  losses = [loss for _, loss in _losses(str(tmp_path))]
  assert len(losses) == 50 and np.isfinite(metrics["loss"])
  # DiT about 1.05 -> 0.86 with the tiny config's seed; each mean is over 80 (σ, noise) draws.
  first, last = np.mean(losses[:10]), np.mean(losses[-10:])
  assert last < 0.9 * first, (first, last)
  # The checkpoint names its network, and the loading layer rebuilds that one.
  loaded = loading.load_denoiser(str(tmp_path))
  network = loaded.module
  if system == "isldm":  # one network per stem of the store
    assert type(network).__name__ == "IndependentStems"
    assert network.num_stems == stems.NUM_STEMS
    network = network.per_stem
  if streams:
    assert type(network).__name__ == "CoupledStemsDiT" and network.stem_streams == streams
  else:
    assert type(network).__name__ == {"dit": "DiT", "unet": "UNet1d"}[denoiser]
  x = jnp.asarray(synthetic_latents(1).reshape(1, -1, FRAMES))
  # Jitted: the U-Net op by op is ~200 small compiles.
  output = jax.jit(loaded.module.apply)(loaded.params, x, jnp.zeros((1,)))
  assert np.isfinite(np.asarray(output)).all()


def test_latent_store_must_fit_the_model(tmp_path):
  config = make_config(tmp_path)
  with pytest.raises(FileNotFoundError, match="encode_latents"):
    config.ldm.latents_dir = str(tmp_path / "missing")
    train_ldm.run(config, str(tmp_path))
  config = make_config(tmp_path)
  config.ldm.model.in_channels = 2 * stems.NUM_STEMS * LATENT_DIM
  with pytest.raises(ValueError, match="ldm.model.in_channels=64"):
    train_ldm.run(config, str(tmp_path))
  config = make_config(tmp_path)
  config.ldm.model.stem_streams = 2
  with pytest.raises(ValueError, match="ldm.model.stem_streams=2, but the latent store"):
    train_ldm.run(config, str(tmp_path))


def _summary_tags(logdir):
  tags = set()
  for name in os.listdir(logdir):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(logdir, name)):
      tags.update(value.tag for value in event.summary.value)
  return tags


@pytest.mark.slow
@pytest.mark.parametrize("streams", [0, 4])
def test_stages_end_to_end_with_samples(tmp_path, streams):
  """VAE checkpoint -> encode_latents -> train_ldm (with a sample) -> load_denoiser ->
  sample, with the latents scaled per source (ldm.latent_scale) on the way; with the DiT on
  the joint latent and with the stem-coupled DiT (`ldm.model.stem_streams`)."""
  tfds_dir = tmp_path / "tfds"
  synthetic.write_dataset(str(tfds_dir), {"train": synthetic.sine_tracks(3, 1.5)},
                          name="minislakh")
  config = test_latents.make_config(tfds_dir)
  config.ldm.train.num_steps = 2
  config.ldm.train.checkpoint_every = 2
  config.ldm.train.log_every = 1
  config.ldm.train.sample_every = 2
  config.ldm.train.sample_steps = 2
  config.ldm.latent_scale = "per_source"
  config.ldm.model.stem_streams = streams
  workdir = str(tmp_path / "work")
  test_latents.write_vae_checkpoint(config, os.path.join(workdir, "vae", "checkpoints"))
  latents_dir = main.run("encode_latents", config, workdir)
  metrics = main.run("train_ldm", config, workdir)
  assert np.isfinite(metrics["loss"])
  tags = _summary_tags(os.path.join(workdir, "ldm", "logs"))
  assert {"loss", "grad_norm", "learning_rate", "steps_per_second", "samples/mix",
          "samples/bass", "samples/piano", "samples/spectrogram"} <= tags
  assert any(tag.startswith("loss/sigma_bucket_") for tag in tags)

  denoiser = loading.load_denoiser(workdir)
  model, params, identity = denoiser.module, denoiser.params, denoiser.identity
  manifest = store.load_manifest(latents_dir)
  assert identity["latents"]["vae"] == manifest["vae"] and identity["step"] == 2
  assert len(loading.latent_scale(denoiser)) == stems.NUM_STEMS
  assert getattr(model, "stem_streams", 0) == streams
  x = jnp.asarray(store.LatentStore(latents_dir, "train").read_all()[:2])
  joint = x.reshape(2, stems.NUM_STEMS * LATENT_DIM, FRAMES)
  # One program, the parameters an argument (not constants folded into it).
  denoised = jax.jit(lambda params, x, sigma: edm.make_denoise_fn(
      model.apply, params, sigma_data=config.ldm.sigma_data)(x, sigma))(params, joint, 0.5)
  assert denoised.shape == joint.shape and np.isfinite(np.asarray(denoised)).all()

  config.sample.num_pieces, config.sample.batch_size, config.sample.num_steps = 1, 1, 2
  samples = main.run("sample", config, workdir)
  with open(os.path.join(samples, "piece_000", "piece.json")) as f:
    record = json.load(f)
  assert record["latent_scale"] == pytest.approx(list(loading.latent_scale(denoiser)))
