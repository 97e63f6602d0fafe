"""Generation: total and partial four-stem generation with the latent diffusion model.

  sampling.py    the pure compiled program (sampler + VAE decoding) and per-piece keys
  conditions.py  which stems to generate; reading and fitting the given stems
  outputs.py     writing a piece: stems, float mix, spectrogram, piece.json
  stage.py       the `--mode=sample` stage, `sample(config, workdir)`
"""
