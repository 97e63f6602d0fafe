"""Generation: total and partial four-stem generation with the latent diffusion model.

  conditions.py  which stems to generate; reading and fitting the given stems
  outputs.py     writing a piece: stems, float mix, spectrogram, piece.json
  stage.py       the `--mode=sample` stage, `run(config, workdir)`
The compiled program itself (sampler + VAE decoding) is `diffusion/generation_program.py`.
"""
