"""Streaming keyword detection: a sliding 1 s window over a long recording, run through ONNX.

Feature computation is incremental. Everything up to the mel energies (framing, Hann window,
|FFT|, mel weights) is linear in the signal for a positive gain, and the reference divides each
1 s window by its maximum before the STFT, so

    mfcc(window) == mfcc_from_mel(mel_energies(frames of the raw window) / window_max).

The mel energies of each 20 ms frame of the *raw* signal are therefore computed once, when the
frame arrives, and every window reuses the 49 it covers; only the division by the window's
maximum and the log/DCT are redone per hop. The window maximum itself comes from cached per-block
(20 ms) maxima and minima.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import matplotlib.pyplot as plt
import numpy as np
import onnxruntime as ort
import torch
from scipy.signal import resample_poly

from kws_utils import config, data, export, features, plots
from kws_utils.errors import InputError, InputTypeError
from kws_utils.progress import bar as progress_bar

FRAME_MS = 1000 * config.FRAME_STEP // config.SAMPLE_RATE          # 20 ms
WINDOW_BLOCKS = config.CLIP_SAMPLES // config.FRAME_STEP             # 50 blocks of 20 ms per 1 s
KEYWORD_IDS = tuple(range(len(config.KEYWORDS)))
MATCH_TOLERANCE_S = 1.0   # a decision may come up to this long after its clip ends (window lag)


# ----------------------------------------------------------------------------- checks
def hop_frames(hop_ms: int) -> int:
    """Number of 20 ms frames per hop; rejects hops that are not a positive multiple of 20 ms."""
    if isinstance(hop_ms, (float, np.floating)) and float(hop_ms).is_integer():
        hop_ms = int(hop_ms)     # 100.0 means 100
    if not isinstance(hop_ms, (int, np.integer)) or hop_ms <= 0 or hop_ms % FRAME_MS:
        raise InputError(f"hop_ms={hop_ms!r}: the hop must be a positive whole multiple of the "
                         f"{FRAME_MS} ms frame step (e.g. 20, 40, 100), so that each window reuses "
                         "whole frames of the previous one.")
    return int(hop_ms) // FRAME_MS


def check_threshold(threshold: float) -> float:
    """Return the threshold as a float, or raise unless it is a probability in [0, 1]."""
    if isinstance(threshold, (bool, str)) or not isinstance(threshold, (int, float, np.number)) \
            or not 0.0 <= float(threshold) <= 1.0:
        raise InputError(f"threshold={threshold!r}: a posterior threshold must be a number in "
                         "[0, 1].")
    return float(threshold)


def _check_ms(name: str, value: object, least: float = 0.0) -> float:
    """A duration in ms (or s) that must be a finite number >= ``least``."""
    if isinstance(value, (bool, str)) or not isinstance(value, (int, float, np.number)) \
            or not least <= float(value) < np.inf:
        raise InputError(f"{name}={value!r}: give a finite number >= {least:g}.")
    return float(value)


def prepare_recording(audio: np.ndarray, sample_rate: int = config.SAMPLE_RATE) -> np.ndarray:
    """A 1-D recording as float64 at 16 kHz (resampled with a message); at least 1 s long."""
    audio = np.asarray(audio)
    if audio.ndim == 2 and 1 in audio.shape:
        audio = audio.reshape(-1)    # (1, T) or (T, 1): one channel
    if audio.ndim != 1:
        fix = "audio.mean(axis=1)" if audio.ndim == 2 and audio.shape[0] > audio.shape[1] else (
            "audio.mean(axis=0) (or audio[0] for the first channel)")
        raise InputError(f"expected audio as a mono recording of shape (T,), got shape "
                         f"{audio.shape}; mix the channels down first: {fix}.")
    if not (np.issubdtype(audio.dtype, np.floating) or np.issubdtype(audio.dtype, np.integer)):
        raise InputTypeError(f"audio must hold int or float samples, got dtype {audio.dtype}.")
    if not np.isfinite(audio).all():
        raise InputError("audio holds NaN or infinite samples; check how it was recorded or "
                         "loaded.")
    sample_rate = data._check_sample_rate(sample_rate)
    if sample_rate != config.SAMPLE_RATE:
        print(f"recording at {sample_rate} Hz: resampling to {config.SAMPLE_RATE} Hz")
        gcd = np.gcd(int(sample_rate), config.SAMPLE_RATE)
        audio = resample_poly(audio.astype(np.float64), config.SAMPLE_RATE // gcd,
                              int(sample_rate) // gcd)
    if audio.size < config.CLIP_SAMPLES:
        raise InputError(f"the recording holds {audio.size} samples ({audio.size / config.SAMPLE_RATE:.3f} s);"
                         f" streaming needs at least one full 1 s window ({config.CLIP_SAMPLES} samples).")
    return audio.astype(np.float64)


# ----------------------------------------------------------------------------- features
def window_count(n_samples: int, hop: int) -> int:
    """Number of full 1 s windows starting every ``hop`` frames."""
    return (n_samples - config.CLIP_SAMPLES) // (hop * config.FRAME_STEP) + 1


def frame_mels(audio: np.ndarray, first: int, count: int) -> torch.Tensor:
    """Mel energies (count, 40) of the raw signal's frames first .. first+count-1 (float64)."""
    start = first * config.FRAME_STEP
    stop = (first + count - 1) * config.FRAME_STEP + config.FRAME_LENGTH
    return features.mel_energies(features.split_frames(torch.from_numpy(audio[start:stop])))


