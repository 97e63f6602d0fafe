"""Generation: total and partial, output files, determinism, the given stems' handling.

Tiny config, a freshly initialised tiny SourceVAE and a tiny DiT whose parameters are
perturbed away from adaLN-Zero's identity (so the network's output depends on its input);
no checkpoints. Equal `GenerationSpec`s share one compiled program, so the total and the
partial program each compile once for the whole module.
"""

import copy
import json
import os
import subprocess
import sys

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import soundfile as sf

from msldm_jax import checkpointing
from msldm_jax import config_loading
from msldm_jax import joint_latent
from msldm_jax import stems as stems_lib
from msldm_jax import workdir_layout
from msldm_jax.data import audio_files
from msldm_jax.diffusion import edm
from msldm_jax.diffusion import generation_program
from msldm_jax.diffusion import samplers
from msldm_jax.generation import conditions
from msldm_jax.generation import outputs
from msldm_jax.generation import stage
from msldm_jax.models import denoisers
from msldm_jax.models import dit
from msldm_jax.models import loading
from msldm_jax.models import source_vae

SR = stems_lib.SAMPLE_RATE


def _config(**sample_overrides):
  config = config_loading.load_config("configs/demo.py:variant=tiny")
  for key, value in sample_overrides.items():
    config.sample[key] = value  # Existing keys: allowed on a locked config.
  return config


def _denoiser_config(config):
  """The tiny DiT for the tiny VAE's latents (in_channels resolved, as the trainer does)."""
  model_config = config.ldm.model.to_dict()
  model_config["in_channels"] = stems_lib.NUM_STEMS * config.vae.model.latent_dim
  return model_config


@pytest.fixture(scope="module")
def models():
  config = _config()
  vae = source_vae.SourceVAE.from_config(config.vae.model)
  vae_params = source_vae.init_params(vae, jax.random.key(0))
  denoiser = dit.build_model(_denoiser_config(config))
  channels = denoiser.in_channels
  variables = jax.jit(denoiser.init)(jax.random.key(1), jnp.zeros((1, channels, 32)),
                                     jnp.zeros((1,)))
  leaves, treedef = jax.tree.flatten(variables)
  rng = np.random.default_rng(0)
  denoiser_params = jax.tree.unflatten(treedef, [
      leaf + rng.normal(scale=0.05, size=leaf.shape).astype(np.float32) for leaf in leaves])
  return vae, vae_params, denoiser, denoiser_params


@pytest.fixture(scope="module")
def num_samples():
  return int(_config().data.chunks.samples)


def _read(path):
  audio, rate = sf.read(path, dtype="float32")
  assert sf.info(path).subtype == "FLOAT"
  assert rate == SR
  return audio


def _read_piece(directory):
  stems = {name: _read(os.path.join(directory, "stems", f"{name}.wav"))
           for name in stems_lib.STEM_NAMES}
  with open(os.path.join(directory, "piece.json")) as f:
    record = json.load(f)
  return stems, _read(os.path.join(directory, "mix.wav")), record


def _sine(freq, seconds, rate=SR, channels=1, amplitude=0.6):
  t = np.arange(int(seconds * rate)) / rate
  x = (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)
  return np.stack([x, 0.5 * x], axis=1) if channels == 2 else x


@pytest.fixture(scope="module")
def condition_dir(tmp_path_factory, num_samples):
  """Given drums (stereo, 44.1 kHz), guitar (longer than the chunk), piano (shorter)."""
  directory = tmp_path_factory.mktemp("given")
  chunk_seconds = num_samples / SR
  sf.write(directory / "drums.wav", _sine(110, chunk_seconds, 44100, channels=2), 44100,
           subtype="FLOAT")
  sf.write(directory / "guitar.wav", _sine(330, 2 * chunk_seconds), SR, subtype="FLOAT")
  sf.write(directory / "piano.wav", _sine(440, 0.5 * chunk_seconds), SR, subtype="FLOAT")
  return str(directory)


@pytest.fixture(scope="module")
def total_run(models, tmp_path_factory):
  config = _config()
  output = str(tmp_path_factory.mktemp("total"))
  return config, stage.generate_to_dir(config, output, *models,
                                       checkpoints={"vae": {"step": 1}})


@pytest.fixture(scope="module")
def partial_run(models, condition_dir, tmp_path_factory):
  config = _config(condition_dir=condition_dir, generate="bass", pad=True)
  output = str(tmp_path_factory.mktemp("partial"))
  return config, stage.generate_to_dir(config, output, *models)


