"""MFCC features exactly as the MLPerf Tiny KWS reference computes them, batched in PyTorch.

Pipeline (reference: mlcommons/tiny, keyword_spotting/get_dataset.py):

    wave -> float32 / max(wave) -> pad/crop to 1 s -> [training: shift, add noise, clip to [-1, 1]]
         -> frames of 480 every 320 -> periodic Hann -> |FFT 512| -> 40 mel bins (20-4000 Hz)
         -> log(x + 1e-6) -> DCT-II scaled as tf.signal.mfccs_from_log_mel_spectrograms -> first 10

The stages are separate functions so that a streaming front end can compute the mel energies of
single new frames (``mel_energies``) and apply the final step (``mfcc_from_mel``) on its own.

Where we knowingly differ from the reference code (its features are matched to 1e-5, see
tests/test_features.py):
- A clip with max <= 0 is scaled by its largest |x| (the reference gives NaN/inf), see peak_scale.
- A clip longer than 1 s is cropped after scaling (the reference fails on it).
- The reference's time shift is pinned to zero (it pads 2 samples and slices from 2) although its
  flags declare +-100 ms; we shift each clip at random by up to MAX_SHIFT_SAMPLES.
- The reference draws the noise recording, offset and gain with numpy while tf.data traces the
  map function, i.e. once for the whole run; we draw them per clip, as its flags describe.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torchaudio

from kws_utils import config, files, progress
from kws_utils.errors import FileFormatError, InputError, InputTypeError

LOWER_EDGE_HZ = 20.0      # mel filterbank range of the reference (TF's classic MFCC defaults)
UPPER_EDGE_HZ = 4000.0
LOG_OFFSET = 1e-6         # keeps log finite on silent frames, as in the reference
N_BINS = config.N_FFT // 2 + 1
BACKGROUND_FREQUENCY = 0.8   # MLPerf --background_frequency: share of training clips given noise
BACKGROUND_VOLUME = 0.1      # MLPerf --background_volume: noise gain drawn from U[0, this]
# +-100 ms is the --time_shift_ms default of the MLPerf flags and of the TF Speech Commands
# tutorial it derives from. It lives here, not in config, because only augmentation uses it.
MAX_SHIFT_SAMPLES = config.SAMPLE_RATE // 10
# decode_wav (which the reference uses for background noise) maps int16 to [-1, 1) this way.
INT16_SCALE = 32768.0
# The spectral stages run in float64 by default: then we match the reference maths to ~1e-5.
# float32 is ~2x faster on CPU and agrees to ~1e-5 on speech, but on a pure tone the FFT rounding
# of far-off bins (|X| ~ 1e-4) moves the MFCC by a few 1e-3 - so does TF's own float32 run.
COMPUTE_DTYPE = torch.float64
# Clips per batch in compute_features: ~100 clips of float64 frames stay in cache; thousands
# at once are memory-bound and run 2-3x slower on CPU (see benchmarks/bench_features.py).
BATCH_SIZE = 128
# SpecAugment-style time masks of the training views (time_mask): widest span, in 20 ms frames.
TIME_MASK_FRAMES = 10

Array = np.ndarray | torch.Tensor


# ----------------------------------------------------------------------------- constants

def hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    """HTK mel scale, the one tf.signal.linear_to_mel_weight_matrix uses."""
    return 1127.0 * torch.log1p(hz / 700.0)


@functools.lru_cache(maxsize=None)
def mel_matrix(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(257, 40) weights mapping FFT magnitudes to mel energies: triangles in the mel domain."""
    nyquist = config.SAMPLE_RATE / 2
    # The DC bin is left out of the triangles and gets a zero row, as in TF.
    bin_mel = hz_to_mel(torch.linspace(0.0, nyquist, N_BINS, dtype=torch.float64)[1:])[:, None]
    edges = torch.linspace(hz_to_mel(torch.tensor(LOWER_EDGE_HZ, dtype=torch.float64)).item(),
                           hz_to_mel(torch.tensor(UPPER_EDGE_HZ, dtype=torch.float64)).item(),
                           config.N_MELS + 2, dtype=torch.float64)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bin_mel - lower) / (center - lower)
    falling = (upper - bin_mel) / (upper - center)
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return torch.cat([torch.zeros(1, config.N_MELS, dtype=torch.float64), weights]).to(dtype)


