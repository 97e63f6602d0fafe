"""musicnn: parity with the shipped TF1 graph, the librosa frontend, loading and tagging.

The reference is the ORIGINAL network: the `.meta` graph shipped in the musicnn 0.1.0 package
(`pip install --no-deps musicnn==0.1.0`, done by setup.sh), run by TensorFlow with the
checkpoint's values, not a re-implementation. The package's Python modules need TF1 and are
never imported. `tf.compat.v1.train.import_meta_graph` fails on the whole graph under TF 2.x
(its training-gradient nodes carry inconsistent `_output_shapes`), so only the inference
subgraph is imported, its variables replaced by constants read from the checkpoint prefix
(the shipped `checkpoint` file points at the authors' disk).
"""

import functools
import tempfile

import numpy as np
import pytest

from msldm_jax import stems
from msldm_jax.data import drum_patterns
from msldm_jax.data import minislakh
from msldm_jax.evaluation import musicnn

INSTALL_COMMAND = "pip install --no-deps musicnn==0.1.0"
# Output nodes of the shipped graph: tf.nn.sigmoid of the logits, and the batch norm after
# the 200-unit dense layer (the package's 'penultimate' feature). The patch input is
# model/Placeholder; model/Placeholder_1 is the training labels, model/Placeholder_2 is_training.
SIGMOID_NODE = "model/Sigmoid"
PENULTIMATE_NODE = "model/batch_normalization_10/batchnorm/add_1"
INPUT_NODE = "model/Placeholder"
IS_TRAINING_NODE = "model/Placeholder_2"
INSTRUMENT_TAGS = ("guitar", "piano", "drums", "strings", "harpsichord", "violin", "flute",
                   "sitar", "harp", "cello")
RENDER_SECONDS = 6.2  # Two 3 s patches of notes, plus the release.


def _relative_error(ours, reference):
  return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def _reference_session(prefix: str):
  """A TF session running the shipped inference graph with the checkpoint's values."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  meta_graph = tf.compat.v1.MetaGraphDef()
  with open(prefix + ".meta", "rb") as f:
    meta_graph.ParseFromString(f.read())
  inference = tf.compat.v1.graph_util.extract_sub_graph(
      meta_graph.graph_def, [SIGMOID_NODE, PENULTIMATE_NODE])
  values = musicnn.read_checkpoint(prefix)
  graph_def = tf.compat.v1.GraphDef()
  for node in inference.node:
    copy = graph_def.node.add()
    if node.op == "VariableV2":
      copy.name, copy.op = node.name, "Const"
      copy.attr["dtype"].type = node.attr["dtype"].type
      copy.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(values[node.name]))
    else:
      copy.CopyFrom(node)
      if "_output_shapes" in copy.attr:
        del copy.attr["_output_shapes"]
  graph = tf.Graph()
  with graph.as_default():
    tf.compat.v1.import_graph_def(graph_def, name="")
  return tf.compat.v1.Session(graph=graph)


def _render(name: str, notes, program: int, is_drum: bool, workdir: str) -> np.ndarray:
  # The mini dataset's renderer (fluidsynth CLI, pretty_midi's General-MIDI soundfont).
  # pylint: disable=protected-access
  midi = minislakh._stem_midi(notes, program, is_drum, RENDER_SECONDS + 0.5, 120)
  return minislakh._render_midi(midi, minislakh.find_soundfont(), workdir, name,
                                name).astype(np.float32)


def _arpeggio(transpose: int):
  chords = ((60, 64, 67), (57, 60, 64), (53, 57, 60), (55, 59, 62))
  notes = []
  for i, start in enumerate(np.arange(0.0, RENDER_SECONDS, 0.25)):
    pitch = chords[(i // 4) % 4][i % 3] + transpose
    notes += [(start, start + 0.5, pitch, 90), (start, start + 0.5, pitch - 12, 70)]
  return notes


def _groove():
  notes = []
  for i, start in enumerate(np.arange(0.0, RENDER_SECONDS, 0.25)):
    notes.append((start, start + 0.1, drum_patterns.CLOSED_HAT, 80))
    if i % 4 in (0, 2):
      notes.append((start, start + 0.1, (drum_patterns.KICK, drum_patterns.SNARE)[i % 4 // 2],
                    110))
  return notes


@pytest.fixture(scope="module")
def rendered():
  """Guitar, piano and drum stems at the project's rate (mono float32)."""
  minislakh.check_fluidsynth()
  with tempfile.TemporaryDirectory() as workdir:
    audio = {"guitar": _render("guitar", _arpeggio(-12), 25, False, workdir),
             "piano": _render("piano", _arpeggio(0), 0, False, workdir),
             "drums": _render("drums", _groove(), 0, True, workdir)}
  length = min(len(a) for a in audio.values())
  return {name: a[:length] for name, a in audio.items()}


