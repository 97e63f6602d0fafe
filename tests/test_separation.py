"""Separation by posterior sampling: a case with a known answer, the compiled program, the
`--mode=separate` stage and its bad inputs, and the evaluation's separation table."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

from msldm_jax import stems as stems_lib
from msldm_jax.data import audio_files
from msldm_jax.diffusion import generation_program
from msldm_jax.diffusion import mixture_guidance
from msldm_jax.diffusion import samplers
from msldm_jax.evaluation import separation as separation_scores
from msldm_jax.generation import separation
from msldm_jax.generation import stage
from msldm_jax.models import loading

import test_generation
from test_generation import models  # noqa: F401  (a fixture)

SR = stems_lib.SAMPLE_RATE


# -- a known answer: Gaussian stems of different spectra, an identity codec ------------------

FRAMES = 256


def _spectra():
  """Power spectra (rfft bins) of four stationary Gaussian stems that occupy different
  bands: the optimal separator is a Wiener filter, so guidance must beat the mixture."""
  f = np.fft.rfftfreq(FRAMES)
  bands = [(0.0, 0.06), (0.06, 0.15), (0.15, 0.3), (0.3, 0.51)]
  return np.stack([np.where((f >= lo) & (f < hi), 1.0, 1e-3) for lo, hi in bands])


def _gaussian_denoiser(spectra):
  """The exact denoiser E[x0 | x] of the stems' Gaussian prior, per stem in Fourier space
  (the joint latent of 4 stems × 1 channel)."""
  power = jnp.asarray(spectra * FRAMES)  # rfft of white noise of unit variance has power N.

  def denoise(x, sigma):
    spectrum = jnp.fft.rfft(x[0], axis=-1)
    gain = power / (power + sigma**2 * FRAMES)
    return jnp.fft.irfft(gain * spectrum, n=FRAMES, axis=-1)[None]

  return denoise


def _draw_stems(spectra, rng):
  noise = np.fft.rfft(rng.standard_normal((4, FRAMES)), axis=-1)
  return np.fft.irfft(noise * np.sqrt(spectra), n=FRAMES, axis=-1).astype(np.float32)


IDENTITY = mixture_guidance.Codec(decode=lambda latents: latents,
                                  encode=lambda waveform, stem: waveform[None],
                                  latent_dim=1)


@pytest.mark.parametrize("method", ["dps", "dirac"])
def test_guidance_separates_a_mixture_whose_answer_is_known(method):
  """Four Gaussian stems in different bands, summed: posterior sampling with the exact prior
  and an identity decoder recovers each stem far better than the mixture does."""
  spectra = _spectra()
  rng = np.random.default_rng(0)
  truth = np.stack([_draw_stems(spectra, rng) for _ in range(4)])  # [chunks, stems, T]
  guidance = mixture_guidance.Guidance(method=method, strength=1.0)
  sample = samplers.get_sampler("euler_churn", {"num_steps": 40, "sigma_max": 3.0})

  @jax.jit
  def separate(mixture, key):
    denoise = mixture_guidance.guided_denoise_fn(_gaussian_denoiser(spectra), IDENTITY,
                                                 mixture, guidance)
    return sample(denoise, key, (1, 4, FRAMES))[0]

  estimates = np.stack([np.asarray(separate(jnp.asarray(t.sum(0)), jax.random.key(i)))
                        for i, t in enumerate(truth)])
  gains = separation_scores.improvement(estimates, truth, np.ones((4, 4), bool))
  for stem, (gain, count) in gains.items():
    assert count == 4
    assert gain > 6.0, (method, stem, gain)
  # The prior alone (strength 0) separates nothing: its stems ignore the mixture.
  if method == "dps":
    prior = mixture_guidance.Guidance(method="dps", strength=0.0)
    unguided = np.stack([np.asarray(jax.jit(lambda m, k: sample(
        mixture_guidance.guided_denoise_fn(_gaussian_denoiser(spectra), IDENTITY, m, prior),
        k, (1, 4, FRAMES))[0])(jnp.asarray(t.sum(0)), jax.random.key(i)))
        for i, t in enumerate(truth)])
    prior_gains = separation_scores.improvement(unguided, truth, np.ones((4, 4), bool))
    assert np.mean([g for g, _ in prior_gains.values()]) < 0.0
  if method == "dirac":  # The constrained stem closes the sum exactly.
    np.testing.assert_allclose(
        np.asarray(mixture_guidance.residual_stem(estimates[0], truth[0].sum(0), 3)).sum(0),
        truth[0].sum(0), atol=1e-5)


def test_guidance_settings_are_checked():
  with pytest.raises(ValueError, match="method 'wiener'"):
    mixture_guidance.Guidance(method="wiener")
  with pytest.raises(ValueError, match="strength 1.5"):
    mixture_guidance.Guidance(strength=1.5)
  with pytest.raises(ValueError, match="dirac_stem 'flute'"):
    mixture_guidance.Guidance(method="dirac", dirac_stem="flute")


# -- the compiled program with the tiny VAE and DiT ------------------------------------------

def _spec(models, **sample):
  config = test_generation._config(**sample)
  return config, separation.separation_spec(config, models[0], models[2])


def test_program_guidance_is_a_wrapper_and_dirac_sums_to_the_mixture(models):
  vae, vae_params, _, denoiser_params = models
  config, spec = _spec(models)
  keys = generation_program.piece_keys(0, [0, 1])
  shape = (2, spec.channels, spec.num_frames)
  x_known, known = np.zeros(shape, np.float32), np.zeros(shape, bool)
  mixtures = 0.1 * np.random.default_rng(0).standard_normal(
      (2, spec.num_samples)).astype(np.float32)
  plain, plain_audio = generation_program.sample_masked(
      vae_params, denoiser_params, keys, x_known, known, spec=spec)
  off, _ = generation_program.sample_masked(
      vae_params, denoiser_params, keys, x_known, known, mixtures, spec=spec,
      guidance=mixture_guidance.Guidance(strength=0.0))
  np.testing.assert_allclose(np.asarray(off), np.asarray(plain), atol=1e-5)
  assert plain_audio.shape == (2, 4, spec.num_samples)
  dps, dps_audio = generation_program.sample_masked(
      vae_params, denoiser_params, keys, x_known, known, mixtures, spec=spec,
      guidance=mixture_guidance.Guidance(strength=1.0))
  assert not np.allclose(np.asarray(dps), np.asarray(plain))
  assert np.isfinite(np.asarray(dps_audio)).all()
  _, dirac_audio = generation_program.sample_masked(
      vae_params, denoiser_params, keys, x_known, known, mixtures, spec=spec,
      guidance=mixture_guidance.Guidance(method="dirac", dirac_stem="guitar"))
  np.testing.assert_allclose(np.asarray(dirac_audio).sum(1), mixtures, atol=1e-5)


def _write_mix(path, seconds, rate, channels=1, subtype="FLOAT"):
  t = np.arange(int(seconds * rate)) / rate
  x = 0.3 * np.sin(2 * np.pi * 110 * t) + 0.2 * np.sign(np.sin(2 * np.pi * 2 * t))
  audio = np.stack([x, 0.8 * x], axis=1) if channels == 2 else x
  sf.write(path, audio.astype(np.float32), rate, subtype=subtype)
  return len(t)


def test_separate_stage_writes_stems_at_the_input_rate_and_length(models, tmp_path):
  """A 44.1 kHz stereo FLAC of about 2.5 windows: separated window by window, written at
  44.1 kHz and the file's length; with dirac, the stems add up to the mixture."""
  vae, vae_params, denoiser, denoiser_params = models
  config, spec = _spec(models, num_steps=4)
  window_seconds = spec.num_samples / SR
  mix_path = str(tmp_path / "song.flac")
  frames = _write_mix(mix_path, 2.5 * window_seconds, 44100, channels=2, subtype="PCM_16")
  config.separate.method = "dirac"
  out = separation.separate_to_dir(config, mix_path, str(tmp_path / "out"), vae, vae_params,
                                   denoiser, denoiser_params)
  with open(os.path.join(out, "piece.json")) as f:
    record = json.load(f)
  assert record["mode"] == "separation" and record["windows"] == 3
  assert record["sample_rate"] == 44100 and record["input_rate"] == 44100
  stems = {}
  for name in stems_lib.STEM_NAMES:
    stems[name], rate = sf.read(os.path.join(out, "stems", f"{name}.wav"), dtype="float32")
    assert rate == 44100 and stems[name].shape == (frames,)
  mixture, _ = sf.read(os.path.join(out, "input.wav"), dtype="float32")
  # Dirac's sum equals the mixture up to the resampling to 44.1 kHz of the model's stems.
  assert record["sum_si_sdr_to_mixture_db"] > 20.0
  assert not os.path.exists(out.rstrip(os.sep) + ".partial")


