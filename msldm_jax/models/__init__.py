"""Networks: the SourceVAE (source_vae.py) and its DAC building blocks (audio_layers.py)."""
