"""The paper's FAD tables for a set of generated pieces against a reference set.

Total generation: the Fréchet distance of the mixtures, and of each stem on its own.
Partial generation ("sub-FAD"): for every non-empty proper subset S of the stems (14 for four
stems), the distance between the sums of the stems in S, generated vs reference. Each subset
may come from its own generation run (S generated given the other stems), so the generated
audio can be one array for all subsets or one per subset.

Embeddings come from any `embed_fn(waveform [samples]) -> [n_windows, d]` (VGGish for FAD,
or `features.embed`); the windows of all pieces are pooled before the Gaussian fit. Tables
are written as markdown, CSV and a bar plot, labelled with the embedding's score label.
"""

import csv
import itertools
import os
from typing import Callable, Mapping, Sequence, Union

from absl import logging
import numpy as np

from msldm_jax import plotting  # noqa: F401  (selects the non-interactive matplotlib backend)
from msldm_jax import stems
from msldm_jax.evaluation import frechet

import matplotlib.pyplot as plt  # noqa: E402  (after plotting set the backend)

EmbedFn = Callable[[np.ndarray], np.ndarray]
MIXTURE = "mixture"


def subset_label(subset: Sequence[str]) -> str:
  """'bass+drums' for ('bass', 'drums')."""
  return "+".join(subset)


def proper_subsets(stem_names: Sequence[str] = stems.STEM_NAMES) -> list[tuple[str, ...]]:
  """Non-empty proper subsets in stem order, by size then position (14 for four stems)."""
  return [subset for size in range(1, len(stem_names))
          for subset in itertools.combinations(stem_names, size)]


def subset_sum(audio, subset: Sequence[str],
               stem_names: Sequence[str] = stems.STEM_NAMES) -> np.ndarray:
  """Sum of the stems in `subset`: `[pieces, stems, samples]` -> `[pieces, samples]`."""
  unknown = [s for s in subset if s not in stem_names]
  if unknown:
    raise ValueError(f"subset {tuple(subset)}: {unknown} not among stems {tuple(stem_names)}")
  indices = [list(stem_names).index(s) for s in subset]
  return np.asarray(audio)[:, indices].sum(axis=1)


def embed_pieces(waveforms, embed_fn: EmbedFn) -> np.ndarray:
  """Embeddings of every piece `[pieces, samples]`, pooled: `[sum of windows, d]`."""
  return np.concatenate([np.asarray(embed_fn(w)) for w in np.asarray(waveforms)])


def fad(generated_waveforms, reference_waveforms, embed_fn: EmbedFn) -> float:
  """Fréchet distance of the pooled embeddings of two sets of pieces `[pieces, samples]`."""
  return frechet.embedding_distance(embed_pieces(generated_waveforms, embed_fn),
                                    embed_pieces(reference_waveforms, embed_fn))


def total_generation_scores(generated, reference, embed_fn: EmbedFn,
                            stem_names: Sequence[str] = stems.STEM_NAMES
                            ) -> dict[str, float]:
  """{'mixture': FD of the mixtures, stem: FD of that stem} for `[pieces, stems, samples]`."""
  generated = stems.as_pieces(generated, stem_names, "generated", np.float32)
  reference = stems.as_pieces(reference, stem_names, "reference", np.float32)
  scores = {MIXTURE: fad(generated.sum(axis=1), reference.sum(axis=1), embed_fn)}
  for i, name in enumerate(stem_names):
    scores[name] = fad(generated[:, i], reference[:, i], embed_fn)
  logging.info("Total generation scores: %s", scores)
  return scores


