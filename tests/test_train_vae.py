"""The SourceVAE trainer: sharding invariance, exact resume, non-finite guard, learning."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msldm_jax import checkpointing
from msldm_jax import config_loading
from msldm_jax import stems as stems_lib
from msldm_jax.data import pipeline
from msldm_jax.losses import vae_losses
from msldm_jax.parallel import mesh as mesh_lib
from msldm_jax.training import loop
from msldm_jax.training import train_vae


def _config(repo_root, tfds_dir, **train):
  config = config_loading.load_config(os.path.join(repo_root, "configs", "demo.py") +
                                      ":variant=tiny")
  config.data.tfds_dir = str(tfds_dir)
  for key, value in train.items():
    config.vae.train[key] = value
  return config


@pytest.fixture(scope="module")
def tfds_dir(mini_dataset):
  """The mini dataset itself (conftest's, shared by the session): read, never written."""
  return mini_dataset.tfds_dir


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  window = pipeline.vae_window_spec(config.data, train=True).window
  return {pipeline.AUDIO: (0.3 * rng.standard_normal((8, window))).astype(np.float32),
          pipeline.STEM: rng.integers(0, 4, 8).astype(np.int32)}


def _params_close(a, b, rtol, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_sharded_step_equals_single_device_step(repo_root, tmp_path, tfds_dir):
  config = _config(repo_root, tfds_dir)
  batch = _batch(config)
  results = []
  for devices in (jax.devices(), jax.devices()[:1]):
    trainer = train_vae.VAETrainer(config, str(tmp_path), mesh=mesh_lib.make_mesh(devices))
    state, metrics = trainer.compiled.step(trainer.initial_state(),
                                  mesh_lib.to_global_batch(batch, trainer.mesh))
    results.append((jax.device_get(state), jax.device_get(metrics)))
  reference_state, reference_metrics = results[0]
  for state, metrics in results[1:]:
    for name in reference_metrics:
      np.testing.assert_allclose(metrics[name], reference_metrics[name], rtol=1e-4, atol=1e-6,
                                 err_msg=name)
    # Adam's first step is about lr·sign(g): where g is ~0, a summation-order difference
    # between 8 shards and one can flip the sign and move that parameter by up to 2·lr. So:
    # every parameter within that bound, and all but a handful equal to float32 rounding.
    lr = config.vae.optimizer.learning_rate
    for tree, reference in ((state.generator, reference_state.generator),
                            (state.discriminator, reference_state.discriminator)):
      diffs = np.concatenate([np.abs(np.asarray(x) - np.asarray(y)).ravel() for x, y in
                              zip(jax.tree.leaves(tree), jax.tree.leaves(reference))])
      assert diffs.max() <= 2.5 * lr
      assert np.mean(diffs > 1e-5) < 1e-3


def test_resume_continues_the_same_run(repo_root, tmp_path, tfds_dir):
  straight = _config(repo_root, tfds_dir, num_steps=4, checkpoint_every=2, eval_every=100)
  straight_metrics = train_vae.run(straight, str(tmp_path / "straight"))

  first_half = _config(repo_root, tfds_dir, num_steps=2, checkpoint_every=2, eval_every=100)
  train_vae.run(first_half, str(tmp_path / "resumed"))
  resumed_metrics = train_vae.run(straight, str(tmp_path / "resumed"))

  for name, value in straight_metrics.items():
    if name.startswith("loss/"):
      np.testing.assert_allclose(resumed_metrics[name], value, rtol=1e-5, err_msg=name)
  states = []
  for run in ("straight", "resumed"):
    trainer = train_vae.VAETrainer(straight, str(tmp_path / run))
    manager = checkpointing.make_manager(os.path.join(trainer.stage_dir, "checkpoints"))
    state, position, step = checkpointing.restore_latest(manager, trainer.compiled.abstract_state)
    states.append((state, position))
    assert step == 4
  assert states[0][1] == states[1][1]
  _params_close(states[0][0].generator, states[1][0].generator, rtol=1e-6, atol=1e-7)


def test_a_trainer_of_the_same_settings_reuses_the_compiled_programs(repo_root, tmp_path,
                                                                     tfds_dir):
  """A second trainer (the resumed half of a run, a notebook cell run again) shares the first
  one's jitted programs when nothing they read differs: the loop's settings and the workdir
  may; a loss weight or the mesh may not."""
  first = train_vae.VAETrainer(_config(repo_root, tfds_dir, num_steps=4), str(tmp_path / "a"))
  again = train_vae.VAETrainer(_config(repo_root, tfds_dir, num_steps=9, checkpoint_every=3),
                               str(tmp_path / "b"))
  assert again.compiled is first.compiled and again.spec is first.spec
  assert again._eval_step is first._eval_step  # pylint: disable=protected-access
  weighed = _config(repo_root, tfds_dir)
  weighed.vae.loss_weights.mel = 2.0
  assert train_vae.VAETrainer(weighed, str(tmp_path / "a")).compiled is not first.compiled
  one_device = train_vae.VAETrainer(_config(repo_root, tfds_dir), str(tmp_path / "a"),
                                    mesh=mesh_lib.make_mesh(jax.devices()[:1]))
  assert one_device.compiled is not first.compiled


class _PoisonedTrainer(train_vae.VAETrainer):
  """A trainer whose input batch number `poisoned_batch` (counted from this run's start)
  carries a NaN sample; the rest of the trainer is the real one."""

  def __init__(self, *args, poisoned_batch, **kwargs):
    super().__init__(*args, **kwargs)
    self.poisoned_batch = poisoned_batch

  def train_inputs(self, position=None):
    inputs, trainer = super().train_inputs(position), self

    class Poisoned:

      def __init__(self):
        self.count = 0

      def __next__(self):
        batch = next(inputs)
        self.count += 1
        if self.count == trainer.poisoned_batch:
          audio = np.asarray(batch[pipeline.AUDIO]).copy()
          audio[0, 0] = np.nan
          batch = dict(batch, **{
              pipeline.AUDIO: mesh_lib.to_global_batch(audio, trainer.mesh)})
        return batch

      def state(self):
        return inputs.state()

    return Poisoned()


def test_non_finite_loss_stops_and_keeps_last_checkpoint(repo_root, tmp_path, tfds_dir):
  config = _config(repo_root, tfds_dir, num_steps=6, checkpoint_every=2, eval_every=100)
  trainer = _PoisonedTrainer(config, str(tmp_path), poisoned_batch=3)
  with pytest.raises(FloatingPointError, match="step 3"):
    trainer.train()
  manager = checkpointing.make_manager(os.path.join(trainer.stage_dir, "checkpoints"))
  assert manager.latest_step() == 2
  state, _, _ = checkpointing.restore_latest(manager, trainer.compiled.abstract_state)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.generator))


