"""msldm_jax: Multi-Source Latent Diffusion for music in JAX/Flax (arXiv 2409.06190)."""

__version__ = "0.1.0"