@functools.lru_cache(maxsize=None)
def dct_matrix(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(40, 10) DCT-II with TF's MFCC scaling: sqrt(2/N) cos(pi k (2n+1) / 2N) for every k.

    Unlike an orthonormal DCT the k = 0 row is not divided by sqrt(2), so c0 is sqrt(2) larger;
    this is what tf.signal.mfccs_from_log_mel_spectrograms returns and what the model expects.
    """
    n = torch.arange(config.N_MELS, dtype=torch.float64)[:, None]
    k = torch.arange(config.N_MFCC, dtype=torch.float64)[None, :]
    basis = torch.cos(math.pi * k * (2 * n + 1) / (2 * config.N_MELS))
    return (basis * math.sqrt(2.0 / config.N_MELS)).to(dtype)


@functools.lru_cache(maxsize=None)
def hann_window(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Periodic Hann window of one frame (TF's default)."""
    return torch.hann_window(config.FRAME_LENGTH, periodic=True, dtype=dtype)


# ----------------------------------------------------------------------------- input handling

def _as_tensor(value: Array, name: str) -> torch.Tensor:
    """``value`` as a tensor, with an error naming the argument when it is not numeric."""
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise InputTypeError(f"{name} must be a numeric array (numpy or torch), got "
                             f"{type(value).__name__} ({err}).") from None


def as_batch(wave: Array, name: str = "wave") -> tuple[torch.Tensor, bool]:
    """Check a clip (T,) or batch (N, T) and return it as a 2-D tensor plus 'was it one clip'."""
    tensor = _as_tensor(wave, name)
    if tensor.ndim not in (1, 2) or tensor.numel() == 0:
        raise InputError(f"Expected {name} to be one clip of shape (T,) or a batch of shape (N, T) "
                         f"with T > 0 samples, got shape {tuple(tensor.shape)}. Pass the waveform "
                         "itself (e.g. data.load_audio(path)); stack equal-length clips for a batch.")
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise InputTypeError(f"Expected {name} as an int16 or float waveform, got dtype "
                             f"{tensor.dtype}.")
    if not tensor.is_floating_point() and tensor.dtype not in (torch.int16, torch.int32, torch.int64):
        # uint8 WAV samples are centred on 128 and uint16 on 32768: read as int16 they are garbage
        raise InputTypeError(f"{name} has dtype {tensor.dtype}: give int16 samples (as "
                             "data.load_audio returns) or floats in [-1, 1]. Convert unsigned "
                             "audio first, e.g. (wave.astype(np.int16) - 128) * 256 for 8-bit.")
    if not tensor.is_floating_point() and tensor.numel() and int(tensor.abs().max()) > 32768:
        raise InputError(f"{name} holds integer samples beyond the int16 range (peak "
                         f"{int(tensor.abs().max())}): give int16 samples or floats in [-1, 1].")
    if tensor.ndim == 2 and tensor.shape[-1] < config.FRAME_LENGTH:
        # (16000, 1) or (16000, 2) is one clip laid out as (samples, channels), not 16000 clips.
        raise InputError(f"{name} has shape {tuple(tensor.shape)}: clips of {tensor.shape[-1]} "
                         f"samples are shorter than one {config.FRAME_LENGTH}-sample frame. "
                         "Batches are (clips, samples); for a (samples, channels) array pass "
                         "one mono channel, e.g. wave[:, 0] or wave.mean(axis=1).")
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise InputError(f"{name} holds NaN or infinite samples; the features would be NaN. "
                         "Check how the audio was made or loaded.")
    return (tensor[None], True) if tensor.ndim == 1 else (tensor, False)


def _check_dtype(dtype: object) -> torch.dtype:
    """The compute dtype, which must be torch.float32 or torch.float64."""
    if dtype not in (torch.float32, torch.float64):
        raise InputTypeError(f"dtype={dtype!r}: compute the features in torch.float32 or "
                             "torch.float64.")
    return dtype


def fix_length(x: torch.Tensor, length: int = config.CLIP_SAMPLES) -> torch.Tensor:
    """Zero-pad at the end or crop the last axis to ``length`` samples."""
    if x.shape[-1] >= length:
        return x[..., :length]
    return torch.nn.functional.pad(x, (0, length - x.shape[-1]))


def peak_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-clip divisor (N, 1): the clip's maximum, as the reference (not its largest |x|).

    The reference divides by max(wave) unguarded; for max <= 0 that is NaN/inf (all-zero clip)
    or a sign flip that can push samples far beyond 1. Such clips hold no positive sample, so we
    divide by the largest |x| instead (clip lands in [-1, 0]); an all-zero clip is left at zero,
    which gives the constant features of log(1e-6). Clips with max > 0 match the reference exactly.
    """
    peak = x.amax(dim=-1, keepdim=True)
    magnitude = x.abs().amax(dim=-1, keepdim=True)
    fallback = torch.where(magnitude > 0, magnitude, torch.ones_like(magnitude))
    return torch.where(peak > 0, peak, fallback)


def normalize(wave: Array) -> torch.Tensor:
    """Waveform(s) -> float32 divided by each clip's max, padded/cropped to (..., 16000)."""
    x, single = as_batch(wave)
    x = x.to(torch.float32)
    x = fix_length(x / peak_scale(x))
    return x[0] if single else x


# ----------------------------------------------------------------------------- spectral stages

def split_frames(x: torch.Tensor) -> torch.Tensor:
    """(..., 16000) -> (..., 49, 480) overlapping frames, no end padding (TF stft default)."""
    return x.unfold(-1, config.FRAME_LENGTH, config.FRAME_STEP)


def frame_magnitudes(frames: torch.Tensor) -> torch.Tensor:
    """(..., 480) frames -> (..., 257) magnitudes of the Hann-windowed 512-point FFT."""
    window = hann_window(frames.dtype).to(frames.device)
    return torch.fft.rfft(frames * window, n=config.N_FFT).abs()


def mel_energies(frames: torch.Tensor) -> torch.Tensor:
    """(..., 480) frames -> (..., 40) mel-weighted magnitudes (before the log)."""
    return frame_magnitudes(frames) @ mel_matrix(frames.dtype).to(frames.device)


def mfcc_from_mel(mel: torch.Tensor) -> torch.Tensor:
    """(..., 40) mel energies -> (..., 10) MFCC: log(x + 1e-6) then the DCT."""
    return torch.log(mel + LOG_OFFSET) @ dct_matrix(mel.dtype).to(mel.device)


def mfcc_from_normalized(x: torch.Tensor, dtype: torch.dtype = COMPUTE_DTYPE) -> torch.Tensor:
    """(..., 16000) normalised float clips -> (..., 49, 10) float32 MFCC, computed in ``dtype``."""
    return mfcc_from_mel(mel_energies(split_frames(x.to(_check_dtype(dtype))))).to(torch.float32)


def mfcc(wave: Array, dtype: torch.dtype = COMPUTE_DTYPE) -> torch.Tensor:
    """MLPerf-Tiny MFCC of int16 or float clip(s) (T,) or (N, T) -> float32 (..., 49, 10)."""
    return mfcc_from_normalized(normalize(wave), dtype)


# ----------------------------------------------------------------------------- augmentation

def time_shift(clips: torch.Tensor, generator: torch.Generator,
               max_shift_samples: int = MAX_SHIFT_SAMPLES) -> torch.Tensor:
    """Shift each clip (N, T) by a random whole number of samples in [-max, max], zero-filled."""
    _check_float_clips(clips)
    if (isinstance(max_shift_samples, bool) or not isinstance(max_shift_samples, (int, np.integer))
            or max_shift_samples < 0):
        raise InputError(f"max_shift_samples={max_shift_samples!r}: give a whole number of "
                         f"samples >= 0 (the default is {MAX_SHIFT_SAMPLES}, 100 ms).")
    if not isinstance(generator, torch.Generator):
        raise InputTypeError(f"generator must be a torch.Generator (e.g. torch.Generator()."
                             f"manual_seed(0)), got {type(generator).__name__}.")
    n, length = clips.shape
    shift = torch.randint(-max_shift_samples, max_shift_samples + 1, (n, 1), generator=generator)
    source = (torch.arange(length)[None, :] - shift).to(clips.device)
    inside = (source >= 0) & (source < length)
    shifted = clips.gather(1, source.clamp(0, length - 1))
    return torch.where(inside, shifted, torch.zeros((), dtype=clips.dtype, device=clips.device))


def noise_tensor(noise: Array) -> torch.Tensor:
    """One background recording as 1-D float32 in [-1, 1] (int16 is scaled like decode_wav)."""
    tensor = _as_tensor(noise, "noise")
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise InputError("a background noise recording holds NaN or infinite samples; load the "
                         f"files of {config.BACKGROUND_NOISE_DIR} with data.load_audio.")
    if tensor.ndim != 1 or tensor.shape[0] < config.CLIP_SAMPLES:
        raise InputError(f"Each background noise must be 1-D with at least {config.CLIP_SAMPLES} "
                         f"samples (1 s), got shape {tuple(tensor.shape)}. Load the files of "
                         f"{config.BACKGROUND_NOISE_DIR} with data.load_audio.")
    if not tensor.is_floating_point():
        return tensor.to(torch.float32) / INT16_SCALE
    return tensor.to(torch.float32)


def _check_float_clips(clips: torch.Tensor) -> None:
    """Refuse clips that are not a float batch (N, T) in [-1, 1] (int16 would clamp to -1, 0, 1)."""
    if not isinstance(clips, torch.Tensor) or not clips.is_floating_point() or clips.ndim != 2:
        raise InputTypeError(f"clips must be a float tensor (N, T) in [-1, 1], got "
                             f"{getattr(clips, 'dtype', type(clips).__name__)} of shape "
                             f"{tuple(getattr(clips, 'shape', ()))}; pass features.normalize(waves).")


def mix_background(clips: torch.Tensor, noise_bank: Sequence[Array], generator: torch.Generator,
                   prob: float = BACKGROUND_FREQUENCY,
                   max_volume: float = BACKGROUND_VOLUME) -> torch.Tensor:
    """Add a random 1 s noise segment at gain U[0, max_volume] to ``prob`` of clips; clip to +-1."""
    _check_float_clips(clips)
    if not 0.0 <= float(prob) <= 1.0:
        raise InputError(f"prob={prob!r}: the share of clips given noise is a probability in "
                         f"[0, 1] (default {BACKGROUND_FREQUENCY}).")
    if not 0.0 <= float(max_volume) < math.inf:
        raise InputError(f"max_volume={max_volume!r}: the largest noise gain must be a finite "
                         f"number >= 0 (default {BACKGROUND_VOLUME}).")
    if len(noise_bank) == 0:
        raise InputError("noise_bank is empty: pass the background recordings (a list of 1-D "
                         "arrays), or skip mix_background for no noise.")
    n, length = clips.shape
    which = torch.randint(len(noise_bank), (n,), generator=generator)
    position = torch.rand(n, generator=generator)
    volume = torch.rand(n, generator=generator) * max_volume
    volume = torch.where(torch.rand(n, generator=generator) < prob, volume, torch.zeros(()))
    segments = torch.zeros(n, length)
    # Loop over the few recordings, not the clips: each gather is vectorised over its clips.
    for index, noise in enumerate(noise_bank):
        rows = (which == index).nonzero().flatten()
        if rows.numel() == 0:
            continue
        noise = noise_tensor(noise)
        start = (position[rows] * (noise.shape[0] - length + 1)).long()
        segments[rows] = noise[start[:, None] + torch.arange(length)[None, :]]
    mixed = clips + (volume[:, None] * segments).to(clips.device, clips.dtype)
    return mixed.clamp(-1.0, 1.0)


def augmented_mfcc(waves: Array, noise_bank: Sequence[Array], generator: torch.Generator,
                   max_shift_samples: int = MAX_SHIFT_SAMPLES,
                   dtype: torch.dtype = COMPUTE_DTYPE) -> torch.Tensor:
    """Training features: normalise -> time shift -> add background noise -> clip -> MFCC."""
    x, single = as_batch(waves)
    x = time_shift(normalize(x), generator, max_shift_samples)
    feats = mfcc_from_normalized(mix_background(x, noise_bank, generator), dtype)
    return feats[0] if single else feats


def time_mask(feats: torch.Tensor, generator: torch.Generator, masks: int,
              max_frames: int = TIME_MASK_FRAMES) -> torch.Tensor:
    """SpecAugment-style time masking: ``masks`` spans of up to ``max_frames`` frames per clip.

    A masked frame becomes the clip's mean frame (MFCCs have no natural zero). torchaudio draws
    the spans from the global RNG, so it is seeded from ``generator`` inside a forked RNG state.
    """
    if isinstance(masks, bool) or not isinstance(masks, int) or masks < 0:
        raise InputError(f"masks={masks!r}: give a whole number of time masks per clip >= 0 (0 for none).")
    if feats.ndim != 4:
        raise InputError(f"feats has shape {tuple(feats.shape)}: give features as (N, 1, frames, coefficients).")
    if masks == 0:
        return feats
    mean = feats.mean(dim=2, keepdim=True)
    centred = feats - mean
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        for _ in range(masks):
            centred = torchaudio.functional.mask_along_axis_iid(centred, max_frames, 0.0, axis=2)
    return centred + mean


# ----------------------------------------------------------------------------- datasets

def compute_features(waves: Array, batch_size: int = BATCH_SIZE,
                     augment: tuple[Sequence[Array], torch.Generator] | None = None,
                     desc: str = "MFCC", dtype: torch.dtype = COMPUTE_DTYPE) -> torch.Tensor:
    """Features of (N, T) clips in batches with a progress bar -> float32 (N, 1, 49, 10)."""
    waves = _as_tensor(waves, "waves")
    if waves.ndim != 2:
        raise InputError(f"Expected waves as a batch of clips (N, T), got shape "
                         f"{tuple(waves.shape)}; stack equal-length clips (e.g. data.fix_length) "
                         "into one array.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch_size={batch_size!r}: give a whole number of clips >= 1 "
                         f"(default {BATCH_SIZE}).")
    if augment is not None and (not isinstance(augment, tuple) or len(augment) != 2):
        raise InputTypeError("augment must be None or a pair (noise_bank, torch.Generator).")
    _check_dtype(dtype)
    if len(waves):
        as_batch(waves, "waves")     # checks length, dtype and finite values once, up front
    out = torch.empty(len(waves), *config.INPUT_SHAPE)
    for start in progress.bar(range(0, len(waves), batch_size), desc=desc, unit="batch"):
        batch = waves[start:start + batch_size]
        if augment is None:
            feats = mfcc(batch, dtype)
        else:
            feats = augmented_mfcc(batch, *augment, dtype=dtype)
        out[start:start + len(batch), 0] = feats
    return out


def cached(path: Path, build: Callable[[], torch.Tensor | dict],
           shape: tuple[int, ...] | None = None) -> torch.Tensor | dict:
    """Load ``path`` if it exists (a tensor of ``shape`` if given), else build, save atomically."""
    path = Path(path)
    if path.is_file():
        value = files.load_torch(path, "feature cache")
        if shape is not None and (not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(shape)):
            found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise FileFormatError(f"feature cache {path} holds {found}, expected a tensor of shape "
                                  f"{tuple(shape)}: it is stale or from another dataset. Delete it "
                                  "and run again to rebuild it.")
        return value
    value = build()
    # atomic_path: a crash mid-write leaves the old state, never a truncated file at ``path``.
    with files.atomic_path(path) as tmp:
        torch.save(value, tmp)
    return value


def spectrogram_db(wave: Array) -> torch.Tensor:
    """(49, 257) magnitude spectrogram in dB of one clip, framed exactly like the MFCC."""
    magnitudes = frame_magnitudes(split_frames(normalize(wave).to(COMPUTE_DTYPE)))
    return (20 * torch.log10(magnitudes + LOG_OFFSET)).to(torch.float32)
