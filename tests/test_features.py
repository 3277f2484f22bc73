"""MFCC features against TensorFlow (the MLPerf reference), plus augmentation and caching."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kws_utils import config, features

FIXTURE = Path(__file__).parent / "fixtures" / "mfcc_reference.npz"
# TF's own float32 run of the reference is 2e-3 off the exact maths on a pure tone (FFT rounding
# in bins with |X| ~ 1e-4, see make_mfcc_reference.py); no implementation can match that noise.
TOLERANCE_VS_TF_FLOAT32 = {"tone_1khz_float": 5e-3}


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    """The clips and TF features of tests/fixtures/mfcc_reference.npz."""
    with np.load(FIXTURE) as data:
        return {key: data[key] for key in data.files}


def fixture_clips(reference: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """(name, waveform) of every fixture clip."""
    return [(str(name), reference[f"wave_{i:02d}"]) for i, name in enumerate(reference["names"])]


def speech(seed: int = 0, n: int = 1, length: int = config.CLIP_SAMPLES) -> np.ndarray:
    """Random int16 clips (n, length) that are loud enough to be far from the log floor."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, length)) * 3000).astype(np.int16)


# ----------------------------------------------------------------------------- against TF

def test_mel_matrix_matches_tensorflow(reference: dict[str, np.ndarray]) -> None:
    """Our filterbank equals tf.signal.linear_to_mel_weight_matrix up to its float32 rounding."""
    np.testing.assert_allclose(features.mel_matrix().numpy(), reference["mel_matrix"], atol=2e-5)


def test_mfcc_matches_tensorflow_float64(reference: dict[str, np.ndarray]) -> None:
    """Every clip agrees with the reference pipeline run by TF in float64."""
    for i, (name, wave) in enumerate(fixture_clips(reference)):
        got = features.mfcc(wave).numpy()
        np.testing.assert_allclose(got, reference["mfcc_float64"][i], atol=1e-4, err_msg=name)


def test_mfcc_matches_mlperf_reference_float32(reference: dict[str, np.ndarray]) -> None:
    """Every clip agrees to 1e-3 with the reference exactly as MLPerf runs it (TF float32)."""
    for i, (name, wave) in enumerate(fixture_clips(reference)):
        atol = TOLERANCE_VS_TF_FLOAT32.get(name, 1e-3)
        np.testing.assert_allclose(features.mfcc(wave).numpy(), reference["mfcc"][i],
                                   atol=atol, err_msg=name)


def test_float32_compute_is_close_on_speech(reference: dict[str, np.ndarray]) -> None:
    """The fast float32 option stays within 1e-3 of the reference on speech-like clips."""
    got = features.mfcc(reference["wave_04"], dtype=torch.float32).numpy()
    np.testing.assert_allclose(got, reference["mfcc"][4], atol=1e-3)


# ----------------------------------------------------------------------------- shapes, dtypes

def test_single_clip_and_batch_shapes() -> None:
    """One clip gives (49, 10), a batch (N, 49, 10), always float32."""
    one, batch = features.mfcc(speech()[0]), features.mfcc(speech(n=3))
    assert one.shape == (config.N_FRAMES, config.N_MFCC) and one.dtype == torch.float32
    assert batch.shape == (3, config.N_FRAMES, config.N_MFCC) and batch.dtype == torch.float32


def test_batch_equals_per_clip() -> None:
    """Batching changes nothing: each row equals the clip computed alone."""
    waves = speech(seed=1, n=4)
    waves[2] //= 50   # a quiet clip: the max is per clip, not per batch
    batch = features.mfcc(waves)
    for i, wave in enumerate(waves):
        torch.testing.assert_close(batch[i], features.mfcc(wave), atol=1e-5, rtol=0)


def test_int16_equals_same_clip_as_float_and_torch() -> None:
    """int16, float and torch input of the same samples give the same features."""
    wave = speech(seed=2)[0]
    expected = features.mfcc(wave)
    torch.testing.assert_close(features.mfcc(wave.astype(np.float32) / 7.0), expected)
    torch.testing.assert_close(features.mfcc(torch.from_numpy(wave)), expected)


def test_normalize_divides_by_max_not_abs_max() -> None:
    """As the reference, the divisor is max(x): a clip peaking at -2 and +1 keeps its -2."""
    x = features.normalize(np.array([0.0, 1.0, -2.0], dtype=np.float32))
    assert x.shape == (config.CLIP_SAMPLES,)
    torch.testing.assert_close(x[:3], torch.tensor([0.0, 1.0, -2.0]))


