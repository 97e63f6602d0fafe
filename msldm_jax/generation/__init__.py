"""Generation: total and partial four-stem generation with the latent diffusion model, of any
length, and separation of a mixture with the same model as the prior.

  conditions.py  which stems to generate; reading the given stems (a user's recordings)
  long_form.py   pieces longer than the model's window: window plans, continuation, joins
  outputs.py     writing a piece: stems, float mix, spectrogram, piece.json
  stage.py       the `--mode=sample` stage, `run(config, workdir)`
  separation.py  the `--mode=separate` stage, and separating chunks for the evaluation
The compiled program itself (sampler + VAE decoding) is `diffusion/generation_program.py`;
the mixture guidance of separation is `diffusion/mixture_guidance.py`.
"""