def test_total_generation_writes_float_stems_mix_spectrogram_and_json(total_run, num_samples):
  config, output = total_run
  for index in range(config.sample.num_pieces):
    directory = outputs.piece_dir(output, index)
    assert os.path.isfile(os.path.join(directory, "spectrogram.png"))
    stems, mix, record = _read_piece(directory)
    for name, audio in stems.items():
      assert audio.shape == (num_samples,), name
      assert np.all(np.isfinite(audio)) and np.max(np.abs(audio)) > 0, name
    # The mix is the plain float32 sum of the stems, never clipped or rescaled.
    np.testing.assert_array_equal(mix, outputs.mixture(stems))
    assert record["mode"] == "total" and record["generated"] == list(stems_lib.STEM_NAMES)
    assert record["given"] == [] and record["seed"] == config.sample.seed
    assert record["piece_index"] == index and record["gain"] == 1.0
    assert record["sampler"]["name"] == "euler_churn"
    assert record["sampler"]["num_steps"] == config.sample.num_steps
    assert record["checkpoints"] == {"vae": {"step": 1}}
    assert record["peak"]["mix"] == pytest.approx(float(np.max(np.abs(mix))))
  # Different pieces of one run differ (each has its own key).
  first, _, _ = _read_piece(outputs.piece_dir(output, 0))
  second, _, _ = _read_piece(outputs.piece_dir(output, 1))
  assert not np.allclose(first["bass"], second["bass"])


