r"""The mini Slakh: a small multi-stem dataset rendered offline from real scores.

  python -m msldm_jax.data.minislakh --out_dir=DIR [--num_pieces=N] [--seed=S] \
      [--max_seconds=X] [--workers=W] [--soundfont=FILE]

The project's embedded default data set, in Slakh2100's converted layout (reference §2):
`OUT/{train,validation,test}/TrackNNNNN/{bass,drums,guitar,piano}.wav`, 22050 Hz mono 16-bit
PCM, every stem of a track the same length, plus `OUT/minislakh.json` (settings, per-track
provenance, cache key).

Sources: the Bach chorales and other four-voice Bach movements of music21's bundled corpus,
the MusicXML files only (the corpus's Humdrum files duplicate some of them and its .rntxt
files are analyses, not scores), in sorted path order. A piece is used when it has parts named
Soprano, Alto, Tenor and Bass (names such as "Bass Continuo" or "Soprano 1" count by their
first word); other parts (horns, trumpets, timpani, obbligato strings, continuo) are left out.
Skipped: pieces without the four voices (the keyboard prelude BWV 846), and the few where all
four voices rest together for more than a bar (instrumental ritornellos, as in BWV 248.64-6,
over which the drums would play alone). Written repeats are played (music21's expandRepeats;
a piece where that fails is played as written). The full set: 404 pieces, about 5 hours.

Voices to stems, the same for every piece:
- bass   <- the bass voice, an octave down (where its lowest note stays at or above B0, the
            lowest string of a five-string bass), so that it sits in the bass guitar's range;
- guitar <- alto and tenor, the inner voices, as two-voice comping;
- piano  <- soprano and alto, the pianist's right hand. The alto is deliberately doubled so
            that both guitar and piano stems are polyphonic, as comping instruments are;
- drums  <- generated from the score's meter and phrase ends (see drum_patterns.py).
General-MIDI programs are drawn per piece from each class (1-based GM numbers: bass 33-40,
guitar 25-32, piano 1-8); drums use the standard kit on channel 10. Chorales carry no real
tempo, so one tempo per piece is drawn from 80-110 quarter notes per minute and used by every
stem; fermatas are not held, so the drum grid stays aligned with the other stems.

Everything random comes from a generator seeded by (seed, the piece's corpus path), so a
track does not depend on which other pieces are rendered or on the number of workers. Splits
are drawn by piece, 80/10/10, with every split non-empty from three pieces on; the corpus's
variants of one movement (bwv248.9-1 and bwv248.9-s) always share a split.

Audio: each stem is rendered alone by the fluidsynth CLI (reverb and chorus off, which leaves
it deterministic), as float, then downmixed to mono and scaled by a fixed gain per stem. The
MIDI files end TAIL_SECONDS after the last note-off and fluidsynth renders until its voices
have died out, so release tails are kept. Stems are zero-padded to the longest rendered stem;
trailing samples that are zero in every stem after 16-bit quantisation are then dropped
(never shorter than the score). A track whose stems would clip is scaled, all stems by one
factor, so relative levels hold; the factor is logged and recorded in the manifest.
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import tempfile
from typing import Any, Callable, Iterable, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np
import pretty_midi
import soundfile as sf
import tqdm

from msldm_jax import atomic_files
from msldm_jax import file_hashes
from msldm_jax import stems
from msldm_jax.data import drum_patterns

# Bump when a change alters the rendered bytes, so that old caches are not taken for new.
RENDERER_VERSION = 1
MANIFEST_NAME = "minislakh.json"
SPLITS = ("train", "validation", "test")
HELD_OUT_FRACTION = 0.1  # each of validation and test; the rest is train

VOICES = ("soprano", "alto", "tenor", "bass")
STEM_VOICES = {"bass": ("bass",), "guitar": ("alto", "tenor"), "piano": ("soprano", "alto")}
# 1-based General-MIDI program numbers, inclusive (pretty_midi's programs are 0-based).
GM_PROGRAMS = {"bass": (33, 40), "guitar": (25, 32), "piano": (1, 8)}
TEMPO_BPM = (80, 110)  # quarter notes per minute, inclusive
LOWEST_BASS_PITCH = 23  # B0

# Fixed per-stem gains on fluidsynth's output (rendered at FLUIDSYNTH_GAIN). Unity suits the
# default soundfont: over the full default set, stem peaks are bass 0.18-0.30, drums
# 0.33-0.45, guitar 0.21-0.44, piano 0.15-0.35 of full scale (no track needs scaling) and
# stem loudness is comparable (RMS about 0.03-0.08), which leaves the four-stem mixture headroom.
FLUIDSYNTH_GAIN = 1.0
STEM_GAIN = {"bass": 1.0, "drums": 1.0, "guitar": 1.0, "piano": 1.0}
# Headroom left when a track has to be scaled down to avoid clipping.
CLIP_TARGET_PEAK = 0.98
# Silence after the last note-off in every MIDI file, so that fluidsynth does not stop early.
TAIL_SECONDS = 1.0
MIDI_RESOLUTION = 960  # ticks per quarter: exact for sixteenths and triplets
# A harmless (undefined) controller: the event that carries a MIDI file's end past its notes.
_END_MARKER_CONTROLLER = 20

_TRACK_DIGITS = 5


def find_soundfont(path: str | None = None) -> str:
  """The General-MIDI soundfont to render with: `path`, or pretty_midi's TimGM6mb.sf2."""
  if path:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"soundfont not found: {path}")
    return os.path.abspath(path)
  default = os.path.join(os.path.dirname(pretty_midi.__file__), "TimGM6mb.sf2")
  if not os.path.isfile(default):
    raise FileNotFoundError(
        f"default soundfont {default} is missing (it ships with pretty_midi): reinstall "
        "pretty_midi or pass a General-MIDI .sf2 file with --soundfont")
  return default


