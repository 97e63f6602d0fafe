"""The diffusion maths and the compiled generation program.

  edm.py                 EDM preconditioning and loss
  samplers.py            the samplers (Euler with churn, Heun, DPM-Solver++(2M)), inpainting
  generation_program.py  one jitted program from per-piece keys to decoded stems (sampler +
                         SourceVAE decoding), used by generation, evaluation and the
                         diffusion trainer's periodic samples alike; known values
                         (stems, a window's first frames) as data for long-form windows
  mixture_guidance.py    separation: the denoised estimate pulled towards a mixture (DPS
                         through the frozen decoder, MSDM's Dirac)
"""