def stream_features(audio: np.ndarray, hop_ms: int = config.STREAM_HOP_MS,
                    incremental: bool = True) -> Iterator[torch.Tensor]:
    """Yield the (49, 10) MFCC of each 1 s window, every hop, computing only new frames' mels."""
    hop = hop_frames(hop_ms)
    audio = prepare_recording(audio)
    mels = np.zeros((0, config.N_MELS))
    extremes = np.zeros((0, 2))          # (max, min) of each 20 ms block in the window
    done_frames = done_blocks = 0        # frames / blocks computed so far
    for w in range(window_count(audio.size, hop)):
        first = w * hop
        if not incremental:
            yield features.mfcc(audio[first * config.FRAME_STEP:][:config.CLIP_SAMPLES])
            continue
        # Only frames and 20 ms blocks not seen by an earlier window are computed here.
        start = max(done_frames, first)
        new_mels = frame_mels(audio, start, first + config.N_FRAMES - start).numpy()
        mels = np.concatenate([mels, new_mels])[-config.N_FRAMES:]
        start = max(done_blocks, first)
        blocks = audio[start * config.FRAME_STEP:(first + WINDOW_BLOCKS) * config.FRAME_STEP]
        blocks = blocks.reshape(-1, config.FRAME_STEP)
        new_ext = np.stack([blocks.max(axis=1), blocks.min(axis=1)], axis=1)
        extremes = np.concatenate([extremes, new_ext])[-WINDOW_BLOCKS:]
        done_frames, done_blocks = first + config.N_FRAMES, first + WINDOW_BLOCKS
        # peak_scale of the block extremes is the window's own divisor (max, or |x| fallback).
        peak = features.peak_scale(torch.from_numpy(extremes).reshape(1, -1)).item()
        yield features.mfcc_from_mel(torch.from_numpy(mels / peak)).to(torch.float32)


# ----------------------------------------------------------------------------- inference
@dataclass
class StreamResult:
    """Per-hop decision times (window ends, s), raw and smoothed posteriors (T, 12)."""

    times: np.ndarray
    posteriors: np.ndarray
    smoothed: np.ndarray
    hop_ms: int
    smooth_ms: int
    duration_s: float


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, computed stably."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def smooth(posteriors: np.ndarray, span: int) -> np.ndarray:
    """Causal moving average over the last ``span`` rows (fewer at the start)."""
    if isinstance(span, bool) or not isinstance(span, (int, np.integer)) or span < 1:
        raise InputError(f"smoothing span={span!r}: use a whole number of at least one hop.")
    posteriors = np.asarray(posteriors)
    if posteriors.ndim != 2 or not np.isfinite(posteriors).all():
        raise InputError(f"posteriors must be a finite 2-D array (hops, classes), got shape "
                         f"{posteriors.shape}.")
    csum = np.cumsum(np.vstack([np.zeros((1, posteriors.shape[1])), posteriors]), axis=0)
    rows = np.arange(1, len(posteriors) + 1)
    lo = np.maximum(rows - span, 0)
    return (csum[rows] - csum[lo]) / (rows - lo)[:, None]