def check_fluidsynth() -> str:
  """Path of the fluidsynth executable; a clear error when it is not installed."""
  path = shutil.which("fluidsynth")
  if path is None:
    raise FileNotFoundError(
        "the fluidsynth executable was not found on PATH; the mini Slakh renderer needs it: "
        "run `bash setup.sh` (it installs Debian's fluidsynth)")
  return path


def _fluidsynth_version(executable: str) -> str:
  result = subprocess.run([executable, "--version"], capture_output=True, text=True,
                          check=False)
  match = re.search(r"FluidSynth executable version (\S+)", result.stdout)
  return match.group(1) if match else "unknown"


# ---------------------------------------------------------------------------------------------
# Scores.


@dataclasses.dataclass(frozen=True)
class PieceScore:
  """What the renderer needs of one score; times in quarter notes from its start."""
  corpus_path: str  # relative to music21's corpus folder, e.g. 'bach/bwv1.6.mxl'
  # voice -> sorted (onset, duration, MIDI pitch) of every sounding note, ties merged.
  voices: dict[str, tuple[tuple[float, float, int], ...]]
  bars: tuple[drum_patterns.Bar, ...]
  fermatas: tuple[float, ...]
  end: float
  repeats_expanded: bool  # False also where the score has no repeats

  @property
  def final_onset(self) -> float:
    return max(note[0] for notes in self.voices.values() for note in notes)

  @property
  def time_signatures(self) -> list[str]:
    return sorted({f"{bar.numerator}/{bar.denominator}" for bar in self.bars})


def _corpus_root() -> str:
  # Imported here: music21 takes about a second to import, and only the renderer needs it.
  from music21 import common  # pylint: disable=g-import-not-at-top
  return str(common.getCorpusFilePath())


