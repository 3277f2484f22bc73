"""Offline stand-in for Speech Commands v2: espeak-ng speech written in the real folder layout.

The generated folders look exactly like ``speech_commands_v0.02`` and
``speech_commands_test_set_v0.02`` so that every later step of the course runs unchanged. Speech
comes from espeak-ng (shipped by the ``espeakng-loader`` wheel, called through ctypes); speakers
differ in voice, rate and pitch, clips differ in speed, level, timing, noise and filtering. What the
dataset holds beyond its size (takes per word, speed perturbation, reverberant rooms, a share of
training speakers with a neural TTS voice from ``kws_utils.neural_voice``) is a ``Recipe``; the
course's was chosen on real non-test clips by ``scripts/choose_offline_data.py``.

Determinism: every random choice comes from a numpy generator seeded by (seed, what is drawn).
espeak-ng itself carries hidden state from one utterance to the next (e.g. its pitch flutter), so
clips are rendered in fixed shards, in a fixed order, each by a private, freshly loaded copy of
the library: same seed, same bytes, whatever the number of worker processes.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import tempfile
import threading
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf
import torch
import torchaudio
from scipy.signal import butter, firwin, resample_poly, sosfilt

from kws_utils import config, files, neural_voice, progress
from kws_utils.errors import InputError, TargetExistsError

GENERATOR_VERSION = 2      # bump when the output changes, so old folders are regenerated
SHARD_SPEAKERS = 10        # speakers per shard: fixed, so the bytes never depend on the workers
WORKERS = 2                # processes rendering shards (the course machines have 2 cores)
NOISE_SECONDS = 60         # like the real background recordings (about 1 min each)
NOISE_KINDS = ("white_noise", "pink_noise", "brown_noise", "running_tap", "fan_hum",
               "doing_the_dishes")
AUX_WORDS = tuple(w for w in config.ALL_WORDS if w not in config.KEYWORDS)

# English accents of espeak-ng and voice variants that still sound like a person.
LANGUAGES = ("en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
             "en-029", "en-us-nyc")
VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "Andy",
            "Annie", "adam", "anika", "aunty", "belinda", "benjamin", "david", "ed", "edward",
            "grandma", "grandpa", "ian", "john", "linda", "max", "michel", "norbert", "paul",
            "quincy", "rob", "robert", "steph", "travis", "victor", "zac", "whisper", "whisperf",
            "klatt", "klatt3", "croak", "Alex", "Alicia", "Lee", "Mike", "shelby", "caleb", "Reed",
            "Michael", "Andrea")
ESPEAK_VOLUME = 70         # below 100: louder settings clip some variants
# Separate random streams, so adding one kind of draw never shifts another.
(STREAM_SPEAKER_IDS, STREAM_SPEAKER, STREAM_CLIP, STREAM_NOISE, STREAM_TEST, STREAM_SPEED, STREAM_ROOM,
 STREAM_TTS, STREAM_AUX) = range(9)


@dataclass(frozen=True)
class Recipe:
    """What the offline dataset holds beyond its size; the defaults are the course's (config.py)."""

    aux_repeats: int = config.SYNTH_AUX_REPEATS   # takes of each other word a speaker says
    speed_min: float = config.SYNTH_SPEED_RANGE[0]   # per-clip speed perturbation, drawn uniformly
    speed_max: float = config.SYNTH_SPEED_RANGE[1]
    reverb_share: float = config.SYNTH_REVERB_SHARE   # speakers recorded in a reverberant room
    tts_share: float = config.SYNTH_TTS_SHARE   # training speakers voiced by the neural bank
    tts_voices: int = config.PROFILES["default"].tts_voices   # neural bank size (data.py: the profile's)
    tts_other_words: int = config.SYNTH_TTS_OTHER_WORDS   # of the 25 other words, how many each voice says
    aux_words: int = config.SYNTH_AUX_WORDS   # of the 25 other words, how many each espeak-ng speaker says

    def draw_room(self, seed: int, speaker: int) -> tuple[float, float]:
        """A speaker's room as (RT60 in s, direct-to-reverberant ratio in dB); (0, 0) is dry."""
        rng = np.random.default_rng([seed, STREAM_ROOM, speaker])
        if rng.random() >= self.reverb_share:
            return (0.0, 0.0)
        return (float(np.exp(rng.uniform(np.log(0.15), np.log(0.9)))), float(rng.uniform(-2, 12)))

    def draw_tts(self, seed: int, speaker: int, split: str) -> int:
        """The neural bank voice a speaker speaks with, or -1 for espeak-ng."""
        # Training speakers only: a bank voice heard in training would leak into validation/test.
        if not self.tts_share or split != "training":
            return -1
        rng = np.random.default_rng([seed, STREAM_TTS, speaker])
        return int(rng.integers(self.tts_voices)) if rng.random() < self.tts_share else -1

    def draw_aux_words(self, seed: int, speaker: int) -> tuple[str, ...]:
        """The other words an espeak-ng speaker says: all 25, or a seeded subset of ``aux_words``."""
        if self.aux_words >= len(AUX_WORDS):
            return AUX_WORDS
        rng = np.random.default_rng([seed, STREAM_AUX, speaker])
        return tuple(sorted(rng.choice(AUX_WORDS, self.aux_words, replace=False).tolist()))

    def draw_speed(self, *stream: int) -> float:
        """One clip's speed factor, from its own seeded stream (1.0 when the range is empty)."""
        if self.speed_min == self.speed_max == 1.0:
            return 1.0
        return float(np.random.default_rng(list(stream)).uniform(self.speed_min, self.speed_max))