def test_short_run_on_the_mini_dataset_learns(repo_root, tmp_path, tfds_dir):
  config = _config(repo_root, tfds_dir, num_steps=30, log_every=1, checkpoint_every=30,
                   eval_every=30)
  trainer = train_vae.VAETrainer(config, str(tmp_path))
  final = trainer.train()
  # One line per step (log_every=1) in the metrics file both trainers write.
  history = [r["loss/mel"] for r in loop.read_metrics(trainer.stage_dir) if "loss/mel" in r]
  assert len(history) == 30
  assert np.mean(history[-5:]) < 0.9 * np.mean(history[:5]), history
  assert np.isfinite(final["eval/si_sdr"]) and np.isfinite(final["eval/mel_distance"])
  # The level change per stem beside them (dB; a decoder 30 steps old plays quiet, not mute).
  levels = [final[f"eval/level_change_db/{name}"] for name in trainer.sources]
  assert all(-60.0 < level < 20.0 for level in levels), levels
  assert os.path.isfile(os.path.join(trainer.stage_dir, "losses.png"))


def test_reconstruction_warmup_then_the_gan_steps(repo_root, tmp_path, tfds_dir):
  """vae.adversarial_start=2: steps 1-2 train the generator on mel + KL alone (the
  discriminator neither runs nor changes), steps 3-4 are the reference's GAN steps."""
  config = _config(repo_root, tfds_dir, num_steps=4, log_every=1, checkpoint_every=2,
                   eval_every=100)
  config.vae.adversarial_start = 2
  trainer = train_vae.VAETrainer(config, str(tmp_path))
  initial = jax.device_get(trainer.initial_state())
  trainer.train()
  records = {r["step"]: r for r in loop.read_metrics(trainer.stage_dir) if "loss/mel" in r}
  for step in (1, 2):
    assert records[step]["loss/discriminator"] == 0.0
    assert records[step]["loss/adversarial"] == 0.0
    assert records[step]["loss/mel"] > 0.0
  for step in (3, 4):
    assert records[step]["loss/discriminator"] > 0.0
    assert records[step]["loss/adversarial"] > 0.0
  abstract = trainer.compiled.abstract_state
  states = {step: checkpointing.restore_subtree(
      os.path.join(trainer.stage_dir, "checkpoints"), step,
      {"generator": abstract.generator, "discriminator": abstract.discriminator})
            for step in (2, 4)}
  _params_close(states[2]["discriminator"], initial.discriminator, rtol=0, atol=0)
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(states[2]["generator"]), jax.tree.leaves(initial.generator)))
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(states[4]["discriminator"]), jax.tree.leaves(initial.discriminator)))
  config.vae.adversarial_start = -1
  with pytest.raises(ValueError, match="vae.adversarial_start=-1"):
    train_vae.VAETrainer(config, str(tmp_path / "bad"))