def partial_generation_scores(generated: Union[np.ndarray, Mapping[str, np.ndarray]],
                              reference, embed_fn: EmbedFn,
                              stem_names: Sequence[str] = stems.STEM_NAMES, *,
                              mixture: bool = False) -> dict[str, float]:
  """{'bass+drums': FD, ...} for every proper subset S of the stems.

  `generated` is `[pieces, stems, samples]` used for every subset, or a mapping from
  `subset_label(S)` to the audio of the run that generated S given the other stems (every
  subset must be there).

  mixture=False scores the sum of the stems in S alone, generated vs reference: how good the
  generated part is. mixture=True scores the whole mixture of the run (the generated stems
  plus the given ones) against the reference mixtures, MSDM's sub-FAD: how well the new
  stems fit the given ones in the final mix.
  """
  reference = stems.as_pieces(reference, stem_names, "reference", np.float32)
  scores = {}
  for subset in proper_subsets(stem_names):
    label = subset_label(subset)
    if isinstance(generated, Mapping):
      if label not in generated:
        raise KeyError(f"generated audio has no entry {label!r}; it has {sorted(generated)}")
      audio = stems.as_pieces(generated[label], stem_names, f"generated[{label!r}]",
                              np.float32)
    else:
      audio = stems.as_pieces(generated, stem_names, "generated", np.float32)
    scored = stem_names if mixture else subset
    scores[label] = fad(subset_sum(audio, scored, stem_names),
                        subset_sum(reference, scored, stem_names), embed_fn)
  logging.info("Partial generation scores (%s): %s", "mixtures" if mixture else "subsets",
               scores)
  return scores


def write_table(directory: str, name: str, rows: Mapping[str, Mapping[str, float]],
                row_label: str, plot_label: str | None = None) -> dict[str, str]:
  """Writes `<name>.md` and `<name>.csv` of {row: {column: value}} (every row with the same
  columns, in the first row's order), and `<name>.png`, a grouped bar plot with y-axis
  `plot_label`, when that is given; returns the paths written."""
  rows = {row: dict(values) for row, values in rows.items()}
  columns = list(next(iter(rows.values()))) if rows else []
  for row, values in rows.items():
    if list(values) != columns:
      raise ValueError(f"table {name!r}: row {row!r} has columns {list(values)}, the first "
                       f"row has {columns}")
  os.makedirs(directory, exist_ok=True)
  paths = {ext: os.path.join(directory, f"{name}.{ext}") for ext in ("md", "csv")}
  with open(paths["md"], "w") as f:
    f.write(f"| {row_label} | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns)
            + "\n")
    for row, values in rows.items():
      f.write(f"| {row} | " + " | ".join(f"{values[c]:.4f}" for c in columns) + " |\n")
  with open(paths["csv"], "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow([row_label] + columns)
    for row, values in rows.items():
      writer.writerow([row] + [repr(float(values[c])) for c in columns])
  if plot_label is not None:
    paths["png"] = os.path.join(directory, f"{name}.png")
    _bar_plot(paths["png"], name, rows, columns, plot_label)
  logging.info("Wrote %s table to %s", name, paths["md"])
  return paths


def _bar_plot(path: str, title: str, rows: Mapping[str, Mapping[str, float]],
              columns: Sequence[str], ylabel: str):
  fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(rows) * len(columns) + 1.5), 3.5))
  width = 0.8 / len(columns)
  positions = np.arange(len(rows))
  for i, column in enumerate(columns):
    ax.bar(positions + (i - (len(columns) - 1) / 2) * width,
           [values[column] for values in rows.values()], width, label=column)
  ax.set_xticks(positions)
  ax.set_xticklabels(list(rows), rotation=45, ha="right")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(axis="y", alpha=0.3)
  if len(columns) > 1:
    ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def write_score_table(directory: str, name: str,
                      scores: Mapping[str, Union[float, Mapping[str, float]]],
                      score_label: str, row_label: str = "stems") -> dict[str, str]:
  """Writes `<name>.md`, `<name>.csv` and `<name>.png` (bar plot); returns their paths.

  `scores` maps rows to a score (one column, headed `score_label`) or to {column: score}
  (one column per key, every row with the same keys; headed '<column> (<score_label>)').
  """
  rows = {row: ({f"{c} ({score_label})": v for c, v in value.items()}
                if isinstance(value, Mapping) else {score_label: value})
          for row, value in scores.items()}
  return write_table(directory, name, rows, row_label, plot_label=score_label)
