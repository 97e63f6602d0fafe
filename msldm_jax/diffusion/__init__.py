"""The diffusion maths: EDM preconditioning and loss (`edm`), samplers (`samplers`)."""