def _per_source_config(repo_root, tfds_dir):
  """A per-source VAE on one-stem batches, the drums' mel magnitude weighed apart: one
  config for the tests of both, so that the persistent compilation cache serves the second
  of them its GAN step (about 14 s of XLA at the tests' settings)."""
  config = _config(repo_root, tfds_dir)
  config.vae.model.per_source = True
  config.vae.loss_weights.mel_magnitude = 0.0
  config.vae.loss_weights_by_stem = dict(drums=dict(mel_magnitude=300.0))
  return config


def test_per_source_stem_batches_train_only_their_stem_at_one_group_cost(repo_root,
                                                                           tmp_path,
                                                                           tfds_dir):
  """A per-source VAE on one-stem batches: the gradient equals the every-group path's (each
  window through its own stem's parameters), lands in that stem's parameters only, and the
  trainer feeds such batches."""
  config = _per_source_config(repo_root, tfds_dir)
  trainer = train_vae.VAETrainer(config, str(tmp_path))
  assert trainer.spec.stem_batches
  state = jax.device_get(trainer.initial_state())
  batch = _batch(config)
  batch[pipeline.STEM] = np.full(8, 2, np.int32)  # guitar
  x, stem = batch[pipeline.AUDIO], batch[pipeline.STEM]
  vae = trainer.spec.vae
  rng = jax.random.key(3)

  def loss(params, one_stem):
    recon, mean, _ = train_vae.reconstruct_stem(vae, params, x, stem, rng, one_stem=one_stem)
    return jnp.mean(jnp.abs(recon - x)) + jnp.mean(mean**2)

  fast = jax.jit(jax.grad(loss), static_argnums=1)(state.generator, True)
  every_group = jax.jit(jax.grad(loss), static_argnums=1)(state.generator, False)
  _params_close(fast, every_group, rtol=1e-4, atol=1e-7)
  for leaf in jax.tree.leaves(fast):
    leaf = np.asarray(leaf)
    assert leaf.shape[0] == 4
    assert not np.any(leaf[[0, 1, 3]])
  assert any(np.any(np.asarray(leaf)[2]) for leaf in jax.tree.leaves(fast))
  inputs = trainer.train_inputs()
  stems_seen = [int(np.asarray(next(inputs)[pipeline.STEM])[0]) for _ in range(4)]
  assert stems_seen == [0, 1, 2, 3]
  # A step on bass, then one on guitar: the guitar step leaves every other stem's parameters
  # and AdamW moments as the bass step left them (no weight decay, no leftover momentum).
  bass = dict(batch, **{pipeline.STEM: np.zeros(8, np.int32)})
  on_device, _ = trainer.compiled.step(trainer.initial_state(),
                                       mesh_lib.to_global_batch(bass, trainer.mesh))
  after_bass = jax.device_get(on_device)  # the next step donates its input
  after_guitar, _ = trainer.compiled.step(on_device,
                                          mesh_lib.to_global_batch(batch, trainer.mesh))
  after_guitar = jax.device_get(after_guitar)
  for name in ("generator", "generator_opt"):
    moved = [np.asarray(a) for a in jax.tree.leaves(getattr(after_bass, name))]
    again = [np.asarray(a) for a in jax.tree.leaves(getattr(after_guitar, name))]
    for a, b in zip(moved, again):
      if a.ndim:
        np.testing.assert_array_equal(a[[0, 1, 3]], b[[0, 1, 3]], err_msg=name)
    assert any(a.ndim and np.any(a[2] != b[2]) for a, b in zip(moved, again)), name
  initial = jax.device_get(trainer.initial_state())
  assert any(np.any(np.asarray(a)[0] != np.asarray(b)[0]) for a, b in zip(
      jax.tree.leaves(initial.generator), jax.tree.leaves(after_bass.generator)))