def candidate_scores() -> list[str]:
  """Corpus paths (relative to music21's corpus folder) of the candidate pieces, sorted."""
  from music21 import corpus  # pylint: disable=g-import-not-at-top
  root = _corpus_root()
  paths = [os.path.relpath(str(p), root) for p in corpus.getComposer("bach")]
  return sorted(p for p in paths if p.endswith((".mxl", ".xml")))


def _voice_of(part) -> str | None:
  words = re.findall(r"[a-z]+", (part.partName or "").lower())
  return words[0] if words and words[0] in VOICES else None


def read_piece(corpus_path: str) -> PieceScore | str:
  """Reads one corpus score; returns why it is skipped (a string) when it is not usable."""
  # pylint: disable-next=g-import-not-at-top
  from music21 import bar, converter, expressions, meter, repeat, spanner, stream
  path = os.path.join(_corpus_root(), corpus_path)
  try:
    score = converter.parse(path)
  except Exception as e:  # pylint: disable=broad-except
    return f"music21 cannot parse it: {e!r}"
  present = {_voice_of(part) for part in score.parts}
  missing = [v for v in VOICES if v not in present]
  if missing:
    return "no " + ", ".join(missing) + " part"
  # Copies dominate the reading time: drop the unused parts before expanding repeats, expand
  # only where there are repeats, and merge ties in place.
  for part in list(score.parts):
    if _voice_of(part) is None:
      score.remove(part)
  repeats_expanded = False
  if next(iter(score.recurse().getElementsByClass(
      (bar.Repeat, spanner.RepeatBracket, repeat.RepeatExpression))), None) is not None:
    try:
      score = score.expandRepeats()
      repeats_expanded = True
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("%s: cannot expand repeats (%r); playing it as written", corpus_path, e)

  voices = {v: [] for v in VOICES}
  fermatas = set()
  soprano = None
  for part in score.parts:
    voice = _voice_of(part)
    if voice is None:
      continue
    if voice == "soprano" and soprano is None:
      soprano = part
    part.stripTies(inPlace=True)
    for element in part.flatten().notesAndRests:
      onset = float(element.offset)
      if any(isinstance(e, expressions.Fermata) for e in element.expressions):
        fermatas.add(onset)
      duration = float(element.quarterLength)
      if element.isRest or duration <= 0:  # grace notes have no length
        continue
      for pitch in element.pitches:
        voices[voice].append((onset, duration, int(pitch.midi)))

  bars = []
  time_signature = None
  for measure in soprano.getElementsByClass(stream.Measure):
    if measure.timeSignature is not None:
      time_signature = measure.timeSignature
    elif time_signature is None:
      time_signature = (measure.getContextByClass(meter.TimeSignature) or
                        meter.TimeSignature("4/4"))
    bars.append(drum_patterns.Bar(
        offset=float(measure.offset), length=float(measure.duration.quarterLength),
        pad_left=float(measure.paddingLeft), numerator=int(time_signature.numerator),
        denominator=int(time_signature.denominator)))
  if not bars or not all(voices.values()):
    return "no measures or an empty voice"
  rest = _longest_tutti_rest(voices, bars)
  if rest is not None:
    return (f"the four voices rest together for {rest[1]:g} quarter notes from offset "
            f"{rest[0]:g}, longer than a bar (an instrumental passage no stem would play)")
  end = max(max(b.end for b in bars),
            max(on + dur for notes in voices.values() for on, dur, _ in notes))
  return PieceScore(
      corpus_path=corpus_path,
      voices={v: tuple(sorted(notes)) for v, notes in voices.items()},
      bars=tuple(bars), fermatas=tuple(sorted(fermatas)), end=end,
      repeats_expanded=repeats_expanded)


def _longest_tutti_rest(voices, bars) -> tuple[float, float] | None:
  """(start, length) of the longest rest of all voices together that outlasts its bar.

  Rests after the final chord do not count: the drums stop there too.
  """
  spans = sorted((on, on + dur) for notes in voices.values() for on, dur, _ in notes)
  longest = None
  sounding_until = 0.0
  for start, end in spans:
    gap = start - sounding_until
    if gap > drum_patterns.bar_at(bars, sounding_until).full_length + 1e-6 and (
        longest is None or gap > longest[1]):
      longest = (sounding_until, gap)
    sounding_until = max(sounding_until, end)
  return longest


