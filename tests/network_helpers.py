"""Helpers for the tests that need a network's parameters away from their initial values."""

import jax


@jax.jit
def perturbed(params, key, scale=0.1):
  """Every leaf plus scale·N(0, 1), each from its own key: norm scales, biases and
  zero-initialised output layers then act (a fresh DiT's output ignores every input). One
  program: leaf by leaf, eagerly, this is a few hundred small compiles for a U-Net."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [leaf + scale * jax.random.normal(k, leaf.shape)
                                      for leaf, k in zip(leaves, keys)])
