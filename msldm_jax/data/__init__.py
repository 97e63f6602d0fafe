"""Data layer: the mini dataset renderer, TFDS builds from stem folders, tf.data views."""