def test_loss_weights_by_stem_weigh_each_one_stem_batch_by_its_stem(repo_root, tmp_path,
                                                                     tfds_dir):
  """`vae.loss_weights_by_stem`: a drums batch's generator loss uses the drums' mel magnitude
  weight, a guitar batch's the common one; a config that cannot honour it is refused."""
  config = _per_source_config(repo_root, tfds_dir)
  trainer = train_vae.VAETrainer(config, str(tmp_path))
  state = trainer.initial_state()
  for stem, magnitude_weight in (("drums", 300.0), ("guitar", 0.0)):
    batch = _batch(config)
    batch[pipeline.STEM] = np.full(8, stems_lib.STEM_NAMES.index(stem), np.int32)
    # The step donates its input state: the next batch steps from the returned one.
    state, metrics = trainer.compiled.step(state,
                                           mesh_lib.to_global_batch(batch, trainer.mesh))
    metrics = jax.device_get(metrics)
    weights = dict(config.vae.loss_weights, mel_magnitude=magnitude_weight)
    expected = sum(weights[name] * float(metrics[f"loss/{name}"])
                   for name in vae_losses.LOSS_TERMS)
    assert float(metrics["loss/mel_magnitude"]) > 0
    np.testing.assert_allclose(float(metrics["loss/generator"]), expected, rtol=1e-5)
  config.vae.model.per_source = False
  with pytest.raises(ValueError, match="vae.loss_weights_by_stem .drums. .*one-stem batches"):
    train_vae.VAETrainer(config, str(tmp_path / "shared"))
  config.vae.model.per_source = True
  config.vae.loss_weights_by_stem = dict(drum=dict(mel_magnitude=1.0))
  with pytest.raises(ValueError, match=r"vae.loss_weights_by_stem.drum: unknown stem"):
    train_vae.VAETrainer(config, str(tmp_path / "typo"))
  config.vae.loss_weights_by_stem = dict(drums=dict(mel_magnitud=1.0))
  with pytest.raises(ValueError, match=r"vae.loss_weights_by_stem.drums.mel_magnitud: unknown"):
    train_vae.VAETrainer(config, str(tmp_path / "typo2"))
