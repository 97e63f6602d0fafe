"""The stem-coupled DiT (models/coupled_stems.py): ISLDM at initialisation, joint once its
mixers open, and built only where it fits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msldm_jax.diffusion import edm
from msldm_jax.evaluation import latent_dependence
from msldm_jax.models import coupled_stems
from msldm_jax.models import denoisers
from msldm_jax.models import dit
from msldm_jax.models import loading

import network_helpers  # pylint: disable=g-bad-import-order

STEMS, DIM, FRAMES = 4, 8, 16


def _config(**overrides):
  return dit.model_config("tiny", in_channels=STEMS * DIM, dtype="float32", patch_skip=True,
                          **overrides)


def _coupled_from_isldm(isldm_params, coupled_params):
  """The coupled network's parameters with ISLDM's per-stem sets in its streams (mixers as
  they are)."""
  stems = isldm_params["params"]["stems"]
  params = dict(coupled_params["params"])
  params["stem_input"] = {"patch_embed": stems["patch_embed"],
                          "noise_embed": stems["noise_embed"]}
  params["stem_output"] = {name: stems[name] for name in ("final", "skip_gate", "skip")}
  for name in stems:
    if name.startswith("block_"):
      params[name] = stems[name]
  return {"params": params}


def _networks():
  x = jnp.zeros((1, STEMS * DIM, FRAMES))
  isldm = denoisers.build(denoisers.DIT, _config(), STEMS)
  coupled = denoisers.build(denoisers.DIT, _config(stem_streams=STEMS))
  assert isinstance(coupled, coupled_stems.CoupledStemsDiT)
  # Jitted, here and in the tests: op by op, four DiT streams dispatch hundreds of programs.
  isldm_params = network_helpers.perturbed(
      jax.jit(isldm.init)(jax.random.key(0), x, jnp.zeros((1,))), jax.random.key(1))
  coupled_params = jax.jit(coupled.init)(jax.random.key(0), x, jnp.zeros((1,)))
  return isldm, isldm_params, coupled, _coupled_from_isldm(isldm_params, coupled_params)


def _open_mixers(params, seed=7):
  """Every mixer's parameters perturbed, so its gates are no longer 0."""
  opened = dict(params["params"])
  for name in opened:
    if name.startswith("mixer_"):
      opened[name] = network_helpers.perturbed(opened[name], jax.random.key(seed), 0.3)
  return {"params": opened}


def test_fresh_mixers_leave_exactly_isldm():
  """With its mixers as initialised (gates 0), the network computes ISLDM with the same
  per-stem parameters: every stream is that stem's DiT, so the parameter trees match."""
  isldm, isldm_params, coupled, params = _networks()
  x = jax.random.normal(jax.random.key(2), (2, STEMS * DIM, FRAMES))
  c_noise = jnp.array([-0.5, 0.3])
  coupled_apply = jax.jit(coupled.apply)
  expected = jax.jit(isldm.apply)(isldm_params, x, c_noise)
  np.testing.assert_allclose(coupled_apply(params, x, c_noise), expected, rtol=1e-5,
                             atol=1e-5)
  # Open mixers change every stem's output.
  opened = coupled_apply(_open_mixers(params), x, c_noise)
  for s in range(STEMS):
    rows = slice(s * DIM, (s + 1) * DIM)
    assert float(jnp.max(jnp.abs(opened[:, rows] - expected[:, rows]))) > 1e-3


def test_open_mixers_carry_the_other_stems():
  """A stem's output depends on another stem's input only through the mixers; the
  latent-dependence measure sees it (0 with fresh mixers, > 0 once open)."""
  _, _, coupled, params = _networks()
  x = jax.random.normal(jax.random.key(3), (1, STEMS * DIM, FRAMES))
  changed = x.at[:, 2 * DIM:3 * DIM].set(jax.random.normal(jax.random.key(4), (1, DIM, FRAMES)))
  others = np.r_[0:2 * DIM, 3 * DIM:STEMS * DIM]
  c_noise = jnp.array([0.1])
  coupled_apply = jax.jit(coupled.apply)
  fresh = [coupled_apply(params, v, c_noise)[:, others] for v in (x, changed)]
  np.testing.assert_array_equal(np.asarray(fresh[0]), np.asarray(fresh[1]))
  opened_params = _open_mixers(params)
  opened = [coupled_apply(opened_params, v, c_noise)[:, others] for v in (x, changed)]
  assert float(jnp.max(jnp.abs(opened[0] - opened[1]))) > 1e-3

  latents = np.asarray(jax.random.normal(jax.random.key(5), (6, STEMS, DIM, FRAMES)))
  for weights, gains in ((params, False), (opened_params, True)):
    rows = latent_dependence.cross_stem_information(
        loading.Loaded(coupled, weights, {}), latents, stem_names="abcd", sigmas=(0.3,),
        batch_size=6, bootstrap_samples=20, sigma_data=edm.SIGMA_DATA)
    information = np.array([row["information"] for row in rows.values()])
    if gains:
      assert np.abs(information).max() > 1e-4, information
    else:
      np.testing.assert_allclose(information, 0.0, atol=1e-6)


def test_built_only_where_it_fits():
  with pytest.raises(ValueError, match="stem_streams=4 couples the stems"):
    denoisers.build(denoisers.DIT, _config(stem_streams=STEMS), STEMS)
  with pytest.raises(ValueError, match="denoisers.build"):
    dit.build_model(_config(stem_streams=STEMS))
  coupled = denoisers.build(denoisers.DIT, _config(stem_streams=3))
  with pytest.raises(ValueError, match="3 streams"):
    coupled.init(jax.random.key(0), jnp.zeros((1, STEMS * DIM, FRAMES)), jnp.zeros((1,)))
  # The recorded config rebuilds it, and a record from before the setting a plain DiT.
  record = denoisers.record(denoisers.DIT, _config(stem_streams=STEMS))
  rebuilt = denoisers.from_record(record["kind"], record["config"], "test record")
  assert isinstance(rebuilt, coupled_stems.CoupledStemsDiT) and rebuilt.stem_streams == STEMS
  old = {k: v for k, v in record["config"].items() if k not in dit.COUPLING_KEYS}
  assert isinstance(denoisers.from_record(denoisers.DIT, old, "old record"), dit.DiT)