def leading_measures(score: PieceScore, max_quarters: float) -> PieceScore:
  """The score's leading whole measures that end within `max_quarters`.

  At least one measure is kept, and more when a voice has not sounded yet, so that no stem
  is empty.
  """
  count = 0
  while count < len(score.bars) and score.bars[count].end <= max_quarters + 1e-6:
    count += 1
  count = max(1, count)
  while count < len(score.bars) and any(
      notes[0][0] >= score.bars[count - 1].end for notes in score.voices.values()):
    count += 1
  end = score.bars[count - 1].end
  voices = {voice: tuple((on, min(dur, end - on), p) for on, dur, p in notes if on < end)
            for voice, notes in score.voices.items()}
  return dataclasses.replace(score, voices=voices, bars=score.bars[:count],
                             fermatas=tuple(f for f in score.fermatas if f < end), end=end)


# ---------------------------------------------------------------------------------------------
# One track: choices, MIDI, audio.


def _piece_generators(seed: int, corpus_path: str) -> list[np.random.Generator]:
  """Independent generators (choices, drums, velocities) for one piece under one seed."""
  key = int.from_bytes(hashlib.sha256(corpus_path.encode()).digest()[:8], "little")
  children = np.random.SeedSequence([seed, key]).spawn(3)
  return [np.random.default_rng(child) for child in children]


def _merge_unisons(notes: list[tuple[float, float, int, int]]):
  """One MIDI channel cannot sound one pitch twice: a re-strike ends the earlier note."""
  notes = sorted(notes, key=lambda n: (n[2], n[0], -n[1]))
  merged = []
  for start, end, pitch, velocity in notes:
    if merged and merged[-1][2] == pitch and start < merged[-1][1]:
      previous = merged[-1]
      if start <= previous[0]:
        continue  # the same onset in two voices: keep the longer (sorted first)
      merged[-1] = (previous[0], start, pitch, previous[3])
    merged.append((start, end, pitch, velocity))
  return sorted(merged)


def _stem_midi(notes, program: int, is_drum: bool, end_seconds: float,
               bpm: float) -> pretty_midi.PrettyMIDI:
  midi = pretty_midi.PrettyMIDI(resolution=MIDI_RESOLUTION, initial_tempo=bpm)
  instrument = pretty_midi.Instrument(program=program, is_drum=is_drum)
  for start, end, pitch, velocity in notes:
    instrument.notes.append(pretty_midi.Note(velocity=velocity, pitch=pitch, start=start,
                                             end=end))
  instrument.control_changes.append(
      pretty_midi.ControlChange(number=_END_MARKER_CONTROLLER, value=0, time=end_seconds))
  midi.instruments.append(instrument)
  return midi


def _render_midi(midi: pretty_midi.PrettyMIDI, soundfont: str, workdir: str, name: str,
                 what: str) -> np.ndarray:
  """Renders one MIDI file with fluidsynth; mono float64 at the project's rate."""
  midi_path = os.path.join(workdir, name + ".mid")
  wav_path = os.path.join(workdir, name + ".wav")
  midi.write(midi_path)
  # Float output: our own quantisation later, and no dither. Reverb and chorus are off.
  command = [check_fluidsynth(), "-ni", "-q", "-R", "0", "-C", "0",
             "-g", str(FLUIDSYNTH_GAIN), "-r", str(stems.SAMPLE_RATE),
             "-O", "float", "-T", "wav", "-F", wav_path, soundfont, midi_path]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode != 0 or not os.path.isfile(wav_path):
    raise RuntimeError(
        f"fluidsynth failed on {what} (exit {result.returncode}): "
        f"{(result.stderr or result.stdout).strip()[-2000:]}")
  audio, rate = sf.read(wav_path, dtype="float64", always_2d=True)
  if rate != stems.SAMPLE_RATE:
    raise RuntimeError(f"fluidsynth rendered {what} at {rate} Hz, not {stems.SAMPLE_RATE}")
  return audio.mean(axis=1)


