"""The latent dataset: joint latents of the frozen SourceVAE, written once, read every step.

  store.py   the on-disk format (shards + manifest), its writer pieces and its tf.data reader;
  encode.py  the `--mode=encode_latents` stage that fills a store from the built dataset.
"""