def test_short_clip_is_zero_padded_and_long_clip_cropped() -> None:
    """A short clip equals its zero-padded copy; a long one its first second (after scaling)."""
    short = speech(seed=3, length=9000)[0]
    torch.testing.assert_close(features.mfcc(short), features.mfcc(np.pad(short, (0, 7000))))
    long = speech(seed=4, length=20000)[0]
    long[-100] = 32767   # the loudest sample is in the cropped part yet sets the scale
    scaled = long[: config.CLIP_SAMPLES].astype(np.float32) / 32767
    torch.testing.assert_close(features.mfcc(long), features.mfcc_from_normalized(
        torch.from_numpy(scaled)), atol=1e-5, rtol=0)


def test_silent_and_negative_clips_are_finite() -> None:
    """max <= 0: all-zero gives the log-floor constant features, all-negative stays finite."""
    silent = features.mfcc(np.zeros(config.CLIP_SAMPLES, np.int16))
    floor = features.mfcc_from_mel(torch.zeros(config.N_MELS, dtype=torch.float64)).float()
    torch.testing.assert_close(silent, floor.expand_as(silent))
    negative = features.mfcc(-np.abs(speech(seed=5)[0]) - 1)
    assert torch.isfinite(negative).all()


@pytest.mark.parametrize("bad", [np.zeros((2, 3, 100)), np.zeros(0), np.zeros((2, 0)),
                                 np.float32(1.0)])
def test_wrong_shapes_raise_clear_error(bad: np.ndarray) -> None:
    """Anything but (T,) or (N, T) with T > 0 is refused with the expected shape in the message."""
    with pytest.raises(ValueError, match=r"\(T,\).*\(N, T\)"):
        features.mfcc(bad)


# ----------------------------------------------------------------------------- streaming stages

def test_frame_stages_compose_to_mfcc() -> None:
    """mel_energies on single frames + mfcc_from_mel rebuilds the clip's MFCC (streaming use)."""
    x = features.normalize(speech(seed=6)[0]).double()
    frames = features.split_frames(x)
    assert frames.shape == (config.N_FRAMES, config.FRAME_LENGTH)
    rows = [features.mfcc_from_mel(features.mel_energies(frame)) for frame in frames]
    torch.testing.assert_close(torch.stack(rows).float(), features.mfcc_from_normalized(x))


# ----------------------------------------------------------------------------- augmentation

def test_time_shift_moves_clips_with_zero_fill() -> None:
    """Each row is the input shifted by at most max samples, the gap filled with zeros."""
    clips = torch.arange(1, 1001, dtype=torch.float32).repeat(8, 1)
    shifted = features.time_shift(clips, torch.Generator().manual_seed(0), max_shift_samples=50)
    for row in shifted:
        # A right shift leaves leading zeros; a left shift makes the row start past sample 1.
        shift = int((row == 0).sum()) if row[0] == 0 else 1 - int(row[0])
        assert abs(shift) <= 50
        torch.testing.assert_close(row, _shifted(clips[0], shift))
    assert len({tuple(r[:60].tolist()) for r in shifted}) > 1, "all rows got the same shift"


def _shifted(row: torch.Tensor, shift: int) -> torch.Tensor:
    """Reference shift of one row by ``shift`` samples (right if positive), zero-filled."""
    out = torch.zeros_like(row)
    if shift >= 0:
        out[shift:] = row[: len(row) - shift]
    else:
        out[:shift] = row[-shift:]
    return out


def test_mix_background_share_volume_and_clipping() -> None:
    """About 80 % of clips get noise at gain <= 0.1, the rest only clipping; all in [-1, 1]."""
    clips = torch.zeros(2000, config.CLIP_SAMPLES)
    clips[:, 0] = 3.0   # out of range on purpose: must be clipped even without noise
    bank = [torch.ones(config.CLIP_SAMPLES + 500), -torch.ones(3 * config.CLIP_SAMPLES)]
    mixed = features.mix_background(clips, bank, torch.Generator().manual_seed(0))
    assert mixed.abs().max() <= 1.0 and (mixed[:, 0] == 1.0).all()
    gain = mixed[:, 1:].abs().amax(dim=1)
    assert 0.76 < (gain > 0).float().mean() < 0.84
    assert gain.max() <= features.BACKGROUND_VOLUME
    assert (mixed[:, 1] > 0).any() and (mixed[:, 1] < 0).any(), "only one recording was used"


def test_mix_background_takes_random_segments() -> None:
    """Segments come from random offsets of random recordings in the bank."""
    length = config.CLIP_SAMPLES
    ramp = torch.arange(1, 5 * length + 1, dtype=torch.float64) / 1e6   # sample i holds i + 1
    mixed = features.mix_background(torch.zeros(50, length, dtype=torch.float64), [ramp],
                                    torch.Generator().manual_seed(1), prob=1.0, max_volume=1.0)
    # Whatever the gain, last / first = (start + length) / (start + 1) recovers the offset.
    start = (length - 1) / (mixed[:, -1] / mixed[:, 0] - 1) - 1
    assert torch.allclose(start, start.round(), atol=0.1), "segment is not a contiguous slice"
    assert start.min() >= 0 and start.max() <= 4 * length and start.round().unique().numel() > 40