@pytest.mark.parametrize("defect", ["nan", "empty", "short", "missing"])
def test_bad_mixtures_fail_naming_the_file_and_write_nothing(models, tmp_path, defect):
  vae, vae_params, denoiser, denoiser_params = models
  config, _ = _spec(models, num_steps=2)
  path = str(tmp_path / "bad.wav")
  if defect == "nan":
    audio = np.zeros(SR, np.float32)
    audio[100] = np.nan
    sf.write(path, audio, SR, subtype="FLOAT")
    error, match = audio_files.BadAudioError, "non-finite"
  elif defect == "empty":
    open(path, "wb").close()
    error, match = audio_files.BadAudioError, "empty"
  elif defect == "short":
    sf.write(path, np.zeros(100, np.float32), SR, subtype="FLOAT")
    error, match = ValueError, "shorter than one latent frame"
  else:
    error, match = audio_files.BadAudioError, "missing"
  out = tmp_path / "out"
  with pytest.raises(error, match=match) as raised:
    separation.separate_to_dir(config, path, str(out), vae, vae_params, denoiser,
                               denoiser_params)
  assert "bad.wav" in str(raised.value)
  assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_separate_mode_from_the_command_line(models, tmp_path):
  """`python -m msldm_jax.main --mode=separate --mix=... --out_dir=...` with checkpoints in
  the workdir, as a user runs it."""
  config = test_generation._config()
  test_generation._write_checkpoints(str(tmp_path), models, config)
  mix_path = str(tmp_path / "mix.ogg")
  frames = _write_mix(mix_path, 0.7, 32000, subtype="VORBIS")
  out = tmp_path / "stems_out"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "msldm_jax.main", "--config=configs/demo.py:variant=tiny",
       f"--workdir={tmp_path}", "--mode=separate", f"--mix={mix_path}", f"--out_dir={out}",
       "--config.separate.num_steps=3"],
      capture_output=True, text=True, env=env, timeout=600,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0, result.stderr[-3000:]
  with open(out / "piece.json") as f:
    record = json.load(f)
  assert record["method"] == "dps" and record["checkpoints"]["ldm"]["step"] == 9
  for name in stems_lib.STEM_NAMES:
    audio, rate = sf.read(out / "stems" / f"{name}.wav", dtype="float32")
    assert rate == 32000 and audio.shape == (frames,) and np.isfinite(audio).all()
  result = subprocess.run(
      [sys.executable, "-m", "msldm_jax.main", "--config=configs/demo.py:variant=tiny",
       f"--workdir={tmp_path}", "--mode=separate"],
      capture_output=True, text=True, env=env, timeout=300,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode != 0 and "--mix=FILE" in result.stderr


def test_separation_table_scores_methods_beside_the_oracle(models, tmp_path):
  """The evaluation's table on chunks whose stems are known: every method and the oracle
  scored per stem; an empty true stem is left out of its column."""
  vae, vae_params, denoiser, denoiser_params = models
  config, spec = _spec(models, num_steps=3)
  config.evaluate.separation_chunks = 3
  rng = np.random.default_rng(1)
  reference = (0.2 * rng.standard_normal((4, 4, int(config.data.chunks.samples)))
               ).astype(np.float32)
  reference[0, 2] = 0.0  # guitar silent in one chunk
  loaded = lambda module, params: loading.Loaded(module, params, {})
  from msldm_jax.evaluation import stage as evaluation_stage
  facts = evaluation_stage.separation_table(config, loaded(vae, vae_params),
                                            loaded(denoiser, denoiser_params), reference,
                                            str(tmp_path))
  rows = facts["table"]
  assert list(rows) == ["dps", "dirac", separation_scores.ORACLE]
  chosen = facts["chunks"]
  assert len(chosen) == 3
  expected_pairs = 12 - (1 if 0 in chosen else 0)
  for row in rows.values():
    assert row["scored pairs"] == expected_pairs
    assert all(np.isfinite(row[name]) for name in stems_lib.STEM_NAMES)
  text = open(tmp_path / "separation.md").read()
  assert "oracle: VAE reconstruction" in text and "SI-SDR improvement" in text