def _to_pcm16(audio: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(audio * 32767.0), -32768, 32767).astype(np.int16)


def plan_track(score: PieceScore, seed: int, max_seconds: float = 0.0) -> dict[str, Any]:
  """The choices for one piece and every stem's notes in seconds: deterministic in the seed.

  Returns a dict: bpm, programs (1-based GM), bass_octave_down, score (cut to max_seconds
  when > 0), score_seconds, notes (stem -> sorted (start, end, pitch, velocity)).
  """
  choices_rng, drums_rng, velocity_rng = _piece_generators(seed, score.corpus_path)
  bpm = int(choices_rng.integers(TEMPO_BPM[0], TEMPO_BPM[1] + 1))
  programs = {name: int(choices_rng.integers(low, high + 1))
              for name, (low, high) in GM_PROGRAMS.items()}
  seconds_per_quarter = 60.0 / bpm
  if max_seconds > 0:
    score = leading_measures(score, max_seconds / seconds_per_quarter)
  bass_shift = -12 if min(p for _, _, p in score.voices["bass"]) - 12 >= LOWEST_BASS_PITCH else 0

  notes = {}
  for stem, voices in STEM_VOICES.items():
    shift = bass_shift if stem == "bass" else 0
    events = []
    for voice in voices:
      for onset, duration, pitch in score.voices[voice]:
        accent = (0, 5, 10)[drum_patterns.beat_strength(score.bars, onset)]
        velocity = int(np.clip(76 + accent + velocity_rng.integers(-4, 5), 1, 127))
        events.append((onset * seconds_per_quarter, (onset + duration) * seconds_per_quarter,
                       pitch + shift, velocity))
    notes[stem] = _merge_unisons(events)
  hits = drum_patterns.drum_part(score.bars, score.fermatas, score.final_onset, drums_rng)
  # GM drum sounds ignore note-offs; a short note keeps repeated hits from overlapping.
  notes["drums"] = [(h.time * seconds_per_quarter, h.time * seconds_per_quarter + 0.05,
                     h.pitch, h.velocity) for h in hits]
  return dict(bpm=bpm, programs=programs, bass_octave_down=bass_shift != 0, notes=notes,
              score=score, score_seconds=score.end * seconds_per_quarter)