# ----------------------------------------------------------------------------- espeak-ng
@contextlib.contextmanager
def _sigint_deferred() -> Iterator[list[bool]]:
    """Record Ctrl-C during synthesis and deliver it afterwards, outside the C callback.

    A KeyboardInterrupt raised inside a ctypes callback (even on its first line) is printed and
    dropped by ctypes. So while espeak runs, SIGINT only sets a flag, which makes the callback
    stop espeak; the interrupt is raised once espeak_Synth has returned.
    """
    pressed: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield pressed          # signal handlers can only be set in the main thread
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        # Ctrl-C is ignored here (e.g. a shell's background job): catching it would cut the
        # utterance short without raising, so leave it ignored.
        yield pressed
        return
    signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed and callable(previous):
        previous(signal.SIGINT, None)     # the default handler raises KeyboardInterrupt


@contextlib.contextmanager
def _sigint_sticky() -> Iterator[list[bool]]:
    """Raise KeyboardInterrupt on Ctrl-C as usual, and remember it so a swallowed one is raised again.

    Python prints and drops an exception raised while a finalizer (``__del__``) runs, so a Ctrl-C
    that lands there would be lost and generation would run on; the caller checks the flag between
    clips and raises it again.
    """
    pressed: list[bool] = []
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield pressed          # not ours to catch: a worker thread, or Ctrl-C ignored
        return

    def handler(signum: int, frame: object) -> None:
        pressed.append(True)
        previous(signum, frame)

    signal.signal(signal.SIGINT, handler)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


_LIBC = ctypes.CDLL(None)


class Espeak:
    """A private instance of espeak-ng (its own copy of the library) that renders words."""

    _RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4      # espeak_PARAMETER values (speak_lib.h)
    _SYNCHRONOUS, _POS_CHARACTER, _CHARS_UTF8 = 2, 1, 1

    def __init__(self) -> None:
        """Load a fresh copy of the bundled library, so no state from earlier use leaks in."""
        import espeakng_loader

        self._lib: ctypes.CDLL | None = None
        # dlopen returns the already-loaded library for a known path, with its global state;
        # a copy under a new name gets pristine globals.
        self._tmp = Path(tempfile.mkdtemp(prefix="kws_espeak_"))
        private = self._tmp / "libespeak-ng-private.so"
        shutil.copyfile(espeakng_loader.get_library_path(), private)
        self._lib = ctypes.CDLL(str(private))
        callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short),
                                         ctypes.c_int, ctypes.c_void_p)
        self._chunks: list[np.ndarray] = []
        self._pending: BaseException | None = None     # raised in the callback, re-raised later
        self._interrupted: list[bool] = []              # Ctrl-C seen during synthesis
        self._callback = callback_type(self._collect)    # keep a reference: C holds a pointer
        data_parent = str(Path(espeakng_loader.get_data_path()).parent).encode()
        self.sample_rate = self._lib.espeak_Initialize(self._SYNCHRONOUS, 0, data_parent, 0)
        if self.sample_rate <= 0:
            self.close()
            raise RuntimeError("espeak-ng failed to initialise (espeakng-loader data missing?).")
        self._lib.espeak_SetSynthCallback(self._callback)

    def __enter__(self) -> "Espeak":
        """Use as a context manager so the library copy is always released."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Release the library on leaving the ``with`` block."""
        self.close()

    def close(self) -> None:
        """Free espeak's memory, unload the private library and delete its copy."""
        import _ctypes

        if self._lib is not None:
            self._lib.espeak_Terminate()
            _ctypes.dlclose(self._lib._handle)
            self._lib = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _collect(self, wav: ctypes.POINTER(ctypes.c_short), n: int, _events: int) -> int:
        """Synthesis callback: copy each audio block; 0 lets synthesis continue, 1 aborts it."""
        # ctypes prints and drops any exception raised in a callback, Ctrl-C included: keep it,
        # stop espeak (return 1) and raise it again once espeak_Synth has returned.
        try:
            if self._interrupted:
                return 1
            if wav and n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        except BaseException as exc:  # noqa: BLE001 - re-raised in speak()
            self._pending = exc
            return 1
        return 0

    def speak(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int,
              noise_seed: int = 0) -> np.ndarray:
        """Render ``text`` with a voice and prosody; int16 samples at ``self.sample_rate``."""
        # Breathy variants draw random numbers: espeak's own generator is seeded from the clock
        # at start-up, and some paths use the C library's rand(); seed both for every clip.
        self._lib.espeak_ng_SetRandSeed(ctypes.c_long(noise_seed))
        _LIBC.srand(noise_seed)
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise InputError(f"espeak-ng has no voice {voice!r}.")
        for param, value in ((self._RATE, rate), (self._PITCH, pitch), (self._RANGE, pitch_range),
                             (self._VOLUME, ESPEAK_VOLUME)):
            self._lib.espeak_SetParameter(param, int(value), 0)
        self._chunks.clear()
        self._pending = None
        encoded = text.encode()
        with _sigint_deferred() as self._interrupted:
            status = self._lib.espeak_Synth(encoded, len(encoded) + 1, 0, self._POS_CHARACTER, 0,
                                            self._CHARS_UTF8, None, None)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            raise pending
        if status != 0 or not self._chunks:
            raise RuntimeError(f"espeak-ng could not speak {text!r} with {voice!r} ({status}).")
        return np.concatenate(self._chunks)


