"""Drum parts for scores that have none: a groove from the meter, fills into new phrases.

The mini dataset's scores (Bach chorales) have no percussion, but the four-stem layout needs a
drum stem that plays WITH the other stems. So the part is derived from the score itself:

- the groove follows each bar's time signature: kick on the strong beats, snare on the
  backbeats, hi-hat (or ride) on every eighth (or every beat), so hits sit on the score's
  beat grid, pickups and bars split by repeats included;
- phrase ends are the fermatas (chorales mark every phrase end with one); the downbeat after a
  fermata starts a new phrase and gets a crash, and the beat or two before it often a fill.
  A score without fermatas gets a phrase every 4 or 8 bars;
- the part ends with a crash on the final chord and stays silent while it rings.

Every choice that varies (style, fills, ghost notes, velocities) comes from the generator the
caller passes, so the same seed gives the same part. Times are in quarter notes from the start
of the score; the caller converts them with its tempo.
"""

import bisect
import dataclasses
from typing import Sequence

import numpy as np

# General MIDI percussion keys (channel 10).
KICK = 36
SNARE = 38
FLOOR_TOM = 41
CLOSED_HAT = 42
LOW_TOM = 45
OPEN_HAT = 46
MID_TOM = 47
CRASH = 49
HIGH_TOM = 50
RIDE = 51

# Fills descend over the kit, as drummers' fills commonly do.
_TOMS_DOWN = (HIGH_TOM, MID_TOM, LOW_TOM, FLOOR_TOM)

# Positions closer than this (in quarter notes) count as equal: score offsets are sums of
# binary and triplet fractions turned into floats.
_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class Bar:
  """One written measure, placed on the score's time line (all lengths in quarter notes)."""
  offset: float      # where the written measure starts
  length: float      # its written length: shorter than a full bar for pickups and split bars
  pad_left: float    # how far into a full bar it starts (a pickup's missing beats)
  numerator: int
  denominator: int

  @property
  def compound(self) -> bool:
    # 6/8, 9/8, 12/8: the beat is a dotted quarter (three eighths).
    return self.denominator == 8 and self.numerator % 3 == 0 and self.numerator > 3

  @property
  def beat(self) -> float:
    return 1.5 if self.compound else 4.0 / self.denominator

  @property
  def beats_per_bar(self) -> int:
    return self.numerator // 3 if self.compound else self.numerator

  @property
  def full_length(self) -> float:
    return self.beat * self.beats_per_bar

  @property
  def downbeat(self) -> float:
    """Where beat 1 of this bar falls (before `offset` for a pickup)."""
    return self.offset - self.pad_left

  @property
  def end(self) -> float:
    return self.offset + self.length

  @property
  def has_downbeat(self) -> bool:
    return self.pad_left < _EPS and self.length > _EPS


@dataclasses.dataclass(frozen=True)
class DrumHit:
  time: float      # quarter notes from the start of the score
  pitch: int       # General MIDI percussion key
  velocity: int    # 1..127


@dataclasses.dataclass(frozen=True)
class Style:
  """The per-piece choices that make one drum part differ from another."""
  timekeeper: int          # CLOSED_HAT or RIDE
  timekeeper_step: float   # 0.5: eighths; 1.0: quarters (whole beats in compound bars)
  extra_kick: bool         # a kick on the eighth before the mid-bar strong beat
  ghost_probability: float
  open_hat_every: int      # bars; 0: never
  fill_probability: float
  bars_per_phrase: int     # phrase length when the score has no fermatas


def choose_style(rng: np.random.Generator) -> Style:
  return Style(
      timekeeper=int(rng.choice([CLOSED_HAT, CLOSED_HAT, RIDE])),
      timekeeper_step=float(rng.choice([0.5, 0.5, 1.0])),
      extra_kick=bool(rng.random() < 0.5),
      ghost_probability=float(rng.choice([0.0, 0.1, 0.25])),
      open_hat_every=int(rng.choice([0, 2, 4])),
      fill_probability=float(rng.uniform(0.5, 0.9)),
      bars_per_phrase=int(rng.choice([4, 8])),
  )


def bar_at(bars: Sequence[Bar], time: float) -> Bar:
  """The bar that holds `time` (the last one for times past the end)."""
  offsets = [bar.offset for bar in bars]
  return bars[max(0, bisect.bisect_right(offsets, time + _EPS) - 1)]


def beat_strength(bars: Sequence[Bar], time: float) -> int:
  """2 on a downbeat, 1 on another beat, 0 between beats: for metric accents."""
  bar = bar_at(bars, time)
  position = time - bar.downbeat
  if abs(position) < _EPS:
    return 2
  beats = position / bar.beat
  return 1 if abs(beats - round(beats)) < _EPS else 0