def _square_wave(seconds: float, sample_rate: int) -> np.ndarray:
  t = np.arange(int(seconds * sample_rate)) / sample_rate
  return np.sign(np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)


@pytest.mark.parametrize("model", musicnn.MODELS)
def test_matches_the_shipped_tf_graph(model, rendered):
  loaded = musicnn.load(model)
  waveforms = np.stack(list(rendered.values()) + [sum(rendered.values())])
  patches = musicnn.patches(waveforms, stems.SAMPLE_RATE)
  patches = np.concatenate([patches.reshape((-1,) + patches.shape[2:]),
                            musicnn.patches(_square_wave(3.1, 16000)[None], 16000)[0]])
  assert patches.shape == (9, musicnn.PATCH_FRAMES, musicnn.N_MELS)

  with _reference_session(loaded.checkpoint) as session:
    penultimate, probabilities = session.run(
        [PENULTIMATE_NODE + ":0", SIGMOID_NODE + ":0"],
        {INPUT_NODE + ":0": patches, IS_TRAINING_NODE + ":0": False})
  ours_penultimate, ours_probabilities = musicnn.apply_patches(loaded, patches)

  # Measured (float32, XLA:CPU vs TF 2.21 CPU, max |difference| / max |reference|):
  # MSD penultimate 1.1e-6, probabilities 5.3e-7; MTT 9.4e-7 and 2.7e-7.
  assert _relative_error(ours_penultimate, penultimate) < 1e-4
  assert _relative_error(ours_probabilities, probabilities) < 1e-4