# ----------------------------------------------------------------------------- speakers
def which_set(filename: str, validation_percent: int = config.VALIDATION_PERCENT,
              testing_percent: int = config.TESTING_PERCENT) -> str:
    """The Speech Commands split rule: a stable hash of the speaker part of the file name."""
    speaker = re.sub(r"_nohash_.*$", "", Path(filename).name)
    # The dataset maps the SHA-1 into [0, 100] over 2**27 buckets (its "max files per class").
    buckets = 2**27 - 1
    value = int(hashlib.sha1(speaker.encode()).hexdigest(), 16) % (buckets + 1)
    percent = value * (100.0 / buckets)
    if percent < validation_percent:
        return "validation"
    if percent < validation_percent + testing_percent:
        return "testing"
    return "training"


def split_quotas(n_speakers: int) -> dict[str, int]:
    """How many speakers each split gets: about 80/10/10, at least one per split."""
    if n_speakers < 3:
        raise InputError(f"need at least 3 synthetic speakers (one per split), got {n_speakers}.")
    n_val = max(1, round(n_speakers * config.VALIDATION_PERCENT / 100))
    n_test = max(1, round(n_speakers * config.TESTING_PERCENT / 100))
    return {"training": n_speakers - n_val - n_test, "validation": n_val, "testing": n_test}


def speaker_ids(n_speakers: int, seed: int) -> list[tuple[str, str]]:
    """Random 8-hex-digit speaker ids and their hash split, filled to exact 80/10/10 quotas."""
    # Drawing ids until each split is full keeps the sizes exact even for tiny datasets, while
    # every id still lands in the split the real hash rule gives it.
    rng = np.random.default_rng([seed, STREAM_SPEAKER_IDS])
    left = split_quotas(n_speakers)
    chosen: list[tuple[str, str]] = []
    seen: set[str] = set()
    while len(chosen) < n_speakers:
        sid = f"{int(rng.integers(0, 2**32)):08x}"
        split = which_set(f"{sid}_nohash_0.wav")
        if sid not in seen and left[split] > 0:
            seen.add(sid)
            left[split] -= 1
            chosen.append((sid, split))
    return chosen


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: an espeak voice and prosody plus a 'microphone and room'."""

    index: int
    sid: str
    split: str
    voice: str
    rate: int            # words per minute
    pitch: int           # 0..100
    pitch_range: int     # 0..100
    level_db: float      # typical peak level in dBFS
    noise_db: float      # noise floor RMS in dBFS
    lowpass_hz: float    # 0 = no low-pass
    highpass_hz: float   # 0 = no high-pass


def make_speakers(n_speakers: int, seed: int) -> list[Speaker]:
    """All speakers of a dataset, each drawn from its own seeded stream."""
    speakers = []
    for index, (sid, split) in enumerate(speaker_ids(n_speakers, seed)):
        rng = np.random.default_rng([seed, STREAM_SPEAKER, index])
        variant = str(rng.choice(VARIANTS))
        voice = str(rng.choice(LANGUAGES)) + (f"+{variant}" if variant else "")
        speakers.append(Speaker(
            index=index, sid=sid, split=split, voice=voice,
            rate=int(rng.integers(120, 231)), pitch=int(rng.integers(20, 81)),
            pitch_range=int(rng.integers(15, 91)), level_db=float(rng.uniform(-24, -3)),
            noise_db=float(rng.uniform(-78, -48)),
            lowpass_hz=float(rng.uniform(3000, 7500)) if rng.random() < 0.5 else 0.0,
            highpass_hz=float(rng.uniform(60, 300)) if rng.random() < 0.5 else 0.0))
    return speakers


# ----------------------------------------------------------------------------- one clip
@lru_cache(maxsize=64)
def _mic_filter(lowpass_hz: float, highpass_hz: float) -> np.ndarray | None:
    """Second-order sections of a speaker's band limits (0 = none), or None for flat."""
    nyquist = config.SAMPLE_RATE / 2
    sections = []
    if lowpass_hz:
        sections.append(butter(2, lowpass_hz / nyquist, "low", output="sos"))
    if highpass_hz:
        sections.append(butter(2, highpass_hz / nyquist, "high", output="sos"))
    return np.concatenate(sections) if sections else None


def trim(wave: np.ndarray, rel_threshold: float = 0.01) -> np.ndarray:
    """Drop the leading and trailing near-silence a synthesiser adds around a word."""
    loud = np.nonzero(np.abs(wave) > rel_threshold * np.abs(wave).max())[0]
    return wave[loud[0]:loud[-1] + 1] if loud.size else wave


@lru_cache(maxsize=4)
def _resampler(up: int, down: int) -> np.ndarray:
    """The anti-alias FIR scipy's resample_poly would design, built once instead of per clip."""
    return firwin(2 * 10 * max(up, down) + 1, 1 / max(up, down), window=("kaiser", 5.0))


def _to_16k(wave: np.ndarray, rate: int) -> np.ndarray:
    """Resample float audio from espeak's rate to the dataset rate."""
    gcd = int(np.gcd(rate, config.SAMPLE_RATE))
    up, down = config.SAMPLE_RATE // gcd, rate // gcd
    return resample_poly(wave, up, down, window=_resampler(up, down))


def _to_int16(wave: np.ndarray) -> np.ndarray:
    """Float in [-1, 1] to int16 with clipping."""
    return np.clip(np.round(wave * 32767), -32768, 32767).astype(np.int16)


