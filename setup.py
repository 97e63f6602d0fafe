"""msldm_jax: Multi-Source Latent Diffusion for music in JAX/Flax."""

import setuptools

setuptools.setup(
    name="msldm_jax",
    version="0.1.0",
    description="Multi-Source Latent Diffusion Model for music (arXiv 2409.06190) in JAX/Flax",
    packages=setuptools.find_packages(include=["msldm_jax", "msldm_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.6,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "tensorflow-cpu>=2.19,<2.22",
        "tensorflow-datasets>=4.9.9,<4.10",
        "librosa>=0.11,<0.12",
        "ml-collections>=1.1,<1.2",
        "chex>=0.1.90,<0.2",
        "ml_dtypes>=0.5",
        "soundfile>=0.13,<0.15",
        "numpy>=2.0,<3",
        "scipy>=1.13,<2",
        "pretty_midi>=0.2.10,<0.3",
        "music21>=9.1,<11",
        "pyyaml>=6,<7",
        "absl-py>=2.1,<3",
        "tqdm>=4.66,<5",
        "matplotlib>=3.9,<4",
        "tensorboard>=2.19,<2.22",
    ],
    extras_require={
        "test": ["pytest>=8,<10", "pytest-xdist>=3.6,<4", "nbclient>=0.10,<0.11",
                 "ipykernel>=6.29,<8", "nbformat>=5.10,<6"],
    },
)