def test_augmentation_is_deterministic_per_seed() -> None:
    """Same seed, same features; another seed, other features."""
    waves, bank = speech(seed=7, n=6), [speech(seed=8, length=3 * config.CLIP_SAMPLES)[0]]
    run = lambda seed: features.augmented_mfcc(waves, bank, torch.Generator().manual_seed(seed))
    first = run(0)
    assert first.shape == (6, config.N_FRAMES, config.N_MFCC)
    torch.testing.assert_close(first, run(0))
    assert not torch.allclose(first, run(1))


def test_short_noise_and_empty_bank_raise() -> None:
    """A noise shorter than 1 s or an empty bank is refused with a clear message."""
    clips, gen = torch.zeros(2, config.CLIP_SAMPLES), torch.Generator()
    with pytest.raises(ValueError, match="at least"):
        features.mix_background(clips, [np.zeros(100, np.float32)], gen, prob=1.0)
    with pytest.raises(ValueError, match="empty"):
        features.mix_background(clips, [], gen)


# ----------------------------------------------------------------------------- datasets

def test_compute_features_batches_with_channel_axis() -> None:
    """(N, T) int16 -> (N, 1, 49, 10), identical to mfcc whatever the batch size."""
    waves = speech(seed=9, n=5)
    out = features.compute_features(waves, batch_size=2, desc="test")
    assert out.shape == (5, *config.INPUT_SHAPE) and out.dtype == torch.float32
    torch.testing.assert_close(out[:, 0], features.mfcc(waves))
    with pytest.raises(ValueError, match=r"\(N, T\)"):
        features.compute_features(waves[0])


def test_compute_features_with_augmentation_uses_the_generator() -> None:
    """augment=(bank, generator) equals augmented_mfcc with the same seed."""
    waves, bank = speech(seed=10, n=4), [speech(seed=11, length=2 * config.CLIP_SAMPLES)[0]]
    out = features.compute_features(waves, augment=(bank, torch.Generator().manual_seed(3)))
    expected = features.augmented_mfcc(waves, bank, torch.Generator().manual_seed(3))
    torch.testing.assert_close(out[:, 0], expected)


def test_cached_builds_once_and_writes_atomically(tmp_path: Path) -> None:
    """First call builds and saves, the second loads; a failed build leaves no file behind."""
    calls: list[int] = []
    build = lambda: calls.append(1) or {"x": torch.arange(3)}
    path = tmp_path / "sub" / "feats.pt"
    assert torch.equal(features.cached(path, build)["x"], torch.arange(3))
    assert torch.equal(features.cached(path, build)["x"], torch.arange(3))
    assert calls == [1] and [p.name for p in path.parent.iterdir()] == ["feats.pt"]

    def broken() -> torch.Tensor:
        """A build that returns something torch.save cannot pickle."""
        return {"f": lambda: 0}  # type: ignore[return-value]

    with pytest.raises(Exception):
        features.cached(tmp_path / "bad.pt", broken)
    assert not any(tmp_path.glob("bad.pt*"))


def test_time_masks_replace_spans_of_frames_by_the_clip_mean() -> None:
    feats = torch.randn(64, 1, 49, 10, dtype=torch.float32) * 5 + 3
    masked = features.time_mask(feats, torch.Generator().manual_seed(0), 2)
    again = features.time_mask(feats, torch.Generator().manual_seed(0), 2)
    assert torch.equal(masked, again) and masked.shape == feats.shape
    mean = feats.mean(dim=2, keepdim=True)
    is_mean = ((masked - mean).abs().amax(dim=-1) < 1e-4)[:, 0]     # (clips, frames)
    kept = ((masked - feats).abs().amax(dim=-1) < 1e-4)[:, 0]
    assert (is_mean | kept).all()               # every frame is either untouched or the mean frame
    per_clip = is_mean.sum(dim=1)
    assert per_clip.max() <= 2 * features.TIME_MASK_FRAMES and per_clip.float().mean() > 2
    assert torch.equal(features.time_mask(feats, torch.Generator().manual_seed(0), 0), feats)


@pytest.mark.parametrize("masks", [-1, 1.5, True])
def test_bad_time_mask_count_is_refused_by_name(masks: object) -> None:
    with pytest.raises(ValueError, match="masks"):
        features.time_mask(torch.zeros(2, 1, 49, 10), torch.Generator(), masks)
