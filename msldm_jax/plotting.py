"""Pictures people would rather see than read: spectrograms and loss curves (matplotlib Agg)."""

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


# zlib level 1 for the PNGs, not Pillow's 6: a spectrogram's noise-like pixels barely compress
# anyway, and at level 6 encoding was 40 % of a spectrogram figure's time (0.19 → 0.12 s a
# figure, files 1.4× larger; benchmarks/RESULTS.md, "PNG encoding, a sampling profile of the
# suite, and the elemental emitters' NaN narrowed").
_PNG_OPTIONS = {"compress_level": 1}


def save_figure(fig, target, dpi: int):
  """Writes `fig` as a PNG to `target` (a path or a binary file) and closes it."""
  fig.savefig(target, format="png", dpi=dpi, pil_kwargs=_PNG_OPTIONS)
  plt.close(fig)


def _log_spectrogram(waveform: np.ndarray, n_fft: int = 1024, hop: int = 256) -> np.ndarray:
  x = np.asarray(waveform, np.float64)
  if len(x) < n_fft:
    x = np.pad(x, (0, n_fft - len(x)))
  frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop] * np.hanning(n_fft)
  magnitude = np.abs(np.fft.rfft(frames, axis=-1)).T
  return 20 * np.log10(np.maximum(magnitude, 1e-5))


def spectrogram_figure(waveforms: dict, sample_rate: int, title: str = ""):
  """One row per named waveform ({'bass': x, ..., 'mix': y}), shared colour scale."""
  names = list(waveforms)
  height = 1.8 * len(names) + 0.6
  fig, axes = plt.subplots(len(names), 1, figsize=(10, height), squeeze=False)
  for ax, name in zip(axes[:, 0], names):
    spec = _log_spectrogram(waveforms[name])
    duration = len(waveforms[name]) / sample_rate
    ax.imshow(spec, origin="lower", aspect="auto", vmin=-80, vmax=40, cmap="magma",
              extent=(0, duration, 0, sample_rate / 2000))
    ax.set_ylabel(f"{name}\nkHz")
  axes[-1, 0].set_xlabel("seconds")
  if title:
    fig.suptitle(title)
  # Fixed margins (0.45 inch above and below, as fractions of the height) rather than
  # tight_layout, which draws the whole figure once more to measure it: a third of a
  # figure's time, and an evaluation saves one per piece and per partial-generation subset.
  fig.subplots_adjust(left=0.08, right=0.98, bottom=0.45 / height, top=1 - 0.45 / height,
                      hspace=0.35)
  return fig


def save_spectrograms(path: str, waveforms: dict, sample_rate: int, title: str = ""):
  save_figure(spectrogram_figure(waveforms, sample_rate, title), path, dpi=80)


def spectrogram_image(waveforms: dict, sample_rate: int, title: str = "") -> np.ndarray:
  """The figure as an [height, width, 3] uint8 array (for TensorBoard)."""
  fig = spectrogram_figure(waveforms, sample_rate, title)
  buffer = io.BytesIO()
  save_figure(fig, buffer, dpi=60)
  buffer.seek(0)
  return (plt.imread(buffer)[..., :3] * 255).astype(np.uint8)


def save_curves(path: str, curves: dict, xlabel: str = "step", ylabel: str = "loss",
                logy: bool = True, marks: dict | None = None):
  """curves: name -> (steps, values). marks: name -> (x, label), a dotted vertical line in
  that curve's colour at x (where its training changed, e.g. its GAN phase began)."""
  marks = marks or {}
  fig, ax = plt.subplots(figsize=(7, 4))
  for name, (steps, values) in curves.items():
    (line,) = ax.plot(steps, values, label=name)
    if name in marks:
      x, label = marks[name]
      ax.axvline(x, color=line.get_color(), linestyle=":", label=f"{name}: {label}")
  if logy:
    ax.set_yscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  save_figure(fig, path, dpi=80)