def test_frontend_matches_librosa():
  import librosa  # pylint: disable=g-import-not-at-top
  assert musicnn.PATCH_FRAMES == librosa.time_to_frames(
      musicnn.PATCH_SECONDS, sr=16000, n_fft=512, hop_length=256) + 1
  sr = musicnn.SAMPLE_RATE
  t = np.arange(int(7.3 * sr)) / sr
  rng = np.random.default_rng(0)
  audio = (0.3 * np.sin(2 * np.pi * 220 * t) * np.exp(-3 * (t % 0.5))
           + 0.2 * np.sign(np.sin(2 * np.pi * 3 * t)) * np.sin(2 * np.pi * 1500 * t)
           + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
  audio[:4000] *= 1e-3  # Quiet: mel powers in float16's subnormal range.

  # As musicnn's extractor.batch_data (librosa's defaults, so centring pads as the installed
  # librosa does), with the logarithm in float32.
  mel = librosa.feature.melspectrogram(y=audio, sr=sr, hop_length=256, n_fft=512,
                                       n_mels=96).T
  expected = np.log10(10000 * mel.astype(np.float16).astype(np.float32) + 1)

  ours_mel = musicnn.mel_power(audio)
  assert ours_mel.shape == mel.shape
  assert _relative_error(ours_mel, mel) < 1e-5
  ours = musicnn.log_mel(audio)
  # The float16 rounding turns float32 noise into a whole float16 step (< 5e-4 in the log)
  # where a value lies near a rounding tie: measured, 21 of 43 872 values.
  difference = np.abs(ours - expected)
  assert difference.max() < 5e-4
  assert np.mean(difference > 1e-5) < 1e-3

  patches = musicnn.patches_16k(audio[None])
  assert patches.shape == (1, 2, 187, 96)  # 457 frames: the trailing 83 are dropped.
  np.testing.assert_array_equal(patches[0].reshape(-1, 96), ours[:2 * 187])


def test_loud_input_gives_finite_outputs():
  loud = np.stack([_square_wave(3.5, 16000),
                   8.0 * np.random.default_rng(1).uniform(-1, 1, 56000).astype(np.float32)])
  # The package's float16 logarithm overflows on these (so its tags would be NaN).
  with np.errstate(over="ignore"):
    package_log = np.log10(10000 * musicnn.mel_power(loud).astype(np.float16) + 1)
  assert np.isinf(package_log).any()
  loaded = musicnn.load(musicnn.TAGGER)
  assert np.isfinite(musicnn.embed_batch(loaded, loud, 16000)).all()
  assert np.isfinite(musicnn.tag_batch(loaded, loud, 16000)).all()


def test_short_input_gives_zero_patches():
  loaded = musicnn.load()
  shortest = (musicnn.PATCH_FRAMES - 1) * musicnn.HOP_LENGTH  # Samples at 16 kHz for 1 patch.
  assert musicnn.embed_batch(loaded, np.zeros((2, shortest - 1)), 16000).shape == (2, 0, 200)
  assert musicnn.tag_batch(loaded, np.zeros((3, 0)), 16000).shape == (3, 0, 50)
  assert musicnn.embed(loaded, np.zeros(int(2.9 * 44100)), 44100).shape == (0, 200)
  assert musicnn.embed_batch(loaded, np.zeros((1, shortest)), 16000).shape == (1, 1, 200)


def test_embed_is_an_evaluation_embed_fn(rendered):
  loaded = musicnn.load()
  assert musicnn.load() is loaded  # Cached per model.
  waveforms = np.stack([rendered["guitar"], rendered["drums"]])
  batch = musicnn.embed_batch(loaded, waveforms, stems.SAMPLE_RATE)
  assert batch.shape == (2, 2, musicnn.EMBEDDING_DIM) and batch.dtype == np.float32
  embed_fn = functools.partial(musicnn.embed, loaded, sample_rate=stems.SAMPLE_RATE)
  # One waveform alone (its patches padded differently in the network's batch) gives the same.
  np.testing.assert_allclose(embed_fn(waveforms[1]), batch[1], rtol=1e-5, atol=1e-5)
  # [channels, samples] is averaged to mono.
  np.testing.assert_allclose(embed_fn(np.stack([waveforms[0], waveforms[0]])), batch[0],
                             rtol=1e-5, atol=1e-5)


def test_missing_or_corrupt_checkpoint_is_one_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError) as missing:
    musicnn.load(musicnn.TAGGER, directory=tmp_path)
  assert str(tmp_path) in str(missing.value) and INSTALL_COMMAND in str(missing.value)

  for suffix in (".index", ".data-00000-of-00001"):
    (tmp_path / suffix).write_bytes(b"not a checkpoint" * 64)
  with pytest.raises(ValueError) as corrupt:
    musicnn.load(musicnn.TAGGER, directory=tmp_path)
  assert str(tmp_path) in str(corrupt.value) and INSTALL_COMMAND in str(corrupt.value)


def test_tagger_tells_instruments_apart(rendered):
  # The shipped graph ranks these stems the same way (guitar 0.72 over piano 0.32; piano 0.98;
  # drums 0.23 over guitar 0.05: mean MTT probabilities over the two patches).
  loaded = musicnn.load(musicnn.TAGGER)
  names = list(rendered)
  probabilities = musicnn.tag_batch(loaded, np.stack([rendered[n] for n in names]),
                                    stems.SAMPLE_RATE).mean(axis=1)
  columns = [musicnn.MTT_LABELS.index(tag) for tag in INSTRUMENT_TAGS]
  for name, scores in zip(names, probabilities[:, columns]):
    ranked = [INSTRUMENT_TAGS[i] for i in np.argsort(-scores)]
    assert ranked[0] == name, f"{name} stem: instrument tags ranked {ranked[:3]}"
