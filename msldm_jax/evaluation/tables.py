"""The paper's distance tables for a set of generated pieces against a reference set.

Total generation: the distance of the mixtures, and of each stem on its own.
Partial generation ("sub-FAD"): for every non-empty proper subset S of the stems (14 for four
stems), the distance between the sums of the stems in S, generated vs reference. Each subset
may come from its own generation run (S generated given the other stems), so the generated
audio can be one array for all subsets or one per subset.

Embeddings come from any batched `embed_fn(pieces [n, samples]) -> [n, windows, d]` (musicnn
by default, VGGish, or the statistics embedding; `per_waveform` batches a one-piece
function). Every score is KAD and FD with a bootstrap interval and a floor
(`distance_scores`). Tables are written as markdown, CSV and a plot with the intervals,
labelled with the embedding that scored them.
"""

import csv
import itertools
import os
from typing import Callable, Mapping, Sequence, Union

from absl import logging
import numpy as np

from msldm_jax import plotting  # (also selects the non-interactive matplotlib backend)
from msldm_jax import stems
from msldm_jax.evaluation import distance_scores

import matplotlib.pyplot as plt  # noqa: E402  (after plotting set the backend)

# Pieces `[n, samples]` -> embeddings `[n, windows, d]`.
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
  """Embeddings `[pieces, windows, d]` of pieces `[pieces, samples]` (one call, batched)."""
  waveforms = np.asarray(waveforms, np.float32)
  embeddings = np.asarray(embed_fn(waveforms))
  if embeddings.ndim != 3 or embeddings.shape[0] != waveforms.shape[0]:
    raise ValueError(f"embedding of {waveforms.shape[0]} pieces gave shape {embeddings.shape}; "
                     "expected [pieces, windows, d]")
  if embeddings.shape[1] == 0:
    raise ValueError(f"pieces of {waveforms.shape[-1]} samples are shorter than one window "
                     "of the embedding")
  return embeddings


def per_waveform(embed_one: Callable[[np.ndarray], np.ndarray]) -> EmbedFn:
  """A batched EmbedFn from `embed_one(waveform [samples]) -> [windows, d]`."""
  return lambda waveforms: np.stack([np.asarray(embed_one(w)) for w in waveforms])


Scores = dict[str, distance_scores.Score]


def total_generation_scores(generated, reference, embed_fn: EmbedFn,
                            protocol: distance_scores.Protocol = distance_scores.Protocol(),
                            stem_names: Sequence[str] = stems.STEM_NAMES,
                            reconstructed=None) -> dict[str, Scores]:
  """{'mixture': scores of the mixtures, stem: scores of that stem} for
  `[pieces, stems, samples]`, each {measure: Score} (value, interval, floor). With
  stem_names ("mix",) (mixtures only) the one row is the mixture's. With `reconstructed`
  (the reference through the VAE, its shape), each Score's codec ceiling too
  (`distance_scores.score`): the mixture's is that of the reconstructed stems' sum."""
  generated = stems.as_pieces(generated, stem_names, "generated", np.float32)
  reference = stems.as_pieces(reference, stem_names, "reference", np.float32)
  if reconstructed is not None:
    reconstructed = stems.as_pieces(reconstructed, stem_names, "reconstructed", np.float32)
    if reconstructed.shape != reference.shape:
      raise ValueError(f"reconstructed {reconstructed.shape} must have the reference's shape "
                       f"{reference.shape}")

  def row(pick) -> Scores:
    return distance_scores.score(
        embed_pieces(pick(generated), embed_fn), embed_pieces(pick(reference), embed_fn),
        protocol,
        None if reconstructed is None else embed_pieces(pick(reconstructed), embed_fn))

  scores = {MIXTURE: row(lambda audio: audio.sum(axis=1))}
  if tuple(stem_names) == (stems.MIXTURE,):
    logging.info("Total generation: %s", _summary(scores))
    return scores
  for i, name in enumerate(stem_names):
    scores[name] = row(lambda audio, i=i: audio[:, i])
  logging.info("Total generation: %s", _summary(scores))
  return scores


def partial_generation_scores(generated: Union[np.ndarray, Mapping[str, np.ndarray]],
                              reference, embed_fn: EmbedFn,
                              protocol: distance_scores.Protocol = distance_scores.Protocol(),
                              stem_names: Sequence[str] = stems.STEM_NAMES, *,
                              mixture: bool = False) -> dict[str, Scores]:
  """{'bass+drums': {measure: Score}, ...} for every proper subset S of the stems.

  `generated` is `[pieces, stems, samples]` used for every subset, or a mapping from
  `subset_label(S)` to the audio of the run that generated S given the other stems (every
  subset must be there).

  mixture=False scores the sum of the stems in S alone, generated vs reference: how good the
  generated part is. mixture=True scores the whole mixture of the run (the generated stems
  plus the given ones) against the reference mixtures, MSDM's sub-FAD: how well the new
  stems fit the given ones in the final mix.
  """
  reference = stems.as_pieces(reference, stem_names, "reference", np.float32)
  reference_embeddings = {}
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
    scored = tuple(stem_names) if mixture else subset
    if scored not in reference_embeddings:
      reference_embeddings[scored] = embed_pieces(subset_sum(reference, scored, stem_names),
                                                  embed_fn)
    scores[label] = distance_scores.score(
        embed_pieces(subset_sum(audio, scored, stem_names), embed_fn),
        reference_embeddings[scored], protocol)
  logging.info("Partial generation (%s): %s", "mixtures" if mixture else "subsets",
               _summary(scores))
  return scores


def _summary(scores: Mapping[str, Scores]) -> dict[str, dict[str, str]]:
  return {row: {m: s.cell() for m, s in values.items()} for row, values in scores.items()}