def render_track(score: PieceScore, track: str, split: str, out_dir: str, seed: int,
                 max_seconds: float, soundfont: str) -> dict[str, Any]:
  """Renders one piece into OUT/split/track/{stem}.wav; returns its manifest record."""
  plan = plan_track(score, seed, max_seconds)
  score = plan["score"]
  end_seconds = max(end for notes in plan["notes"].values() for _, end, _, _ in notes)
  end_seconds = max(end_seconds, plan["score_seconds"]) + TAIL_SECONDS

  audio = {}
  with tempfile.TemporaryDirectory(prefix="minislakh_") as workdir:
    for stem in stems.STEM_NAMES:
      is_drum = stem == "drums"
      program = 0 if is_drum else plan["programs"][stem] - 1
      midi = _stem_midi(plan["notes"][stem], program, is_drum, end_seconds, plan["bpm"])
      audio[stem] = STEM_GAIN[stem] * _render_midi(
          midi, soundfont, workdir, stem, f"{stem} of {score.corpus_path} ({track})")

  length = max(len(a) for a in audio.values())
  audio = {s: np.pad(a, (0, length - len(a))) for s, a in audio.items()}
  peak = max(float(np.max(np.abs(a))) for a in audio.values())
  # Above 1.0 the 16-bit conversion would clip; one factor for all stems keeps their balance.
  scale = CLIP_TARGET_PEAK / peak if peak > 1.0 else 1.0
  pcm = {s: _to_pcm16(a * scale) for s, a in audio.items()}
  nonzero = [np.flatnonzero(p) for p in pcm.values()]
  last = max((int(n[-1]) + 1 for n in nonzero if n.size), default=0)
  score_samples = int(math.ceil(plan["score_seconds"] * stems.SAMPLE_RATE))
  length = min(length, max(last, score_samples))

  track_dir = os.path.join(out_dir, split, track)
  os.makedirs(track_dir, exist_ok=True)
  for stem in stems.STEM_NAMES:
    sf.write(os.path.join(track_dir, stem + ".wav"), pcm[stem][:length], stems.SAMPLE_RATE,
             subtype="PCM_16", format="WAV")
  return dict(
      track=track, split=split, corpus_path=score.corpus_path, bpm=plan["bpm"],
      programs={s: p for s, p in plan["programs"].items()},
      program_names={s: pretty_midi.program_to_instrument_name(p - 1)
                     for s, p in plan["programs"].items()},
      bass_octave_down=plan["bass_octave_down"],
      repeats_expanded=score.repeats_expanded, time_signatures=score.time_signatures,
      score_seconds=round(plan["score_seconds"], 6), num_samples=int(length),
      gain_scale=scale, peaks={s: round(float(np.max(np.abs(audio[s]))) * scale, 6)
                               for s in stems.STEM_NAMES})


# ---------------------------------------------------------------------------------------------
# The data set.


def _split_group(corpus_path: str) -> str:
  """Variants of one movement share a group: 'bach/bwv248.9-s.mxl' -> 'bach/bwv248.9'."""
  return re.sub(r"-[^./]*$", "", os.path.splitext(corpus_path)[0])


def assign_splits(corpus_paths: Sequence[str], seed: int) -> list[str]:
  """The split of each piece: 80/10/10 by piece, each split non-empty from 3 pieces on."""
  n = len(corpus_paths)
  if n < 3:
    return list(SPLITS[:n])
  groups = sorted({_split_group(p) for p in corpus_paths})
  if len(groups) < 3:
    logging.warning("fewer than 3 distinct movements: splitting variants of one movement")
    groups = sorted(corpus_paths)
    key = lambda p: p  # noqa: E731
  else:
    key = _split_group
  order = np.random.default_rng(seed).permutation(len(groups))
  held_out = max(1, int(math.floor(HELD_OUT_FRACTION * len(groups) + 0.5)))
  split_of = {}
  for rank, index in enumerate(order):
    split_of[groups[index]] = ("validation" if rank < held_out else
                               "test" if rank < 2 * held_out else "train")
  return [split_of[key(p)] for p in corpus_paths]


def _ordered_map(pool, function: Callable, items: Sequence, desc: str) -> Iterable:
  """`function` over `items` in order, in the pool when there is one, with a progress bar."""
  results = map(function, items) if pool is None else pool.map(function, items)
  return tqdm.tqdm(results, total=len(items), desc=desc, unit="piece", dynamic_ncols=True)


def _select_pieces(num_pieces: int, pool) -> list[PieceScore]:
  """The first `num_pieces` usable pieces in corpus order (all of them for 0)."""
  candidates = candidate_scores()
  if not candidates:
    raise RuntimeError(f"music21's corpus at {_corpus_root()} holds no Bach MusicXML scores")
  selected = []
  next_index = 0
  while next_index < len(candidates) and (num_pieces == 0 or len(selected) < num_pieces):
    # Read only as many as are still wanted: a small data set does not parse the corpus.
    wanted = len(candidates) if num_pieces == 0 else num_pieces - len(selected)
    batch = candidates[next_index:next_index + wanted]
    next_index += len(batch)
    for path, result in zip(batch, _ordered_map(pool, read_piece, batch, "reading scores")):
      if isinstance(result, str):
        logging.info("skipping %s: %s", path, result)
      else:
        selected.append(result)
  if num_pieces and len(selected) < num_pieces:
    logging.warning("asked for %d pieces; the corpus has %d usable ones", num_pieces,
                    len(selected))
  return selected[:num_pieces] if num_pieces else selected


