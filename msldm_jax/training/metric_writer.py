"""TensorBoard event files for scalars, audio and images, and progress lines in the log.

Only process 0 writes events; every process may call the methods.
"""

import time

import jax
import numpy as np
import tensorflow as tf
from absl import logging


class MetricWriter:

  def __init__(self, logdir: str):
    self._writer = tf.summary.create_file_writer(logdir) if jax.process_index() == 0 else None

  def scalars(self, step: int, values: dict):
    if self._writer is None:
      return
    with self._writer.as_default():
      for name, value in values.items():
        tf.summary.scalar(name, float(value), step=step)

  def audio(self, step: int, name: str, waveforms: np.ndarray, sample_rate: int):
    """waveforms: [n, samples] float in about [-1, 1]."""
    if self._writer is None:
      return
    data = np.asarray(waveforms, np.float32)[..., None]
    # TensorBoard clips to [-1, 1]; scale down loud clips so they are heard, not clipped.
    peak = max(float(np.max(np.abs(data))), 1.0)
    with self._writer.as_default():
      tf.summary.audio(name, data / peak, sample_rate, step=step, max_outputs=len(data))

  def images(self, step: int, name: str, images: np.ndarray):
    """images: [n, height, width, 3] uint8."""
    if self._writer is None:
      return
    with self._writer.as_default():
      tf.summary.image(name, np.asarray(images), step=step, max_outputs=len(images))

  def flush(self):
    if self._writer is not None:
      self._writer.flush()


class Progress:
  """Steps/s and ETA for a loop of known length, logged every `every` steps."""

  def __init__(self, total_steps: int, first_step: int = 0, every: int = 10, name: str = ""):
    self.total_steps, self.every, self.name = total_steps, every, name
    self._last_step, self._last_time = first_step, time.perf_counter()

  def update(self, step: int) -> float | None:
    """Returns steps/s when it logged a line at this step, else None."""
    if step % self.every and step != self.total_steps:
      return None
    now = time.perf_counter()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    eta = (self.total_steps - step) / max(rate, 1e-9)
    logging.info("%s step %d/%d  %.2f steps/s  ETA %.0f s", self.name, step,
                 self.total_steps, rate, eta)
    self._last_step, self._last_time = step, now
    return rate


def check_finite(step: int, metrics: dict):
  """Raises on the first non-finite loss term, naming the step and the term."""
  for name, value in metrics.items():
    value = float(value)
    if not np.isfinite(value):
      raise FloatingPointError(
          f"non-finite {name} = {value} at step {step}; training stopped, the last saved "
          "checkpoint is left as it was")