def _kick_snare_beats(beats_per_bar: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Kick on the strong beats, snare on the backbeats, for any number of beats in a bar."""
  if beats_per_bar == 1:
    return (0,), ()
  if beats_per_bar == 3:
    return (0,), (1, 2)
  if beats_per_bar % 2 == 0:
    half = beats_per_bar // 2
    kicks = (0, half) if half % 2 == 0 else (0,)
    return kicks, tuple(range(1, beats_per_bar, 2))
  return (0,), tuple(range(1, beats_per_bar, 2))


def _phrase_starts(bars: Sequence[Bar], fermatas: Sequence[float], final_onset: float,
                   style: Style) -> list[float]:
  """Downbeats that begin a new phrase: the first downbeat after each fermata."""
  downbeats = [bar.downbeat for bar in bars if bar.has_downbeat]
  downbeats = [t for t in downbeats if t < final_onset - _EPS]
  if not downbeats:
    return []
  starts = set()
  if fermatas:
    for fermata in fermatas:
      later = [t for t in downbeats if t > fermata + _EPS]
      if later:
        starts.add(later[0])
  else:
    starts.update(downbeats[style.bars_per_phrase::style.bars_per_phrase])
  return sorted(starts)


def _fill(start: float, end: float, step: float, rng: np.random.Generator) -> list[DrumHit]:
  """Sixteenths (or eighth triplets) from `start` to `end`, growing louder."""
  count = int(round((end - start) / step))
  if count <= 0:
    return []
  kind = rng.integers(3)
  hits = []
  for i in range(count):
    time = start + i * step
    velocity = int(70 + 40 * i / max(1, count - 1) + rng.integers(-4, 5))
    if kind == 0:
      pitch = SNARE
    elif kind == 1:  # snare, then down the toms
      half = count // 2
      pitch = SNARE if i < half else _TOMS_DOWN[min(3, (i - half) * 4 // (count - half))]
    else:
      pitch = _TOMS_DOWN[min(3, i * 4 // count)]
    hits.append(DrumHit(time, pitch, velocity))
  hits.append(DrumHit(start, KICK, 90))
  return hits


def drum_part(bars: Sequence[Bar], fermatas: Sequence[float], final_onset: float,
              rng: np.random.Generator) -> list[DrumHit]:
  """The drum hits for a score, sorted by time.

  Args:
    bars: the score's measures in order (pickups and split bars included).
    fermatas: onsets of notes with a fermata (phrase ends).
    final_onset: onset of the last chord; the groove stops there and a crash marks it.
    rng: the piece's generator; all variation comes from it.
  """
  if not bars:
    return []
  style = choose_style(rng)
  starts = _phrase_starts(bars, fermatas, final_onset, style)
  first_downbeat = next((bar.downbeat for bar in bars if bar.has_downbeat), None)
  accents = set(starts) | {final_onset}
  if first_downbeat is not None and first_downbeat < final_onset - _EPS:
    accents.add(first_downbeat)

  # Fills lead into each accent, over one or two beats, never earlier than the accent before.
  fills = []
  previous = bars[0].offset
  for accent in sorted(accents):
    bar = bar_at(bars, accent - _EPS)
    if accent > bars[0].offset + _EPS and rng.random() < style.fill_probability:
      beats = 2 if rng.random() < 0.3 else 1
      start = max(previous, accent - beats * bar.beat)
      if accent - start > _EPS:
        fills.append((start, accent, bar.beat / 3 if bar.compound else 0.25))
    previous = accent

  def in_fill(time):
    return any(start - _EPS <= time < end - _EPS for start, end, _ in fills)

  hits = []
  for start, end, step in fills:
    hits.extend(_fill(start, end, step, rng))
  for accent in sorted(accents):
    hits.append(DrumHit(accent, CRASH, int(100 + rng.integers(-4, 5))))
    hits.append(DrumHit(accent, KICK, int(105 + rng.integers(-4, 5))))

  bar_number = 0
  for bar in bars:
    if bar.has_downbeat:
      bar_number += 1
    kicks, snares = _kick_snare_beats(bar.beats_per_bar)
    # The grid is the eighth note (three per beat in compound bars); the timekeeper plays
    # every eighth or every beat.
    eighth = 0.5
    step = style.timekeeper_step if not bar.compound else (
        eighth if style.timekeeper_step < 1 else bar.beat)
    positions = np.arange(0.0, bar.full_length - _EPS, eighth)
    for position in positions:
      time = bar.downbeat + float(position)
      if time < bar.offset - _EPS or time >= bar.end - _EPS:
        continue
      if (time >= final_onset - _EPS or in_fill(time) or
          any(abs(time - accent) < _EPS for accent in accents)):
        continue
      beats = position / bar.beat
      on_beat = abs(beats - round(beats)) < _EPS
      beat = int(round(beats)) if on_beat else -1
      last_eighth = position + eighth >= bar.full_length - _EPS
      if abs(position / step - round(position / step)) < _EPS:
        pitch = style.timekeeper
        if (style.open_hat_every and last_eighth and pitch == CLOSED_HAT and
            bar_number % style.open_hat_every == 0):
          pitch = OPEN_HAT
        velocity = (72 if on_beat else 56) + int(rng.integers(-5, 6))
        hits.append(DrumHit(time, pitch, velocity))
      if on_beat and beat in kicks:
        hits.append(DrumHit(time, KICK, (100 if beat == 0 else 90) + int(rng.integers(-4, 5))))
      if on_beat and beat in snares:
        hits.append(DrumHit(time, SNARE, 92 + int(rng.integers(-5, 6))))
      if not on_beat:
        next_beat = (position + eighth) / bar.beat
        if (style.extra_kick and bar.beats_per_bar >= 4 and
            abs(next_beat - bar.beats_per_bar // 2) < _EPS):
          hits.append(DrumHit(time, KICK, 80 + int(rng.integers(-4, 5))))
        elif rng.random() < style.ghost_probability:
          hits.append(DrumHit(time, SNARE, 32 + int(rng.integers(-4, 5))))
  # One sound per key and time (a fill's first kick may meet a groove's); the loudest stays.
  loudest = {}
  for hit in hits:
    key = (round(hit.time, 6), hit.pitch)
    if key not in loudest or hit.velocity > loudest[key].velocity:
      loudest[key] = hit
  return [dataclasses.replace(h, velocity=int(np.clip(h.velocity, 1, 127)))
          for _, h in sorted(loudest.items())]