def _track_paths(out_dir: str, record: dict[str, Any]) -> list[str]:
  return [os.path.join(out_dir, record["split"], record["track"], s + ".wav")
          for s in stems.STEM_NAMES]


def _summary(out_dir: str, tracks: Sequence[dict[str, Any]], cached: bool) -> dict[str, Any]:
  return dict(
      out_dir=out_dir, num_tracks=len(tracks), cached=cached,
      tracks_per_split={s: sum(t["split"] == s for t in tracks) for s in SPLITS},
      total_seconds=sum(t["num_samples"] for t in tracks) / stems.SAMPLE_RATE)


def _read_manifest(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"cannot read the mini Slakh manifest {path}: {e}") from None
  if not isinstance(manifest, dict) or "settings" not in manifest:
    raise ValueError(f"{path} is not a mini Slakh manifest (no 'settings' key)")
  return manifest


def render_dataset(out_dir: str, num_pieces: int = 0, seed: int = 0, max_seconds: float = 0.0,
                   soundfont: str | None = None, workers: int | None = None) -> dict[str, Any]:
  """Renders the mini Slakh into `out_dir`, or finds it there already rendered.

  Args:
    out_dir: the data set's root; created when missing. A non-empty folder must hold a
      manifest of this renderer with the same settings.
    num_pieces: how many pieces, the first usable ones in corpus order; 0 for all.
    seed: the one seed of every random choice (programs, tempo, drums, splits); >= 0.
    max_seconds: when > 0, each piece keeps only its leading whole measures that fit in this
      many seconds (for tests and CI); audio itself is never cut.
    soundfont: a General-MIDI .sf2 file; None for pretty_midi's TimGM6mb.sf2.
    workers: processes rendering in parallel; None for one per CPU. Results do not depend
      on it.

  Returns:
    A summary: out_dir, num_tracks, tracks_per_split, total_seconds, cached (True when
    nothing had to be rendered).
  """
  if num_pieces < 0:
    raise ValueError(f"num_pieces must be >= 0 (0: all pieces), got {num_pieces}")
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed}")
  if max_seconds < 0:
    raise ValueError(f"max_seconds must be >= 0 (0: no limit), got {max_seconds}")
  workers = (os.cpu_count() or 1) if workers is None else int(workers)
  if workers < 1:
    raise ValueError(f"workers must be >= 1, got {workers}")
  executable = check_fluidsynth()
  soundfont = find_soundfont(soundfont)
  settings = dict(renderer_version=RENDERER_VERSION, seed=int(seed), num_pieces=int(num_pieces),
                  max_seconds=float(max_seconds), soundfont_sha256=file_hashes.sha256(soundfont))

  out_dir = os.path.abspath(out_dir)
  manifest_path = os.path.join(out_dir, MANIFEST_NAME)
  if os.path.isfile(manifest_path):
    manifest = _read_manifest(manifest_path)
    if manifest["settings"] != settings:
      differing = sorted(k for k in set(settings) | set(manifest["settings"])
                         if manifest["settings"].get(k) != settings.get(k))
      raise ValueError(
          f"{out_dir} already holds a mini Slakh rendered with other settings "
          f"({manifest_path}: " + ", ".join(
              f"{k}={manifest['settings'].get(k)!r}, asked {settings.get(k)!r}"
              for k in differing) + "); choose another out_dir or delete that one")
    tracks = manifest.get("tracks", [])
    if manifest.get("complete") and all(
        os.path.isfile(p) for t in tracks for p in _track_paths(out_dir, t)):
      logging.info("mini Slakh already rendered in %s (%s); nothing to do", out_dir,
                   MANIFEST_NAME)
      return _summary(out_dir, tracks, cached=True)
    logging.warning("%s: an earlier render with these settings did not finish; rendering "
                    "again", manifest_path)
  elif os.path.isdir(out_dir) and os.listdir(out_dir):
    raise ValueError(
        f"{out_dir} is not empty and holds no {MANIFEST_NAME}: refusing to render into it; "
        "choose another out_dir or empty it")
  os.makedirs(out_dir, exist_ok=True)

  manifest = dict(settings=settings, complete=False, soundfont=soundfont,
                  sample_rate=stems.SAMPLE_RATE, stems=list(stems.STEM_NAMES),
                  fluidsynth_version=_fluidsynth_version(executable),
                  music21_version=_music21_version(), tracks=[])
  atomic_files.write_json_atomic(manifest_path, manifest, sort_keys=True)

  pool = None
  if workers > 1:
    # spawn, not fork: the caller may have started JAX or TF threads, which fork would copy.
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
  try:
    pieces = _select_pieces(num_pieces, pool)
    if not pieces:
      raise RuntimeError("no usable piece found in music21's corpus")
    splits = assign_splits([p.corpus_path for p in pieces], seed)
    tracks_names = [f"Track{i + 1:0{_TRACK_DIGITS}d}" for i in range(len(pieces))]
    logging.info("rendering %d pieces into %s with %d worker(s)", len(pieces), out_dir,
                 workers)
    jobs = [functools.partial(render_track, piece, track, split, out_dir, seed, max_seconds,
                              soundfont)
            for piece, track, split in zip(pieces, tracks_names, splits)]
    tracks = list(_ordered_map(pool, _call, jobs, "rendering"))
  finally:
    if pool is not None:
      pool.shutdown(cancel_futures=True)
  for record in tracks:
    if record["gain_scale"] != 1.0:
      logging.info("%s (%s): stems would clip; all four scaled by %.4f", record["track"],
                   record["corpus_path"], record["gain_scale"])

  manifest.update(complete=True, tracks=tracks, summary=_summary(out_dir, tracks, False))
  atomic_files.write_json_atomic(manifest_path, manifest, sort_keys=True)
  summary = _summary(out_dir, tracks, cached=False)
  logging.info("mini Slakh: %d tracks (%s), %.2f hours, in %s", summary["num_tracks"],
               ", ".join(f"{k} {v}" for k, v in summary["tracks_per_split"].items()),
               summary["total_seconds"] / 3600, out_dir)
  return summary


