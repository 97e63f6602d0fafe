"""ISLDM (models/independent_stems.py): one network per stem, really independent."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msldm_jax import config_loading
from msldm_jax.diffusion import edm
from msldm_jax.diffusion import samplers
from msldm_jax.models import denoisers
from msldm_jax.models import dit
from msldm_jax.models import independent_stems
from msldm_jax.models import unet1d

import network_helpers  # pylint: disable=g-bad-import-order

STEMS, DIM, FRAMES = 4, 8, 16


def _config(kind):
  if kind == denoisers.DIT:
    return dit.model_config("tiny", in_channels=STEMS * DIM, dtype="float32")
  return unet1d.model_config("tiny", in_channels=STEMS * DIM)


def _network(kind, independent):
  model = denoisers.build(kind, _config(kind), STEMS if independent else 0)
  x = jnp.zeros((1, STEMS * DIM, FRAMES))
  # Jitted: op by op, the U-Net's init and apply dispatch (and compile) hundreds of small
  # programs, most of this file's time.
  params = jax.jit(model.init)(jax.random.key(0), x, jnp.zeros((1,)))
  # Random norm scales and biases too, so that no stem's output is trivially constant.
  return model, network_helpers.perturbed(params, jax.random.key(1))


@pytest.mark.parametrize("kind", denoisers.KINDS)
def test_parameters_are_stacked_per_stem(kind):
  model, params = _network(kind, independent=True)
  assert isinstance(model, independent_stems.IndependentStems)
  assert model.in_channels == STEMS * DIM and model.per_stem.in_channels == DIM
  single = denoisers.build(kind, config_loading.update_known(
      _config(kind), {"in_channels": DIM}, "test"))
  single_params = jax.jit(single.init)(jax.random.key(0), jnp.zeros((1, DIM, FRAMES)),
                                       jnp.zeros((1,)))
  stacked = params["params"]["stems"]
  assert jax.tree.structure(stacked) == jax.tree.structure(single_params["params"])
  for leaf, one in zip(jax.tree.leaves(stacked), jax.tree.leaves(single_params["params"])):
    assert leaf.shape == (STEMS,) + one.shape
  # Stem s of the ISLDM computes exactly the single network with stem s's parameters.
  x = jax.random.normal(jax.random.key(2), (2, STEMS * DIM, FRAMES))
  c_noise = jnp.array([-0.5, 0.3])
  out = jax.jit(model.apply)(params, x, c_noise)
  single_apply = jax.jit(single.apply)
  for s in range(STEMS):
    own = {"params": jax.tree.map(lambda leaf: np.asarray(leaf)[s], stacked)}
    np.testing.assert_allclose(
        out[:, s * DIM:(s + 1) * DIM],
        single_apply(own, x[:, s * DIM:(s + 1) * DIM], c_noise), rtol=1e-5, atol=1e-5)


def _sample(model, params, x_init, inpaint=None):
  denoise_fn = edm.make_denoise_fn(model.apply, params)
  return samplers.euler_churn(denoise_fn, jax.random.key(3), None, num_steps=6,
                              x_init=x_init, inpaint=inpaint)


@pytest.mark.parametrize("kind", denoisers.KINDS)
def test_a_stems_sample_ignores_the_other_stems_noise(kind):
  """Total generation: changing stem 2's starting noise leaves every other stem's sample
  unchanged under ISLDM, and changes them under MSLDM's joint network (the control)."""
  x_init = 3.0 * jax.random.normal(jax.random.key(4), (1, STEMS * DIM, FRAMES))
  other = x_init.at[:, 2 * DIM:3 * DIM].set(
      3.0 * jax.random.normal(jax.random.key(5), (1, DIM, FRAMES)))
  keep = np.r_[0:2 * DIM, 3 * DIM:STEMS * DIM]
  for independent in (True, False):
    model, params = _network(kind, independent)
    a, b = _sample(model, params, x_init), _sample(model, params, other)
    assert not np.allclose(a[:, 2 * DIM:3 * DIM], b[:, 2 * DIM:3 * DIM])
    difference = float(jnp.max(jnp.abs(a[:, keep] - b[:, keep])))
    if independent:
      assert difference < 1e-5, difference
    else:
      assert difference > 1e-3, difference


@pytest.mark.parametrize("kind", denoisers.KINDS)
def test_partial_generation_ignores_the_given_stems(kind):
  """Partial generation by replacement: under ISLDM the generated stems do not depend on
  the given ones."""
  model, params = _network(kind, independent=True)
  x_init = 3.0 * jax.random.normal(jax.random.key(6), (1, STEMS * DIM, FRAMES))
  mask = jnp.repeat(jnp.array([True, True, False, False]), DIM)[:, None]
  known = [jax.random.normal(jax.random.key(k), (1, STEMS * DIM, FRAMES)) for k in (7, 8)]
  a, b = (_sample(model, params, x_init, samplers.Inpaint(x_known=k, mask=mask))
          for k in known)
  np.testing.assert_allclose(a[:, 2 * DIM:], b[:, 2 * DIM:], atol=1e-5)
  np.testing.assert_allclose(a[:, :2 * DIM], known[0][:, :2 * DIM], atol=1e-6)


def test_records_rebuild_the_independent_network():
  config = _config(denoisers.DIT)
  record = denoisers.record(denoisers.DIT, config, independent_stems=STEMS)
  assert record["independent_stems"] == STEMS
  rebuilt = denoisers.from_record(denoisers.DIT, record["config"], "a record",
                                  record["independent_stems"])
  assert rebuilt == denoisers.build(denoisers.DIT, config, STEMS)
  assert "independent_stems" not in denoisers.record(denoisers.DIT, config)
  with pytest.raises(ValueError, match="independent_stems=3"):
    denoisers.build(denoisers.DIT, config, 3)