def onnx_session(path: str) -> ort.InferenceSession:
    """A single-threaded CPU session (one decision at a time, as on a device)."""
    export.load_onnx(path)    # a clear error for a missing or non-ONNX file
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def logits_of(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    """Float logits of a batch (N, 1, 49, 10); integer output codes are scaled by the file's scale."""
    out = session.run(None, {session.get_inputs()[0].name: x})[0]
    scale = session.get_modelmeta().custom_metadata_map.get(export.OUTPUT_SCALE_KEY)
    if scale is None and np.issubdtype(out.dtype, np.floating):
        return out
    # TI's integer form carries the output codes in float32; the recorded scale turns them to logits
    if scale is None:
        raise InputError("the ONNX model outputs integer logit codes and records no output scale, "
                         "so no posteriors can be formed; export it with kws_utils (quant) again.")
    return out.astype(np.float32) * np.float32(scale)


def run_stream(onnx_path: str, audio: np.ndarray, sample_rate: int = config.SAMPLE_RATE,
               hop_ms: int = config.STREAM_HOP_MS, smooth_ms: int = config.STREAM_SMOOTH_MS,
               incremental: bool = True, progress: bool = True) -> StreamResult:
    """Slide the model over a recording: one batch-1 inference per hop, then smoothing."""
    hop = hop_frames(hop_ms)
    _check_ms("smooth_ms", smooth_ms)
    audio = prepare_recording(audio, sample_rate)
    session = onnx_session(onnx_path)
    width = session.get_outputs()[0].shape[-1]
    if width != len(config.LABELS):
        raise InputError(f"{onnx_path}: the model has {width} outputs, not the "
                         f"{len(config.LABELS)} classes of config.LABELS, so its scores cannot be "
                         "read as keywords. Export the course's 12-class DS-CNN.")
    n = window_count(audio.size, hop)
    windows = stream_features(audio, hop_ms, incremental)
    threads = torch.get_num_threads()
    # Per-hop tensors are tiny: extra torch threads only add hand-over cost (2-10x slower here).
    torch.set_num_threads(1)
    try:
        logits = [logits_of(session, feats.numpy()[None, None])[0]
                  for feats in progress_bar(windows, total=n, desc="streaming", unit="hop",
                                         disable=not progress)]
    finally:
        torch.set_num_threads(threads)
    posteriors = softmax(np.stack(logits).astype(np.float64))
    times = (np.arange(n) * hop * config.FRAME_STEP + config.CLIP_SAMPLES) / config.SAMPLE_RATE
    span = max(1, round(smooth_ms / hop_ms))
    return StreamResult(times, posteriors, smooth(posteriors, span), hop_ms, smooth_ms,
                        audio.size / config.SAMPLE_RATE)


# ----------------------------------------------------------------------------- detection
@dataclass(frozen=True)
class Detection:
    """A keyword decision: when (end of the window, s), which class, with what smoothed score."""

    time_s: float
    label: int
    score: float


@dataclass(frozen=True)
class Event:
    """A clip placed in the long recording: its class and span (s)."""

    label: int
    start_s: float
    end_s: float


def detect(result: StreamResult, threshold: float = config.STREAM_THRESHOLD,
           refractory_ms: int = config.STREAM_REFRACTORY_MS, rearm: bool = True) -> list[Detection]:
    """Fire when a keyword's smoothed score reaches the threshold; re-arm once it falls below."""
    threshold = check_threshold(threshold)
    refractory_s = _check_ms("refractory_ms", refractory_ms) / 1000
    scores = result.smoothed[:, KEYWORD_IDS]
    out: list[Detection] = []
    armed = True
    for time_s, row in zip(result.times, scores):
        best = row.max()
        if best < threshold:
            armed = True      # the plateau of the last word is over: the next crossing is a new word
        elif (armed or not rearm) and (not out or time_s - out[-1].time_s >= refractory_s):
            out.append(Detection(float(time_s), int(row.argmax()), float(best)))
            armed = False
    return out


@dataclass(frozen=True)
class Score:
    """Detection quality at one threshold."""

    threshold: float
    hits: int
    misses: int
    false_alarms: int
    hours: float

    @property
    def fa_per_hour(self) -> float:
        """False alarms per hour of audio."""
        return self.false_alarms / self.hours

    @property
    def miss_rate(self) -> float:
        """Share of keyword events without a correct detection."""
        return self.misses / max(self.hits + self.misses, 1)


def match(detections: Sequence[Detection], events: Sequence[Event],
          tolerance_s: float = MATCH_TOLERANCE_S) -> dict[int, int]:
    """Map detection index -> keyword event index it correctly finds (each event once)."""
    _check_ms("tolerance_s", tolerance_s)
    found: dict[int, int] = {}
    taken: set[int] = set()
    for d, det in enumerate(detections):
        for e, ev in enumerate(events):
            if (e not in taken and ev.label == det.label
                    and ev.start_s <= det.time_s <= ev.end_s + tolerance_s):
                found[d] = e
                taken.add(e)
                break
    return found


def score(detections: Sequence[Detection], events: Sequence[Event], duration_s: float,
          threshold: float = float("nan")) -> Score:
    """Hits, misses and false alarms (wrong word, no word, or a repeat) of one detection run."""
    if _check_ms("duration_s", duration_s) == 0:
        raise InputError("duration_s=0: false alarms per hour need a recording longer than 0 s.")
    keyword_events = [ev for ev in events if ev.label in KEYWORD_IDS]
    hits = len(match(detections, keyword_events))
    return Score(threshold, hits, len(keyword_events) - hits, len(detections) - hits,
                 duration_s / 3600)


FALSE_ALARM_CAUSES = ("repeat of a found word", "wrong keyword during a keyword clip",
                      "during an unknown word", "no word in view")


def false_alarm_causes(detections: Sequence[Detection], events: Sequence[Event],
                       tolerance_s: float = MATCH_TOLERANCE_S) -> dict[str, int]:
    """Count the false alarms of a run by what was in view when each fired (FALSE_ALARM_CAUSES)."""
    keyword_events = [ev for ev in events if ev.label in KEYWORD_IDS]
    found = match(detections, keyword_events, tolerance_s)
    counts = dict.fromkeys(FALSE_ALARM_CAUSES, 0)
    for d, det in enumerate(detections):
        if d in found:
            continue
        in_view = [ev for ev in events if ev.start_s <= det.time_s <= ev.end_s + tolerance_s]
        if any(ev.label == det.label for ev in in_view if ev.label in KEYWORD_IDS):
            counts[FALSE_ALARM_CAUSES[0]] += 1
        elif any(ev.label in KEYWORD_IDS for ev in in_view):
            counts[FALSE_ALARM_CAUSES[1]] += 1
        elif in_view:
            counts[FALSE_ALARM_CAUSES[2]] += 1
        else:
            counts[FALSE_ALARM_CAUSES[3]] += 1
    return counts


def fa_resolution(duration_s: float) -> float:
    """The false alarms per hour that a single false alarm is on a recording of ``duration_s``."""
    if _check_ms("duration_s", duration_s) == 0:
        raise InputError("duration_s=0: false alarms per hour need a recording longer than 0 s.")
    return 3600 / duration_s


def sweep(result: StreamResult, events: Sequence[Event], thresholds: Sequence[float],
          refractory_ms: int = config.STREAM_REFRACTORY_MS, rearm: bool = True) -> list[Score]:
    """Score every threshold (the model ran once; only the decisions are redone)."""
    if isinstance(thresholds, (int, float)):
        raise InputTypeError(f"thresholds={thresholds!r}: pass a list of thresholds, e.g. [0.5, 0.6].")
    return [score(detect(result, t, refractory_ms, rearm), events, result.duration_s, t)
            for t in thresholds]


# ----------------------------------------------------------------------------- test recording
def _noise_bed(bank: Sequence[np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    """n samples of background noise: random 5 s pieces of random recordings, unit RMS."""
    piece = 5 * config.SAMPLE_RATE
    parts = []
    for start in range(0, n, piece):
        rec = bank[rng.integers(len(bank))]
        offset = rng.integers(0, max(rec.size - piece, 0) + 1)
        part = np.resize(rec[offset:offset + piece], min(piece, n - start)).astype(np.float64)
        parts.append(part / max(np.sqrt(np.mean(part ** 2)), 1e-9))
    return np.concatenate(parts)


def _check_layout(n_keywords: object, n_distractors: object, gap_s: tuple[float, float],
                  snr_db: float) -> None:
    """Raise a clear error for clip counts, gaps or a noise level a recording cannot have."""
    for name, count in (("n_keywords", n_keywords), ("n_distractors", n_distractors)):
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise InputError(f"{name}={count!r}: give a whole number of clips >= 0.")
    if n_keywords + n_distractors == 0:
        raise InputError("n_keywords and n_distractors are both 0: place at least one clip.")
    low, high = (_check_ms("gap_s", g) for g in gap_s)
    if low > high:
        raise InputError(f"gap_s={gap_s}: the shortest gap must not exceed the longest.")
    if not np.isfinite(snr_db):
        raise InputError(f"snr_db={snr_db!r}: give a finite speech-to-noise ratio in dB.")


def place_clips(clips: Sequence[data.Clip], noise: Sequence[np.ndarray], n_keywords: int,
                n_distractors: int = 0, gap_s: tuple[float, float] = (0.5, 2.0),
                snr_db: float = config.STREAM_SNR_DB, seed: int = config.SEED
                ) -> tuple[np.ndarray, list[Event]]:
    """Drawn clips at known places, gaps between, over a noise bed -> (float32 audio, events)."""
    _check_layout(n_keywords, n_distractors, gap_s, snr_db)
    if not len(noise):
        raise InputError("noise holds no recordings: pass at least one background recording.")
    rng = np.random.default_rng(seed)
    keywords = [c for c in clips if c.label in KEYWORD_IDS]
    others = [c for c in clips if c.label == config.UNKNOWN_INDEX]
    if n_keywords > len(keywords) or n_distractors > len(others):
        raise InputError(f"asked for {n_keywords} keyword / {n_distractors} unknown clips; the "
                         f"clips given hold {len(keywords)} / {len(others)}.")
    chosen = ([keywords[i] for i in rng.choice(len(keywords), n_keywords, replace=False)]
              + [others[i] for i in rng.choice(len(others), n_distractors, replace=False)])
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    audio_clips = data.load_clips(chosen, desc="clips").astype(np.float64) / features.INT16_SCALE
    gaps = rng.uniform(*gap_s, size=len(chosen) + 1)
    starts = (np.cumsum(gaps)[:-1] + np.arange(len(chosen))) * config.SAMPLE_RATE
    starts = starts.astype(int)
    total = int(starts[-1] + config.CLIP_SAMPLES + gaps[-1] * config.SAMPLE_RATE)
    speech_rms = np.median(np.sqrt(np.mean(audio_clips ** 2, axis=1)))
    audio = _noise_bed(noise, total, rng)
    audio *= speech_rms / 10 ** (snr_db / 20)
    for start, clip in zip(starts, audio_clips):
        audio[start:start + config.CLIP_SAMPLES] += clip
    events = [Event(c.label, s / config.SAMPLE_RATE, (s + config.CLIP_SAMPLES) / config.SAMPLE_RATE)
              for c, s in zip(chosen, starts)]
    return np.clip(audio, -1.0, 1.0).astype(np.float32), events


def build_long_recording(info: data.DatasetInfo, n_keywords: int, n_distractors: int = 0,
                         gap_s: tuple[float, float] = (0.5, 2.0),
                         snr_db: float = config.STREAM_SNR_DB, seed: int = config.SEED
                         ) -> tuple[np.ndarray, list[Event]]:
    """The dataset's held-out test clips over its own noise recordings (see place_clips)."""
    _check_layout(n_keywords, n_distractors, gap_s, snr_db)     # before reading any file
    return place_clips(data.splits(info)["test"], data.noise_bank(info, include_validation=True),
                       n_keywords, n_distractors, gap_s, snr_db, seed)


def noise_recordings(folder: str | Path) -> list[np.ndarray]:
    """Every wav of a background-noise folder as float32 in [-1, 1]."""
    paths = sorted(Path(folder).glob("*.wav"))
    if not paths:
        raise InputError(f"{folder}: no wav files; pass the folder of background-noise recordings.")
    return [data.load_audio(p).astype(np.float32) / features.INT16_SCALE for p in paths]


# ----------------------------------------------------------------------------- plots
def _check_plot_inputs(audio: np.ndarray, result: StreamResult, span: tuple[float, float]) -> None:
    """Raise a clear error before any drawing if the inputs cannot make a timeline."""
    if np.asarray(audio).ndim != 1 or len(audio) == 0:
        raise InputError("audio must be the non-empty 1-D recording the stream was run on.")
    if len(result.times) == 0 or len(result.times) != len(result.smoothed):
        raise InputError("the stream result holds no decisions (or mismatched arrays); run "
                         "run_stream on a recording of at least 1 s.")
    if not span[0] < span[1]:
        raise InputError(f"time span {span}: the start must come before the end.")


def plot_timeline(audio: np.ndarray, result: StreamResult, detections: Sequence[Detection],
                  events: Sequence[Event], source: str, threshold: float,
                  span: tuple[float, float] | None = None) -> plt.Figure:
    """Waveform, smoothed keyword posteriors and detections against the truth over time."""
    span = span or (0.0, result.duration_s)
    _check_plot_inputs(audio, result, span)
    found = match(detections, [ev for ev in events if ev.label in KEYWORD_IDS])
    fig, (a, b, c) = plt.subplots(3, 1, figsize=(13, 7), sharex=True,
                                  gridspec_kw={"height_ratios": [1, 1.4, 0.8]})
    t = np.arange(len(audio)) / config.SAMPLE_RATE
    a.plot(t, audio, lw=0.3)
    a.set(title="Recording", ylabel="amplitude (full scale)")
    for k in KEYWORD_IDS:
        b.plot(result.times, result.smoothed[:, k], lw=1, label=config.LABELS[k])
    b.axhline(threshold, color="k", ls="--", lw=0.8, label="threshold")
    b.set(title=f"Smoothed posteriors ({result.smooth_ms} ms average, hop {result.hop_ms} ms)",
          ylabel="posterior", ylim=(0, 1.05))
    # outside the axes, so that it never hides a posterior curve
    b.legend(ncol=1, fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0)
    for ev in events:
        color = "tab:green" if ev.label in KEYWORD_IDS else "0.7"
        c.axvspan(ev.start_s, ev.end_s, 0.5, 1.0, color=color, alpha=0.4)
        c.text((ev.start_s + ev.end_s) / 2, 0.75, config.LABELS[ev.label], ha="center", fontsize=7,
               clip_on=True)
    for i, det in enumerate(detections):
        color = "tab:blue" if i in found else "tab:red"
        c.axvline(det.time_s, 0.0, 0.5, color=color, lw=2)
        c.text(det.time_s, 0.2, config.LABELS[det.label], color=color, fontsize=7, ha="left",
               clip_on=True)
    c.set(title="Truth (top: keyword green, distractor grey) vs detections (bottom: hit blue, "
          "false alarm red)", xlabel="time (s)", yticks=[], xlim=span)
    fig.suptitle(plots.source_tag(source), fontsize=9)
    fig.tight_layout()
    return fig


def _log_ticks(values: np.ndarray) -> list[float]:
    """Ticks 1-2-5 per decade spanning ``values`` (and 0 when present), readable on a log axis."""
    positive = values[values > 0]
    if not len(positive):
        return [0.0]
    low, high = np.floor(np.log10(positive.min())), np.ceil(np.log10(positive.max()))
    ticks = [m * 10.0 ** e for e in np.arange(low, high + 1) for m in (1, 2, 5)]
    ticks = [t for t in ticks if positive.min() / 2 <= t <= positive.max() * 2]
    return ([0.0] if (values == 0).any() else []) + ticks


def plot_det(scores: Sequence[Score], source: str, chosen: float | None = None) -> plt.Figure:
    """DET curve: miss rate against false alarms per hour on log axes, one point per threshold."""
    if not scores:
        raise InputError("no scores to plot: pass the output of sweep() over some thresholds.")
    fa = np.array([s.fa_per_hour for s in scores])
    miss = np.array([s.miss_rate for s in scores]) * 100
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(fa, miss, "o-", ms=3)
    for s in scores:
        if chosen is not None and np.isclose(s.threshold, chosen):
            ax.plot(s.fa_per_hour, s.miss_rate * 100, "r*", ms=14, label=f"threshold {chosen:g}")
            ax.legend()
    # Operating points span decades of FA/h; a zero (no false alarm, no miss) needs the linear
    # part of a symmetric log scale, so symlog is used only then.
    for values, set_scale in ((fa, ax.set_xscale), (miss, ax.set_yscale)):
        positive = values[values > 0]
        if len(positive) and (values == 0).any():
            set_scale("symlog", linthresh=positive.min())
        elif len(positive):
            set_scale("log")
    for values, set_ticks in ((fa, ax.set_xticks), (miss, ax.set_yticks)):
        set_ticks(_log_ticks(values))
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(plt.NullFormatter())
    ax.set(title=f"Detection error trade-off\n{plots.source_tag(source)}",
           xlabel="false alarms per hour (log scale)", ylabel="miss rate (%, log scale)")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig
