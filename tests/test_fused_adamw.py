"""The one-pass AdamW + clipping + EMA against optax's chain and the EMA written out."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from msldm_jax.training import fused_adamw
from msldm_jax.training import train_ldm


def _reference_step(tx, ema_decay, grads, opt_state, params, ema):
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
  return params, ema, opt_state


@pytest.mark.parametrize("clip,weight_decay", [(1.0, 0.0), (0.0, 0.01), (50.0, 0.1)])
def test_matches_optax_chain_and_ema(clip, weight_decay):
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.standard_normal((7, 5)), jnp.float32),
            "b": {"x": jnp.asarray(rng.standard_normal(3), jnp.float32)}}
  schedule = train_ldm.learning_rate_schedule(3e-2, warmup_steps=4)
  chain = [optax.clip_by_global_norm(clip)] if clip else []
  tx = optax.chain(*chain, optax.adamw(schedule, b1=0.8, b2=0.95, weight_decay=weight_decay))
  fused = fused_adamw.FusedAdamW(schedule, b1=0.8, b2=0.95, weight_decay=weight_decay,
                                 clip=clip, ema_decay=0.9)
  apply = jax.jit(fused.apply)
  ref_params, ref_ema, ref_state = params, params, tx.init(params)
  new_params, new_ema, state = params, params, fused.init(params)
  clipped = 0
  for step in range(12):
    # Gradients large enough that clipping at 1.0 acts on some steps and not on others.
    scale = 3.0 if step % 3 == 0 else 0.1
    grads = jax.tree.map(lambda p: scale * jnp.asarray(rng.standard_normal(p.shape),
                                                       jnp.float32), params)
    ref_params, ref_ema, ref_state = _reference_step(tx, 0.9, grads, ref_state, ref_params,
                                                     ref_ema)
    new_params, new_ema, state, norm = apply(grads, state, new_params, new_ema)
    np.testing.assert_allclose(norm, optax.tree.norm(grads), rtol=1e-6)
    clipped += bool(clip) and float(norm) > clip
    for ours, theirs in ((new_params, ref_params), (new_ema, ref_ema)):
      for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  assert int(state.count) == 12
  if clip == 1.0:
    assert 0 < clipped < 12  # both branches of the clipping were exercised


def test_zero_ema_decay_keeps_the_parameters_and_dtypes():
  params = {"w": jnp.ones((4,), jnp.float32)}
  fused = fused_adamw.FusedAdamW(optax.constant_schedule(0.1), ema_decay=0.0)
  new_params, ema, state, _ = fused.apply({"w": jnp.full((4,), 2.0)}, fused.init(params),
                                          params, params)
  np.testing.assert_array_equal(ema["w"], new_params["w"])
  # One Adam step moves each coordinate by the learning rate, against the gradient's sign.
  np.testing.assert_allclose(new_params["w"], 0.9, rtol=1e-6)
  assert ema["w"].dtype == jnp.float32 and state.mu["w"].shape == (4,)