def change_speed(wave: np.ndarray, factor: float) -> np.ndarray:
    """Play ``wave`` ``factor`` times faster: shorter, higher in pitch and formants (torchaudio)."""
    # Read as if recorded at factor x 16 kHz (rounded to 100 Hz, which keeps the filter small)
    # and resampled to 16 kHz: Kaldi's speed perturbation, which also mimics vocal tracts of
    # other lengths.
    source = int(round(config.SAMPLE_RATE * factor / 100)) * 100
    if source == config.SAMPLE_RATE:
        return wave
    tensor = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
    return torchaudio.functional.resample(tensor, source, config.SAMPLE_RATE).numpy().astype(np.float64)


def room_response(rt60: float, drr_db: float, rng: np.random.Generator) -> np.ndarray:
    """A synthetic room impulse response: the direct sound, then a tail decaying 60 dB in ``rt60``."""
    # Exponentially decaying noise is the statistical model of late reverberation (Polack);
    # the drr sets how far the talker stands from the microphone.
    if isinstance(rt60, bool) or not isinstance(rt60, (int, float)) or not 0.01 <= rt60 <= 5:
        raise InputError(f"rt60={rt60!r}: give the room's reverberation time in seconds, 0.01-5 "
                         "(living rooms are about 0.3-0.6).")
    if isinstance(drr_db, bool) or not isinstance(drr_db, (int, float)) or not -30 <= drr_db <= 40:
        raise InputError(f"drr_db={drr_db!r}: give the direct-to-reverberant ratio in dB, -30 to 40.")
    n = max(int(rt60 * config.SAMPLE_RATE), 2)
    tail = rng.standard_normal(n) * np.exp(-6.9 * np.arange(n) / n)
    tail[0] = 0.0
    tail *= np.sqrt(10 ** (-drr_db / 10) / np.sum(tail ** 2))
    tail[0] = 1.0
    return tail


def reverberate(wave: np.ndarray, rt60: float, drr_db: float, rng: np.random.Generator) -> np.ndarray:
    """``wave`` as heard in a room: convolved with its impulse response, tail kept (torchaudio)."""
    if not isinstance(wave, np.ndarray) or wave.ndim != 1 or not np.isfinite(wave).all():
        raise InputError("wave must be one clip as a 1-D float numpy array of finite samples, got "
                         f"{getattr(wave, 'shape', type(wave).__name__)}.")
    rir = torch.from_numpy(room_response(rt60, drr_db, rng))
    return torchaudio.functional.fftconvolve(torch.from_numpy(wave), rir).numpy()