def test_partial_generation_keeps_original_given_stems_in_stems_and_mix(
    partial_run, condition_dir, num_samples):
  config, output = partial_run
  stems, mix, record = _read_piece(outputs.piece_dir(output, 0))
  assert record["mode"] == "partial"
  assert record["generated"] == ["bass"] and record["given"] == ["drums", "guitar", "piano"]
  assert record["resample_steps"] == config.sample.resample_steps
  # --pad: every stem as long as the longest given one (guitar, two chunks), which is then
  # generated in windows; the drums' 44.1 kHz and the others' 22.05 kHz share no rate, so
  # the piece is written at the model's.
  assert record["padded"] == ["drums", "piano"] and record["windows"] > 1
  for name in ("drums", "guitar", "piano"):
    # As the data stage reads stems (mono, model rate), then zero-padded.
    original = audio_files.read_mono(os.path.join(condition_dir, f"{name}.wav"), SR)
    np.testing.assert_array_equal(stems[name],
                                  conditions.fit_to_length(original, 2 * num_samples))
  assert record["given_original_samples"]["guitar"] == 2 * num_samples
  assert np.all(stems["piano"][num_samples // 2 + 1:] == 0)  # zero-padded
  assert np.max(np.abs(stems["bass"])) > 0
  np.testing.assert_array_equal(mix, outputs.mixture(stems))
  given_sum = stems["drums"] + stems["guitar"] + stems["piano"]
  np.testing.assert_allclose(mix - given_sum, stems["bass"], atol=1e-6)


def test_partial_latents_hold_the_given_stems_encodings_exactly(models, condition_dir,
                                                                num_samples):
  vae, vae_params, denoiser, denoiser_params = models
  config = _config(condition_dir=condition_dir, generate="bass", pad=True)
  task = stage.prepare_task(config)
  spec = stage.make_spec(config, vae, denoiser, task.generate_stems)
  x_known = np.asarray(generation_program.encode_given(
      vae_params, task.given.stacked(spec.num_samples), vae=vae))[0]
  pieces = list(stage.generate_pieces(spec, vae_params, denoiser_params, seed=0,
                                      piece_indices=[0, 1], batch_size=2,
                                      num_samples=num_samples, given=task.given))
  mask = joint_latent.source_mask("drums,guitar,piano", vae.latent_dim)[:, 0]
  for piece in pieces:
    assert piece.latents.shape == (spec.channels, spec.num_frames)
    np.testing.assert_array_equal(piece.latents[mask], x_known[mask])
    assert not np.allclose(piece.latents[~mask], x_known[~mask])
  assert not np.allclose(pieces[0].latents[~mask], pieces[1].latents[~mask])


def test_same_seed_same_pieces_and_another_seed_differs(models, total_run, num_samples):
  vae, vae_params, denoiser, denoiser_params = models
  config, output = total_run
  spec = stage.make_spec(config, vae, denoiser)

  def run(seed, indices):
    return list(stage.generate_pieces(spec, vae_params, denoiser_params, seed=seed,
                                      piece_indices=indices, batch_size=2,
                                      num_samples=num_samples))

  again = run(config.sample.seed, [0, 1])
  for piece in again:  # A second run with the seed reproduces the stage's files.
    stems, _, _ = _read_piece(outputs.piece_dir(output, piece.index))
    for name in stems_lib.STEM_NAMES:
      np.testing.assert_array_equal(piece.stems[name], stems[name])
  # A piece depends on its index and the seed only, not on its batch.
  alone = run(config.sample.seed, [1])[0]
  np.testing.assert_allclose(alone.latents, again[1].latents, atol=1e-5)
  other = run(config.sample.seed + 1, [0, 1])
  for a, b in zip(again, other):
    assert not np.allclose(a.latents, b.latents)
    assert not np.allclose(a.stems["drums"], b.stems["drums"])


def test_missing_given_stem_names_the_file(tmp_path, num_samples):
  sf.write(tmp_path / "drums.wav", _sine(110, 0.2), SR)
  sf.write(tmp_path / "guitar.wav", _sine(220, 0.2), SR)
  config = _config(condition_dir=str(tmp_path), generate="bass")
  with pytest.raises(FileNotFoundError, match=r"piano\.wav"):
    stage.prepare_task(config)
  with pytest.raises(FileNotFoundError, match="not a folder"):
    stage.prepare_task(_config(condition_dir=str(tmp_path / "nowhere"), generate="bass"))
  with pytest.raises(ValueError, match="condition_dir"):
    stage.prepare_task(_config(generate="bass"))


def test_unknown_stem_in_generate_is_named():
  with pytest.raises(ValueError, match=r"config\.sample\.generate='bass,flute'.*'flute'"):
    stage.prepare_task(_config(generate="bass,flute"))
  # All four stems (or none) is total generation: no condition_dir needed.
  assert stage.prepare_task(_config(generate="piano,bass,drums,guitar")).given is None


def test_command_line_flags_override_the_config(tmp_path):
  """`--generate` reaches the stage through main.py: an unknown stem fails, naming it."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "msldm_jax.main", "--config=configs/demo.py:variant=tiny",
       f"--workdir={tmp_path}", "--mode=sample", f"--condition_dir={tmp_path}",
       "--generate=bass,flute"],
      capture_output=True, text=True, env=env, timeout=120,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode != 0
  assert "'flute'" in result.stderr and "config.sample.generate" in result.stderr


def _write_checkpoints(workdir, models, config, independent_stems=0, latent_scale=()):
  """An imported VAE and a diffusion checkpoint (step 9) recording it, as the stages write
  them; returns the VAE's folder. independent_stems > 0: models' denoiser is ISLDM's;
  latent_scale: the per-source scale its training divided the latents by."""
  vae, vae_params, _, denoiser_params = models
  vae_dir = os.path.join(workdir, "imported_vae")
  loading.save_imported_vae(vae_dir, jax.device_get(vae_params), vae)
  state = {"step": np.int32(9), "params": jax.device_get(denoiser_params),
           "ema_params": jax.device_get(denoiser_params)}
  latents = {"latents_dir": "unused", "vae": loading.load_vae(vae_dir).identity,
             "shape": [stems_lib.NUM_STEMS, vae.latent_dim, 32], "scale": list(latent_scale)}
  manager = checkpointing.make_manager(
      workdir_layout.checkpoints_dir(workdir, workdir_layout.LDM))
  checkpointing.save(manager, 9, state, {},
                     loading.denoiser_record("dit", _denoiser_config(config), latents=latents,
                                             independent_stems=independent_stems))
  manager.wait_until_finished()
  return vae_dir


def test_sample_stage_loads_checkpoints_and_writes_to_workdir(models, tmp_path):
  """The stage finds the denoiser in the workdir and the VAE its checkpoint records."""
  config = _config()
  vae_dir = _write_checkpoints(str(tmp_path), models, config)
  output = stage.run(config, str(tmp_path))
  assert output == os.path.join(str(tmp_path), "samples")
  _, _, record = _read_piece(outputs.piece_dir(output, 1))
  assert record["checkpoints"]["vae"]["checkpoint_dir"] == vae_dir
  assert record["checkpoints"]["vae"]["format"] == "imported"
  assert record["checkpoints"]["ldm"]["step"] == 9


def test_a_denoisers_latent_scale_is_undone_before_decoding(models, condition_dir,
                                                            num_samples, tmp_path):
  """ldm.latent_scale: the sampler works in the denoiser's scale (given stems encoded, then
  divided by it), the decoder in the VAE's (sampled latents times it); --mode=sample takes
  the scale from the checkpoint's record."""
  vae, vae_params, denoiser, denoiser_params = models
  scale = (4.0, 0.5, 2.0, 1.0)
  config = _config(condition_dir=condition_dir, generate="bass", pad=True)
  task = stage.prepare_task(config)
  spec = stage.make_spec(config, vae, denoiser, task.generate_stems, latent_scale=scale)
  encoded = np.asarray(generation_program.encode_given(
      vae_params, task.given.stacked(spec.num_samples), vae=vae))
  piece, = stage.generate_pieces(spec, vae_params, denoiser_params, seed=0,
                                 piece_indices=[0], batch_size=1, num_samples=num_samples,
                                 given=task.given)
  per_channel = np.repeat(np.asarray(scale, np.float32), vae.latent_dim)[:, None]
  mask = joint_latent.source_mask("drums,guitar,piano", vae.latent_dim)[:, 0]
  np.testing.assert_allclose(piece.latents[mask], (encoded[0] / per_channel)[mask],
                             rtol=1e-6)
  # One program, not the decoder op by op.
  decode_bass = jax.jit(lambda params, latents: generation_program.decode_stems(
      vae, params, joint_latent.split_sources(latents), [0]))
  decoded = decode_bass(vae_params, piece.latents[None] * per_channel)
  np.testing.assert_allclose(piece.stems["bass"],
                             conditions.fit_to_length(np.asarray(decoded[0, 0]), num_samples),
                             atol=1e-5)
  with pytest.raises(ValueError, match="one positive scale per source"):
    stage.make_spec(config, vae, denoiser, task.generate_stems, latent_scale=scale[:2])

  total = _config(num_pieces=1, batch_size=1)
  _write_checkpoints(str(tmp_path), models, total, latent_scale=scale)
  _, _, record = _read_piece(outputs.piece_dir(stage.run(total, str(tmp_path)), 0))
  assert record["latent_scale"] == list(scale)
  assert record["checkpoints"]["ldm"]["latents"]["scale"] == list(scale)


def test_sample_stage_runs_an_isldm_checkpoint(models, tmp_path):
  """--config.system=isldm's checkpoints (one DiT per stem) sample through the same stage:
  the record rebuilds the per-stem networks."""
  config = _config(num_pieces=1, batch_size=1)
  vae, vae_params = models[0], models[1]
  isldm = denoisers.build("dit", ml_collections.ConfigDict(_denoiser_config(config)),
                          stems_lib.NUM_STEMS)
  params = jax.jit(isldm.init)(jax.random.key(1), jnp.zeros((1, isldm.in_channels, 32)),
                               jnp.zeros((1,)))
  _write_checkpoints(str(tmp_path), (vae, vae_params, isldm, params), config,
                     independent_stems=stems_lib.NUM_STEMS)
  output = stage.run(config, str(tmp_path))
  stems, mix, record = _read_piece(outputs.piece_dir(output, 0))
  assert record["checkpoints"]["ldm"]["step"] == 9
  assert all(np.isfinite(stem).all() for stem in stems.values()) and np.isfinite(mix).all()


def test_sample_stage_refuses_a_vae_the_diffusion_model_did_not_learn(models, tmp_path):
  config = _config()
  _write_checkpoints(str(tmp_path), models, config)
  vae, vae_params = models[0], models[1]
  other = jax.tree.map(lambda p: np.asarray(p) * 1.01, jax.device_get(vae_params))
  loading.save_imported_vae(str(tmp_path / "other_vae"), other, vae)
  config.ldm.vae_checkpoint = str(tmp_path / "other_vae")
  with pytest.raises(ValueError, match=r"other_vae.*must not mix"):
    stage.run(config, str(tmp_path))


def test_decoding_only_the_generated_stems_matches_decoding_all():
  # The smallest VAE (two strides): the property does not depend on the size.
  vae = source_vae.SourceVAE.from_config(source_vae.model_config("tiny"))
  # Filled from the abstract shapes: compiling `init` would cost more than the test.
  abstract = source_vae.abstract_params(vae, samples=64)
  rng = np.random.default_rng(2)
  vae_params = jax.tree.map(
      lambda leaf: (1.0 + 0.1 * rng.normal(size=leaf.shape)).astype(leaf.dtype), abstract)
  latents = 0.5 * jax.random.normal(jax.random.key(3), (2, stems_lib.NUM_STEMS,
                                                         vae.latent_dim, 8))
  every = jax.jit(lambda p, z: generation_program.decode_stems(vae, p, z, [0, 1, 2, 3]))(
      vae_params, latents)
  some = jax.jit(lambda p, z: generation_program.decode_stems(vae, p, z, [1, 3]))(
      vae_params, latents)
  assert some.shape == (2, 2, source_vae.decoded_length(8, vae.decoder_strides))
  np.testing.assert_allclose(some, every[:, [1, 3]], atol=1e-5)


def test_sampler_settings_follow_the_sampler():
  config = _config(sampler="dpmpp_2m")
  name, settings = generation_program.sampler_settings(config.sample)
  assert name == "dpmpp_2m" and "s_churn" not in settings  # deterministic: no churn
  with pytest.raises(ValueError, match="config.sample.sampler='ddim'"):
    generation_program.sampler_settings(_config(sampler="ddim").sample)
  config = copy.deepcopy(_config())
  with config.unlocked():
    config.data.chunks.samples = 320 * 30 - 8  # 30 frames: not a multiple of patch 4
  vae = source_vae.SourceVAE.from_config(config.vae.model)
  with pytest.raises(ValueError, match="config.data.chunks.samples=9592"):
    stage.make_spec(config, vae, dit.build_model(_denoiser_config(config)))


@pytest.mark.parametrize("name", ["euler_churn", "heun", "dpmpp_2m"])
def test_sampling_denoise_fn_equals_the_plain_denoiser(models, name):
  _, _, denoiser, params = models
  channels = params["params"]["patch_embed"]["kernel"].shape[0] // denoiser.patch_size
  settings = {"num_steps": 6}
  shape = (1, channels, 32)
  sample = samplers.get_sampler(name, settings)

  @jax.jit
  def both(params, key):
    fast = generation_program.sampling_denoise_fn(denoiser, params, name, settings)
    plain = edm.make_denoise_fn(denoiser.apply, params)
    return sample(fast, key, shape), sample(plain, key, shape)

  fast, plain = both(params, jax.random.key(3))
  np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-5)
  assert float(jnp.std(fast)) > 0.1