def _call(job: Callable[[], Any]) -> Any:
  return job()


def _music21_version() -> str:
  import music21  # pylint: disable=g-import-not-at-top
  return str(music21.__version__)


# ---------------------------------------------------------------------------------------------
# Command line.

def _define_flags():
  # Defined only when run as a program: importing the library must not claim flag names
  # (--seed, --workers) that other entry points may define.
  flags.DEFINE_string("out_dir", None, "Where to write the data set.")
  flags.DEFINE_integer("num_pieces", 0, "How many pieces; 0 for all.")
  flags.DEFINE_integer("seed", 0, "Seed of every random choice.")
  flags.DEFINE_float("max_seconds", 0.0, "Keep each piece's leading whole measures within "
                     "this many seconds; 0 for whole pieces.")
  flags.DEFINE_integer("workers", None, "Parallel processes; default: one per CPU.")
  flags.DEFINE_string("soundfont", None,
                      "General-MIDI .sf2 file; default: pretty_midi's TimGM6mb.sf2.")
  flags.mark_flags_as_required(["out_dir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  values = flags.FLAGS
  summary = render_dataset(values.out_dir, num_pieces=values.num_pieces, seed=values.seed,
                           max_seconds=values.max_seconds, soundfont=values.soundfont,
                           workers=values.workers)
  logging.info("summary: %s", json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