def render_word(espeak: Espeak, word: str, speaker: Speaker,
                rng: np.random.Generator, speed: float = 1.0,
                room: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """One recorded-like utterance of ``word`` by ``speaker``: int16, 16 kHz, up to 1 s."""
    # Punctuation changes espeak's intonation, like people reading a prompt differently.
    text = word + str(rng.choice(["", ".", "!", ",", "?"], p=[0.4, 0.25, 0.15, 0.1, 0.1]))
    rate = int(np.clip(speaker.rate * rng.uniform(0.9, 1.1), 80, 450))
    pitch = int(np.clip(speaker.pitch + rng.integers(-5, 6), 0, 100))
    raw = espeak.speak(text, speaker.voice, rate, pitch, speaker.pitch_range,
                       int(rng.integers(0, 2**31)))
    return record(trim(_to_16k(raw.astype(np.float64) / 32768, espeak.sample_rate)), speaker, rng,
                  speed, room)


def record(speech: np.ndarray, speaker: Speaker, rng: np.random.Generator, speed: float = 1.0,
           room: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """A dry 16 kHz utterance as ``speaker``'s microphone records it: int16, up to 1 s."""
    speech = change_speed(speech, speed)
    if room[0] > 0:
        speech = reverberate(speech, *room, np.random.default_rng(rng.integers(0, 2**63)))
    # Most real clips are exactly 1 s; about one in ten is shorter.
    length = config.CLIP_SAMPLES
    shortest = max(length // 2, speech.size + 800)     # keep 50 ms of air after the word
    if rng.random() < 0.1 and shortest < length:
        length = int(rng.integers(shortest, length))
    speech = speech[:length]
    clip = np.zeros(length)
    start = int(rng.integers(0, length - speech.size + 1))
    peak_db = np.clip(speaker.level_db + rng.normal(0, 3), -35, -1)
    clip[start:start + speech.size] = speech * (10 ** (peak_db / 20) / np.abs(speech).max())
    noise_db = speaker.noise_db + rng.normal(0, 3)
    clip += rng.standard_normal(length) * 10 ** (noise_db / 20)
    sos = _mic_filter(speaker.lowpass_hz, speaker.highpass_hz)
    return _to_int16(sosfilt(sos, clip) if sos is not None else clip)


# ----------------------------------------------------------------------------- noise
def _smooth_random(n: int, rng: np.random.Generator, per_second: float) -> np.ndarray:
    """A slowly varying random curve (about ``per_second`` changes a second), zero mean."""
    knots = rng.standard_normal(int(n / config.SAMPLE_RATE * per_second) + 2)
    return np.interp(np.linspace(0, knots.size - 1, n), np.arange(knots.size), knots)


def _colored(n: int, rng: np.random.Generator, exponent: float, band: tuple[float, float]
             = (20.0, 8000.0)) -> np.ndarray:
    """Gaussian noise with power falling as 1/f**exponent inside ``band`` (Hz), unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / config.SAMPLE_RATE)
    gain = np.maximum(freqs, band[0]) ** (-exponent / 2)
    gain[(freqs < band[0]) | (freqs > band[1])] = 0
    wave = np.fft.irfft(spectrum * gain, n)
    return wave / wave.std()


def _running_tap(n: int, rng: np.random.Generator) -> np.ndarray:
    """Water: band-limited hiss whose level wobbles quickly, like a tap into a sink."""
    hiss = _colored(n, rng, 0.5, (300.0, 6000.0))
    wobble = 1 + 0.35 * _smooth_random(n, rng, 12) + 0.15 * _smooth_random(n, rng, 1)
    return hiss * np.clip(wobble, 0.2, None)


def _fan_hum(n: int, rng: np.random.Generator) -> np.ndarray:
    """A fan: mains hum with harmonics plus rumbling air modulated at the blade rate."""
    t = np.arange(n) / config.SAMPLE_RATE
    f0 = rng.uniform(48, 62)
    hum = sum(np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 7))
    blade = 1 + 0.3 * np.sin(2 * np.pi * rng.uniform(12, 25) * t)
    air = _colored(n, rng, 1.5, (40.0, 4000.0)) * blade
    return 0.4 * hum / np.abs(hum).max() + air / 3


def _dishes(n: int, rng: np.random.Generator) -> np.ndarray:
    """Kitchen clatter: a soft background with random ringing clinks of cutlery and plates."""
    out = 0.2 * _colored(n, rng, 1.0)
    rate = config.SAMPLE_RATE
    for start in rng.integers(0, n, size=int(n / rate * 3)):
        length = int(rng.uniform(0.02, 0.25) * rate)
        t = np.arange(min(length, n - start)) / rate
        ring = np.sin(2 * np.pi * rng.uniform(1500, 6000) * t) * np.exp(-t * rng.uniform(20, 80))
        out[start:start + t.size] += rng.uniform(0.5, 4) * ring
    return out


def make_noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of one background-noise kind, float with unit RMS."""
    makers = {"white_noise": lambda: rng.standard_normal(n),
              "pink_noise": lambda: _colored(n, rng, 1.0),
              "brown_noise": lambda: _colored(n, rng, 2.0),
              "running_tap": lambda: _running_tap(n, rng),
              "fan_hum": lambda: _fan_hum(n, rng),
              "doing_the_dishes": lambda: _dishes(n, rng)}
    if kind not in makers:
        raise InputError(f"unknown noise kind {kind!r}; use one of {NOISE_KINDS}.")
    wave = makers[kind]()
    return wave / wave.std()


def _at_level(wave: np.ndarray, rms_db: float) -> np.ndarray:
    """Scale unit-RMS audio to an RMS level in dBFS (less if peaks would clip), as int16."""
    gain = min(10 ** (rms_db / 20), 0.9 / np.abs(wave).max())
    return _to_int16(wave * gain)


def real_noise_dir() -> Path | None:
    """The six real background-noise recordings when this machine has them, else None."""
    from kws_utils import real_audio   # here: real_audio imports data, which imports this module
    return real_audio.noise_dir()


@lru_cache(maxsize=8)
def _real_recording(path: str) -> np.ndarray:
    """One real noise recording as float in [-1, 1], read once per worker process."""
    wave, rate = sf.read(path, dtype="float32")
    wave = wave.mean(axis=1) if wave.ndim > 1 else wave
    return _to_16k(wave, rate) if rate != config.SAMPLE_RATE else wave


def write_background_noise(folder: Path, seed: int) -> None:
    """The ``_background_noise_`` recordings: the six real ones when available, else generated."""
    folder.mkdir(parents=True)
    real = real_noise_dir()
    if real is not None:
        # Real recordings make the silence class and the noise augmentation sound like the real
        # dataset's; running_tap.wav stays the validation recording (config.VALIDATION_NOISE_FILE).
        for path in sorted(real.glob("*.wav")):
            sf.write(folder / path.name, _to_int16(_real_recording(str(path))), config.SAMPLE_RATE,
                     subtype="PCM_16")
        return
    for i, kind in enumerate(NOISE_KINDS):
        rng = np.random.default_rng([seed, STREAM_NOISE, i])
        wave = make_noise(kind, NOISE_SECONDS * config.SAMPLE_RATE, rng)
        sf.write(folder / f"{kind}.wav", _at_level(wave, -22.0), config.SAMPLE_RATE,
                 subtype="PCM_16")


# ----------------------------------------------------------------------------- rendering jobs
@dataclass(frozen=True)
class Job:
    """One file to write: a word by a speaker, or silence when ``word`` is a noise kind."""

    relpath: str
    word: str
    speaker: int          # index into the speaker list; -1 for silence
    seed: tuple[int, ...]
    speed: float = 1.0    # speed perturbation of the utterance (Recipe.draw_speed)
    room: tuple[float, float] = (0.0, 0.0)   # the speaker's room (Recipe.draw_room)
    tts: str = ""         # a neural bank clip to record instead of espeak-ng (Recipe.draw_tts)


def train_jobs(speakers: list[Speaker], seed: int, recipe: Recipe = Recipe(),
               bank: Path | None = None) -> list[list[Job]]:
    """All clips of the main dataset, in shards of ``SHARD_SPEAKERS`` consecutive speakers."""
    if recipe.tts_share and bank is None:
        raise InputError("bank=None, but the recipe gives speakers neural voices: pass the folder "
                         "neural_voice.ensure_bank(recipe.tts_voices, seed) returns.")
    shards: list[list[Job]] = []
    for sp in speakers:
        if sp.index % SHARD_SPEAKERS == 0:
            shards.append([])
        room = recipe.draw_room(seed, sp.index)
        voice = recipe.draw_tts(seed, sp.index, sp.split)
        says = (neural_voice.voice_words(seed, voice, recipe.tts_other_words) if voice >= 0
                else config.KEYWORDS + recipe.draw_aux_words(seed, sp.index))
        # A voice with fewer other words says each more often: as many "unknown" takes as espeak's
        # speakers, so the kind of voice does not tell keyword from other word.
        others = sum(w not in config.KEYWORDS for w in says)
        aux_repeats = -(-recipe.aux_repeats * min(recipe.aux_words, len(AUX_WORDS)) // others)
        for w, word in enumerate(config.ALL_WORDS):
            if word not in says:
                continue
            repeats = config.SYNTH_KEYWORD_REPEATS if word in config.KEYWORDS else aux_repeats
            for n in range(repeats):
                tts = str(neural_voice.clip_path(bank, voice, word)) if voice >= 0 else ""
                shards[-1].append(Job(f"{word}/{sp.sid}_nohash_{n}.wav", word, sp.index,
                                      (seed, STREAM_CLIP, sp.index, w, n),
                                      recipe.draw_speed(seed, STREAM_SPEED, sp.index, w, n), room, tts))
    return shards


def test_jobs(speakers: list[Speaker], per_class: int, seed: int,
              recipe: Recipe = Recipe()) -> list[list[Job]]:
    """The balanced test set: one shard per class, speakers from the testing split only."""
    testers = [sp for sp in speakers if sp.split == "testing"]
    shards = []
    for c, label in enumerate(config.LABELS):
        shard = []
        for j in range(per_class):
            rng_seed = (seed, STREAM_TEST, c, j)
            speed = recipe.draw_speed(seed, STREAM_TEST, c, j, STREAM_SPEED)
            sp = testers[j % len(testers)]
            if label == "silence":
                kinds = noise_names()
                kind = kinds[j % len(kinds)]
                shard.append(Job(f"{config.TEST_SILENCE_DIR}/{kind}_{j:04d}.wav", kind, -1,
                                 rng_seed))
            elif label == "unknown":
                word = AUX_WORDS[j % len(AUX_WORDS)]
                shard.append(Job(f"{config.TEST_UNKNOWN_DIR}/{word}_{sp.sid}_nohash_{j}.wav",
                                 word, sp.index, rng_seed, speed, recipe.draw_room(seed, sp.index)))
            else:
                # Utterance numbers above the training repeats: new takes, not copies.
                n = 100 + j // len(testers)
                shard.append(Job(f"{label}/{sp.sid}_nohash_{n}.wav", label, sp.index, rng_seed, speed,
                                 recipe.draw_room(seed, sp.index)))
        shards.append(shard)
    return shards


def render_job(espeak: Espeak, job: Job, speakers: list[Speaker]) -> np.ndarray:
    """The int16 samples of one job."""
    rng = np.random.default_rng(list(job.seed))
    if job.speaker < 0 and job.word in NOISE_KINDS:
        # Test silence: fresh noise (never cut from the training recordings), quiet to moderate.
        return _at_level(make_noise(job.word, config.CLIP_SAMPLES, rng), rng.uniform(-65, -25))
    if job.speaker < 0:
        # Test silence from a real recording, as the official test set cuts its _silence_ clips.
        wave = _real_recording(str(real_noise_dir() / f"{job.word}.wav"))
        start = int(rng.integers(0, wave.size - config.CLIP_SAMPLES))
        cut = wave[start:start + config.CLIP_SAMPLES]
        return _at_level(cut / max(cut.std(), 1e-6), rng.uniform(-65, -25))
    if job.tts:
        return record(neural_voice.bank_clip(job.tts), speakers[job.speaker], rng, job.speed, job.room)
    return render_word(espeak, job.word, speakers[job.speaker], rng, job.speed, job.room)


def _render_shard(args: tuple[str, list[Job], list[Speaker]]) -> int:
    """Write every clip of one shard in order, with its own fresh espeak-ng instance."""
    root, jobs, speakers = args
    torch.set_num_threads(1)   # one worker per core already: more threads only contend
    with _sigint_sticky() as pressed, Espeak() as espeak:
        for job in jobs:
            if pressed:
                raise KeyboardInterrupt("Ctrl-C pressed during generation")
            sf.write(Path(root) / job.relpath, render_job(espeak, job, speakers),
                     config.SAMPLE_RATE, subtype="PCM_16")
    return len(jobs)


def _run_shards(root: Path, shards: list[list[Job]], speakers: list[Speaker], workers: int,
                desc: str) -> None:
    """Render all shards (in ``workers`` processes if > 1) with a progress bar over clips."""
    for folder in {str(Path(job.relpath).parent) for shard in shards for job in shard}:
        (root / folder).mkdir(parents=True, exist_ok=True)
    tasks = [(str(root), shard, speakers) for shard in shards]
    with progress.bar(total=sum(len(shard) for shard in shards), desc=desc, unit="clip") as bar:
        if workers <= 1:
            for task in tasks:
                bar.update(_render_shard(task))
            return
        # spawn, not fork: the parent may hold torch/OpenMP threads that fork does not survive.
        with mp.get_context("spawn").Pool(processes=min(workers, len(tasks))) as pool:
            for done in pool.imap_unordered(_render_shard, tasks):
                bar.update(done)


# ----------------------------------------------------------------------------- folders
def _write_lists(root: Path, speakers: list[Speaker]) -> None:
    """validation_list.txt and testing_list.txt: every clip of the speakers of that split."""
    split_of = {sp.sid: sp.split for sp in speakers}
    lists: dict[str, list[str]] = {"validation": [], "testing": []}
    for path in sorted(root.glob("*/*_nohash_*.wav")):
        split = split_of[path.name.split("_nohash_")[0]]
        if split in lists:
            lists[split].append(path.relative_to(root).as_posix())
    for split, names in lists.items():
        (root / f"{split}_list.txt").write_text("".join(name + "\n" for name in names))


def read_marker(folder: Path) -> dict | None:
    """The completion marker of a generated/extracted folder, or None if absent or unreadable."""
    try:
        return json.loads((folder / config.COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_complete(folder: Path, expected: dict) -> bool:
    """True if ``folder`` holds a finished generation with exactly these parameters."""
    marker = read_marker(folder)
    return marker is not None and all(marker.get(k) == v for k, v in expected.items())


def check_replaceable(target: Path) -> None:
    """Refuse a ``target`` that exists but is not a finished folder of ours (marker inside)."""
    if target.exists() and not (target.is_dir() and read_marker(target) is not None):
        kind = "folder" if target.is_dir() else "file"
        raise TargetExistsError(f"{target} already exists and is not a dataset folder written by "
                              f"the course (no {config.COMPLETE_MARKER}); this {kind} is left "
                              "untouched. Move it away or choose another target folder.")


def finish_folder(partial: Path, target: Path, marker: dict) -> None:
    """Write the marker last and move the finished folder into place (replacing an old one of ours)."""
    marker["files"] = sum(1 for _ in partial.rglob("*.wav"))
    os.chmod(partial, 0o777 & ~files._umask())   # mkdtemp makes 0700: readable by others too
    files.write_text(partial / config.COMPLETE_MARKER, json.dumps(marker, indent=1) + "\n")
    check_replaceable(target)
    if target.exists():
        # Our previous folder moves into a fresh temporary folder of ours, deleted after the swap.
        old = Path(tempfile.mkdtemp(prefix=f"{files.TEMP_PREFIX}{target.name}.old.", dir=target.parent))
        target.rename(old / target.name)
        partial.rename(target)
        shutil.rmtree(old)
        return
    partial.rename(target)


def fresh_partial(target: Path) -> Path:
    """A new, uniquely named empty work folder next to ``target``; our old leftovers are removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{files.TEMP_PREFIX}{target.name}.partial."
    # Only folders with our own prefix are removed: leftovers of an interrupted run of ours.
    for leftover in target.parent.glob(prefix + "*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))


def noise_names() -> tuple[str, ...]:
    """Names of the background recordings the generated dataset gets: real ones if available."""
    real = real_noise_dir()
    return tuple(sorted(p.stem for p in real.glob("*.wav"))) if real is not None else NOISE_KINDS


def train_params(speakers: int, seed: int, recipe: Recipe = Recipe()) -> dict:
    """What identifies a generated main dataset (stored in, and checked against, its marker)."""
    params = {"kind": "synthetic", "generator_version": GENERATOR_VERSION, "seed": seed,
              "speakers": speakers, "keyword_repeats": config.SYNTH_KEYWORD_REPEATS,
              "aux_repeats": recipe.aux_repeats, "speed_min": recipe.speed_min,
              "speed_max": recipe.speed_max, "shard_speakers": SHARD_SPEAKERS}
    if recipe.aux_words < len(AUX_WORDS):   # absent for all 25, so folders made before stay valid
        params["aux_words"] = recipe.aux_words
    if recipe.reverb_share:   # absent when 0, so folders made before reverberation stay valid
        params["reverb_share"] = recipe.reverb_share
    if recipe.tts_share:      # likewise for the neural voices
        params.update(tts_share=recipe.tts_share, tts_voices=recipe.tts_voices,
                      tts_bank=neural_voice.bank_params(recipe.tts_voices, seed, recipe.tts_other_words))
    if real_noise_dir() is not None:   # a folder made with generated noise is then regenerated
        params["noise"] = "real: " + ", ".join(noise_names())
    return params


def test_params(speakers: int, per_class: int, seed: int, recipe: Recipe = Recipe()) -> dict:
    """What identifies a generated balanced test set."""
    return {**train_params(speakers, seed, recipe), "kind": "synthetic-test", "per_class": per_class}


def generate_dataset(target: Path, speakers: int, seed: int = config.SEED,
                     workers: int = WORKERS, recipe: Recipe = Recipe(),
                     bank_root: Path | None = None) -> Path:
    """Write a Speech Commands v2 style folder of synthetic speech to ``target``.

    With ``recipe.tts_share`` > 0 the neural voice bank is rendered first (or reused) under
    ``bank_root`` (default: the data root).
    """
    target = Path(target)
    _check_positive("speakers", speakers)
    _check_recipe(recipe)
    check_replaceable(target)   # before minutes of neural voices, not after
    bank = (neural_voice.ensure_bank(recipe.tts_voices, seed, workers, bank_root, recipe.tts_other_words)
            if recipe.tts_share else None)
    with files.folder_lock(target):
        return _generate_dataset(target, speakers, seed, workers, recipe, bank)


def _check_positive(name: str, value: object) -> None:
    """A whole-number count of at least 1, or a clear error naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name}={value!r}: give a whole number >= 1.")


def _check_recipe(recipe: object) -> None:
    """A Recipe with at least one take per word, a speed range inside [0.5, 2], a share in [0, 1]."""
    if not isinstance(recipe, Recipe):
        raise InputError(f"recipe must be a synthetic.Recipe, got {type(recipe).__name__}.")
    _check_positive("recipe.aux_repeats", recipe.aux_repeats)
    if not 0.5 <= recipe.speed_min <= recipe.speed_max <= 2.0:
        raise InputError(f"recipe speed range [{recipe.speed_min}, {recipe.speed_max}]: give "
                         "0.5 <= speed_min <= speed_max <= 2 (1.0 and 1.0 for no perturbation).")
    share = recipe.reverb_share
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
        raise InputError(f"recipe.reverb_share={recipe.reverb_share!r}: give the share of speakers "
                         "recorded in a reverberant room, a number in [0, 1] (0 for none).")
    share = recipe.tts_share
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
        raise InputError(f"recipe.tts_share={recipe.tts_share!r}: give the share of training speakers "
                         "voiced by the neural TTS bank, a number in [0, 1] (0 for espeak-ng only).")
    _check_positive("recipe.aux_words", recipe.aux_words)
    if recipe.aux_words > len(AUX_WORDS):
        raise InputError(f"recipe.aux_words={recipe.aux_words!r}: a speaker can say at most the "
                         f"{len(AUX_WORDS)} other words.")
    _check_positive("recipe.tts_voices", recipe.tts_voices)
    _check_positive("recipe.tts_other_words", recipe.tts_other_words)
    if recipe.tts_other_words > len(AUX_WORDS):
        raise InputError(f"recipe.tts_other_words={recipe.tts_other_words!r}: a voice can say at most "
                         f"the {len(AUX_WORDS)} other words.")


def _generate_dataset(target: Path, speakers: int, seed: int, workers: int, recipe: Recipe,
                      bank: Path | None) -> Path:
    """generate_dataset() while holding the target's lock file."""
    check_replaceable(target)
    partial = fresh_partial(target)
    try:
        people = make_speakers(speakers, seed)
        write_background_noise(partial / config.BACKGROUND_NOISE_DIR, seed)
        _run_shards(partial, train_jobs(people, seed, recipe, bank), people, workers,
                    "synthetic speech")
        _write_lists(partial, people)
        (partial / "speakers.json").write_text(json.dumps([asdict(sp) for sp in people], indent=0))
        finish_folder(partial, target, train_params(speakers, seed, recipe))
    finally:
        # Interrupted (Ctrl-C) or failed: no half-written folder, and no marker anywhere.
        shutil.rmtree(partial, ignore_errors=True)
    return target


def generate_test_set(target: Path, speakers: int, per_class: int, seed: int = config.SEED,
                      workers: int = WORKERS, recipe: Recipe = Recipe()) -> Path:
    """Write a balanced test folder like ``speech_commands_test_set_v0.02`` to ``target``."""
    target = Path(target)
    _check_positive("speakers", speakers)
    _check_positive("per_class", per_class)
    _check_recipe(recipe)
    with files.folder_lock(target):
        return _generate_test_set(target, speakers, per_class, seed, workers, recipe)


def _generate_test_set(target: Path, speakers: int, per_class: int, seed: int, workers: int,
                       recipe: Recipe) -> Path:
    """generate_test_set() while holding the target's lock file."""
    check_replaceable(target)
    partial = fresh_partial(target)
    try:
        people = make_speakers(speakers, seed)
        _run_shards(partial, test_jobs(people, per_class, seed, recipe), people, workers,
                    "synthetic test set")
        finish_folder(partial, target, test_params(speakers, per_class, seed, recipe))
    finally:
        # Interrupted (Ctrl-C) or failed: no half-written folder, and no marker anywhere.
        shutil.rmtree(partial, ignore_errors=True)
    return target


def ensure_synthetic(train_dir: Path, test_dir: Path, speakers: int, per_class: int,
                     seed: int = config.SEED, workers: int = WORKERS,
                     recipe: Recipe = Recipe(), bank_root: Path | None = None) -> tuple[Path, Path]:
    """Generate whichever of the two folders is missing, incomplete or made with other settings."""
    train_dir, test_dir = Path(train_dir), Path(test_dir)
    for folder in (train_dir, test_dir):
        files.wait_unlocked(folder)     # another run generating the same data: use its result
    if not is_complete(train_dir, train_params(speakers, seed, recipe)):
        if train_dir.exists():
            print(f"{train_dir} is incomplete or was made with other settings: regenerating.")
        generate_dataset(train_dir, speakers, seed, workers, recipe, bank_root)
    if not is_complete(test_dir, test_params(speakers, per_class, seed, recipe)):
        if test_dir.exists():
            print(f"{test_dir} is incomplete or was made with other settings: regenerating.")
        generate_test_set(test_dir, speakers, per_class, seed, workers, recipe)
    return train_dir, test_dir


# ----------------------------------------------------------------------------- example clip
EXAMPLE_STREAM = 7   # seed stream of the course's example clip: a speaker of no dataset split


def example_clip(word: str = "yes", seed: int = config.SEED) -> np.ndarray:
    """One deterministic int16 utterance of ``word`` by a speaker outside every generated split."""
    if word not in config.ALL_WORDS:
        raise ValueError(f"word {word!r} is not one of the 35 Speech Commands words: "
                         f"use one of {', '.join(config.ALL_WORDS)}.")
    rng = np.random.default_rng([seed, EXAMPLE_STREAM])
    speaker = Speaker(index=-1, sid="example", split="example", voice="en-us+f2", rate=160,
                      pitch=55, pitch_range=50, level_db=-6.0, noise_db=-60.0,
                      lowpass_hz=0.0, highpass_hz=0.0)
    espeak = Espeak()
    try:
        return render_word(espeak, word, speaker, rng)
    finally:
        espeak.close()