def _conditioning_batches(run):
  """Runs `run()` (which must trace a fresh jit inside it) and returns the batch size of
  every `conditioning` evaluation the compiled program made, in order.

  Counted at run time (a host callback in each traced call), not at trace time: the table's
  fallback branch is always traced, and only executing it costs anything.
  """
  batches = []

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "conditioning":
      jax.debug.callback(lambda c: batches.append(np.atleast_1d(c).shape[0]), args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    jax.block_until_ready(run())
  jax.effects_barrier()
  return batches


@pytest.mark.parametrize("name", ["euler_churn", "heun", "dpmpp_2m"])
def test_sampling_computes_the_conditioning_once_per_run(models, name):
  # Equal outputs (the test above) cannot tell the table from its fallback; this fails when
  # any sampler evaluation misses the table, e.g. when it and `evaluation_sigmas` disagree.
  _, _, denoiser, params = models
  channels = params["params"]["patch_embed"]["kernel"].shape[0] // denoiser.patch_size
  settings = {"num_steps": 4}
  sample = samplers.get_sampler(name, settings)
  num_evaluations = samplers.evaluation_sigmas(name, settings).shape[0]

  def run(make_denoise_fn):
    @jax.jit
    def fn(params, key):
      return sample(make_denoise_fn(params), key, (1, channels, 32))
    return fn(params, jax.random.key(3))

  plain = _conditioning_batches(
      lambda: run(lambda p: edm.make_denoise_fn(denoiser.apply, p)))
  assert plain == [1] * num_evaluations  # The counter sees every evaluation.
  fast = _conditioning_batches(lambda: run(
      lambda p: generation_program.sampling_denoise_fn(denoiser, p, name, settings)))
  assert fast == [num_evaluations], "the sampler's loop computed its own conditioning"


def test_sampling_denoise_fn_falls_back_off_the_table(models):
  _, _, denoiser, params = models
  channels = params["params"]["patch_embed"]["kernel"].shape[0] // denoiser.patch_size
  x = jax.random.normal(jax.random.key(0), (1, channels, 32))
  fast = generation_program.sampling_denoise_fn(denoiser, params, "euler_churn", {"num_steps": 4})
  plain = edm.make_denoise_fn(denoiser.apply, params)
  table = samplers.evaluation_sigmas("euler_churn", {"num_steps": 4})
  for sigma in (table[1], jnp.float32(0.777)):  # On the table, and off it.
    np.testing.assert_allclose(jax.jit(fast)(x, sigma), jax.jit(plain)(x, sigma),
                               rtol=1e-5, atol=1e-5)
