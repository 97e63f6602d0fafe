"""A resumable iterator over epochs of any per-process tf.data view, feeding the mesh.

Serves every input of the project: the audio views of `data/pipeline.py` and the latent
store's batches (`latents/store.py`).
"""

from typing import Any, Callable, Mapping

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import tensorflow as tf

from msldm_jax.parallel import mesh as mesh_lib

# Key of evaluation batches: bool [batch], False on rows padding the final batch.
VALID = "valid"

# Keys of a position (`InputIterator.state`).
EPOCH = "epoch"
BATCH_IN_EPOCH = "batch_in_epoch"


def process_slot(process_index: int | None = None,
                 process_count: int | None = None) -> tuple[int, int]:
  """(index, count) of this process, or the given ones (tests emulate other processes)."""
  index = jax.process_index() if process_index is None else int(process_index)
  count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= index < count:
    raise ValueError(f"process_index={index} is outside [0, process_count={count})")
  return index, count


def _parse_position(position, process_index: int, process_count: int) -> tuple[int, int]:
  if position is None:
    return 0, 0
  if not isinstance(position, Mapping) or set(position) != {EPOCH, BATCH_IN_EPOCH}:
    raise ValueError(f"input position must be a dict with keys {EPOCH!r} and "
                     f"{BATCH_IN_EPOCH!r}, got {position!r}")
  values = []
  for key in (EPOCH, BATCH_IN_EPOCH):
    value = position[key]
    if isinstance(value, (list, tuple)):
      # The form `state()` gathers in a multi-process run: one entry per process.
      if len(value) != process_count:
        raise ValueError(f"input position {key!r} has {len(value)} per-process entries, but "
                         f"this run has {process_count} processes: {position!r}")
      value = value[process_index]
    if not isinstance(value, (int, np.integer)) or value < 0:
      raise ValueError(f"input position {key!r}={value!r} is not a non-negative integer")
    values.append(int(value))
  return values[0], values[1]


class InputIterator:
  """Batches of a view over epochs, with a JSON-serialisable position to resume from.

  `dataset_fn(epoch=e)` must return epoch e's finite dataset of this process's batches, e.g.
  `functools.partial(pipeline.vae_windows, dataset_dir, "train", data_config=config.data,
  batch_size=config.batch_size, train=True)`. Epochs follow each other from the position's
  epoch on (for ever when num_epochs is None; evaluation: num_epochs=1).

  Resuming: `InputIterator(dataset_fn, position=saved_state)` yields exactly the batches an
  uninterrupted iterator would have yielded after the saved one: it rebuilds the saved epoch
  (a pure function of seed and epoch) and skips `batch_in_epoch` batches. The skip runs the
  input pipeline for those batches (reading, windowing, shuffling; no transfer to devices),
  so a resume mid-epoch costs up to one epoch of input work at the pipeline's throughput.

  With a mesh, batches are global `jax.Array`s sharded over the mesh's data axis
  (`parallel.mesh.to_global_batch`); without one, this process's numpy batches.
  """

  def __init__(self, dataset_fn: Callable[..., tf.data.Dataset], *, mesh=None,
               position: Mapping[str, Any] | None = None, num_epochs: int | None = None):
    self._dataset_fn = dataset_fn
    self._mesh = mesh
    self._num_epochs = num_epochs
    self._epoch, self._batch_in_epoch = _parse_position(
        position, jax.process_index(), jax.process_count())
    self._iterator = None
    self._element_spec = None
    self._opened_at = 0
    self._yielded_since_open = 0
    self._checked_mesh = False

  def __iter__(self):
    return self

  def _open(self):
    ds = self._dataset_fn(epoch=self._epoch)
    if self._batch_in_epoch:
      logging.info("Resuming input at epoch %d: skipping %d batches.", self._epoch,
                   self._batch_in_epoch)
      ds = ds.skip(self._batch_in_epoch)
    self._element_spec = ds.element_spec
    self._iterator = ds.as_numpy_iterator()
    self._opened_at = self._batch_in_epoch
    self._yielded_since_open = 0

  def _next_local(self):
    """This process's next numpy batch, or None at the end of the last epoch."""
    while self._num_epochs is None or self._epoch < self._num_epochs:
      if self._iterator is None:
        self._open()
      try:
        batch = next(self._iterator)
      except StopIteration:
        if self._opened_at == 0 and self._yielded_since_open == 0 and self._num_epochs is None:
          # Without this, an epoch too small for one batch would loop here for ever.
          raise ValueError(f"epoch {self._epoch} of the input yielded no batch: the split "
                           "has fewer examples than one batch") from None
        self._epoch += 1
        self._batch_in_epoch = 0
        self._iterator = None
        continue
      self._batch_in_epoch += 1
      self._yielded_since_open += 1
      return batch
    return None

  def __next__(self):
    batch = self._next_local()
    if self._mesh is not None and jax.process_count() > 1 and self._num_epochs is not None:
      # Evaluation across processes: every process must take part in every step, but their
      # slices hold different numbers of batches. Processes that have finished feed
      # all-padding batches until every process has.
      any_left = multihost_utils.process_allgather(np.asarray(batch is not None)).any()
      if not any_left:
        raise StopIteration
      if batch is None:
        batch = self._padding_batch()
    if batch is None:
      raise StopIteration
    if self._mesh is None:
      return batch
    if not self._checked_mesh:
      rows = next(iter(batch.values())).shape[0]
      mesh_lib.local_batch_size(rows * jax.process_count(), self._mesh)  # Raises if uneven.
      self._checked_mesh = True
    return mesh_lib.to_global_batch(batch, self._mesh)

  def _padding_batch(self):
    spec = self._element_spec or self._dataset_fn(epoch=0).element_spec
    if VALID not in spec:
      raise ValueError("a finished process can only pad evaluation batches (with 'valid')")
    return {key: np.zeros(s.shape, s.dtype.as_numpy_dtype) for key, s in spec.items()}

  def state(self) -> dict[str, Any]:
    """The position after the last batch returned: {"epoch": e, "batch_in_epoch": k}.

    JSON-serialisable, for the trainer's checkpoint. In a multi-process run, processes are
    at different places in their slices, so this gathers every process's position (all
    processes must call it together, as they do when saving a checkpoint) and returns
    {"epoch": [e_0, ...], "batch_in_epoch": [k_0, ...]}, the same on every process; the
    constructor takes either form.
    """
    if jax.process_count() == 1:
      return {EPOCH: self._epoch, BATCH_IN_EPOCH: self._batch_in_epoch}
    gathered = multihost_utils.process_allgather(
        np.asarray([self._epoch, self._batch_in_epoch], np.int64))
    return {EPOCH: [int(v) for v in gathered[:, 0]],
            BATCH_IN_EPOCH: [int(v) for v in gathered[:, 1]]}
