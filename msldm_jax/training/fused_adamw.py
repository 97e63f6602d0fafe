"""AdamW with global-norm clipping and the EMA update, in one pass over the parameters.

For the diffusion model the optimiser side is memory-bound: per step it touches the
parameters, their gradients, both Adam moments and the EMA copy, 364 M float32 each for the
release's U-Net. Chained as `optax.clip_by_global_norm` → `optax.adamw` →
`optax.apply_updates` → EMA, XLA:CPU runs several passes (the clipping norm twice, once more
for the logged gradient norm; the updates written out, then added; the parameters read again
for the EMA). Here the norm is taken once, and one elementwise function per leaf reads
(gradient, μ, ν, parameter, EMA) and writes (μ, ν, parameter, EMA): 1.0 s against 1.6 s for
the chain on 364 M parameters on 2 CPU cores (benchmarks/RESULTS.md).

The arithmetic is optax's, operation for operation where it matters (tests compare the two
over many steps):
  g ← g · min(1, clip / ‖g‖)                      (clip_by_global_norm; clip 0: none)
  μ ← b1·μ + (1 − b1)·g ;  ν ← b2·ν + (1 − b2)·g²  (scale_by_adam, eps_root 0)
  u ← μ/(1 − b1ᵗ) / (√(ν/(1 − b2ᵗ)) + eps) + wd·p  (add_decayed_weights)
  p ← p − lr(t − 1)·u                             (the schedule at the pre-update count)
  ema ← d·ema + (1 − d)·p                         (the parameters' EMA)
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class AdamWState(NamedTuple):
  """Updates applied so far and the two moments, shaped like the parameters."""
  count: jax.Array  # int32 scalar
  mu: Any
  nu: Any


@dataclasses.dataclass(frozen=True)
class FusedAdamW:
  """AdamW + clipping + EMA; `init` the state, `apply` one update."""
  learning_rate: optax.Schedule
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  clip: float = 0.0  # max global gradient norm; 0 turns clipping off
  ema_decay: float = 0.0

  def init(self, params) -> AdamWState:
    zeros = lambda p: jnp.zeros_like(p, jnp.float32)
    return AdamWState(count=jnp.zeros((), jnp.int32), mu=jax.tree.map(zeros, params),
                      nu=jax.tree.map(zeros, params))

  def apply(self, grads, state: AdamWState, params, ema_params):
    """(params, ema_params, state, gradient norm before clipping) after one update."""
    grad_norm = optax.tree.norm(grads)
    if self.clip > 0:
      # optax: where(‖g‖ < clip, g, g / ‖g‖ · clip), as a factor.
      factor = jnp.where(grad_norm < self.clip, 1.0, self.clip / grad_norm)
    else:
      factor = jnp.ones((), jnp.float32)
    count = state.count + 1
    step = count.astype(jnp.float32)
    mu_correction = 1.0 - self.b1 ** step
    nu_correction = 1.0 - self.b2 ** step
    learning_rate = self.learning_rate(state.count)
    b1, b2, eps, decay, ema = self.b1, self.b2, self.eps, self.weight_decay, self.ema_decay

    def leaf(g, mu, nu, p, e):
      g = g.astype(jnp.float32) * factor
      mu = b1 * mu + (1.0 - b1) * g
      nu = b2 * nu + (1.0 - b2) * (g * g)
      update = (mu / mu_correction) / (jnp.sqrt(nu / nu_correction) + eps)
      if decay:
        update = update + decay * p
      new_p = (p - learning_rate * update).astype(p.dtype)
      new_e = ema * e.astype(jnp.float32) + (1.0 - ema) * new_p.astype(jnp.float32)
      return new_p, new_e.astype(e.dtype), mu, nu

    out = jax.tree.map(leaf, grads, state.mu, state.nu, params, ema_params)
    treedef = jax.tree.structure(params)
    new_p, new_e, mu, nu = (
        jax.tree.unflatten(treedef, [o[i] for o in treedef.flatten_up_to(out)])
        for i in range(4))
    return new_p, new_e, AdamWState(count=count, mu=mu, nu=nu), grad_norm