def write_table(directory: str, name: str, rows: Mapping[str, Mapping[str, float]],
                row_label: str) -> dict[str, str]:
  """Writes `<name>.md` and `<name>.csv` of {row: {column: value}} (every row with the same
  columns, in the first row's order); returns the paths written."""
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
  logging.info("Wrote %s table to %s", name, paths["md"])
  return paths


def write_distance_table(directory: str, name: str,
                         scores: Mapping[str, Mapping[str, Scores]], embedding: str,
                         row_label: str = "stems", notes: Sequence[str] = ()) -> dict[str, str]:
  """Writes `<name>.md`, `<name>.csv` and `<name>.png` of distance scores; returns the paths.

  `scores` maps rows to {column: {measure: Score}} (a column is e.g. 'mixture' or 'generated
  stems'; one column for total generation). The markdown shows each measure as
  'value [95 % interval]' next to its floor (two halves of the real set), with the windows
  counted on each side; the CSV has every number in its own column; the plot draws each
  column's KAD with its interval and the floor as a band, so that a reader sees at a glance
  whether a difference is real.
  """
  rows = {row: dict(columns) for row, columns in scores.items()}
  first = next(iter(rows.values()))
  columns = list(first)
  measures = list(next(iter(first.values())))
  # The codec's ceiling beside the floor, where the scores have it (total generation).
  through_vae = any(score.through_vae is not None for columns_ in rows.values()
                    for by_measure in columns_.values() for score in by_measure.values())
  os.makedirs(directory, exist_ok=True)
  paths = {ext: os.path.join(directory, f"{name}.{ext}") for ext in ("md", "csv", "png")}
  with open(paths["md"], "w") as f:
    f.write(f"Embedding: {embedding}. Each score: value [bootstrap 95 % interval over pieces];"
            " floor: the same distance between two disjoint halves of the real set (what a "
            "perfect model gets at this sample size)."
            + (" Through the VAE: the first half's reconstructions by the system's VAE against"
               " the second half (what a generator decoding through that VAE can reach)."
               if through_vae else "") + "\n\n")
    for note in notes:
      f.write(f"{note}\n\n")
    header = [row_label]
    for column in columns:
      for measure in measures:
        prefix = f"{column}: " if len(columns) > 1 else ""
        header += [f"{prefix}{measure}", f"{prefix}{measure} floor"]
        if through_vae:
          header.append(f"{prefix}{measure} through the VAE")
    header.append("windows (generated / real)")
    f.write("| " + " | ".join(header) + " |\n|---|" + "---:|" * (len(header) - 1) + "\n")
    for row, values in rows.items():
      cells = [row]
      for column in columns:
        for measure in measures:
          cells += [values[column][measure].cell(), values[column][measure].floor_cell()]
          if through_vae:
            cells.append(values[column][measure].through_vae_cell())
      some = values[columns[0]][measures[0]]
      cells.append(f"{some.generated_windows} / {some.reference_windows}")
      f.write("| " + " | ".join(cells) + " |\n")
  fields = ("value", "low", "high", "floor", "floor_low", "floor_high", "through_vae",
            "through_vae_low", "through_vae_high", "generated_windows", "reference_windows",
            "note")
  with open(paths["csv"], "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow([row_label, "column", "measure", *fields])
    for row, values in rows.items():
      for column in columns:
        for measure in measures:
          record = values[column][measure].as_dict()
          writer.writerow([row, column, measure, *(record[k] for k in fields)])
  _interval_plot(paths["png"], f"{name} ({embedding})", rows, columns, measures[0])
  logging.info("Wrote %s table to %s", name, paths["md"])
  return paths


def _interval_plot(path: str, title: str, rows, columns: Sequence[str], measure: str):
  fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(rows) * len(columns) + 1.5), 3.5))
  width = 0.8 / len(columns)
  positions = np.arange(len(rows))
  for i, column in enumerate(columns):
    x = positions + (i - (len(columns) - 1) / 2) * width
    found = [(xi, values[column][measure]) for xi, values in zip(x, rows.values())
             if values[column][measure].value is not None]
    if found:
      xs, scores = zip(*found)
      # A percentile interval need not contain the value (a skewed bootstrap, few pieces),
      # and all draws may be undefined (NaN): such bars get no error line on that side.
      below = np.nan_to_num([max(s.value - s.low, 0.0) for s in scores])
      above = np.nan_to_num([max(s.high - s.value, 0.0) for s in scores])
      ax.bar(xs, [s.value for s in scores], width, label=column, yerr=[below, above],
             capsize=2)
    for xi, values in zip(x, rows.values()):
      score = values[column][measure]
      if score.floor is not None:
        ax.fill_between([xi - width / 2, xi + width / 2], score.floor_low, score.floor_high,
                        color="grey", alpha=0.6, linewidth=0, zorder=3)
      if score.through_vae is not None:
        ax.hlines(score.through_vae, xi - width / 2, xi + width / 2, color="black",
                  linewidth=2, zorder=4)
  through_vae = any(values[column][measure].through_vae is not None
                    for values in rows.values() for column in columns)
  ax.axhline(0.0, color="black", linewidth=0.5)
  ax.set_xticks(positions)
  ax.set_xticklabels(list(rows), rotation=45, ha="right")
  ax.set_ylabel(f"{measure} (grey: floor"
                + ("; black: real through the VAE)" if through_vae else ")"))
  ax.set_title(title)
  ax.grid(axis="y", alpha=0.3)
  if len(columns) > 1:
    ax.legend(fontsize="small")
  fig.tight_layout()
  plotting.save_figure(fig, path, dpi=80)
