"""The real-speech sources (kws_utils.real_audio) and the test-set guard (kws_utils.holdout)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from kws_utils import config, data, holdout, mlperf, model, quant, real_audio
from kws_utils.errors import InputError

needs_real = pytest.mark.skipif(not real_audio.available(), reason="official test set absent")
needs_pool = pytest.mark.skipif(not real_audio.pool_clips(), reason="real calibration pool absent")


def _fake_test_set(root: Path) -> Path:
    """A miniature official-layout test set: one short clip per class folder."""
    for name in data.TEST_FOLDERS:
        (root / name).mkdir(parents=True)
        stem = "bed_0123abcd_nohash_0.wav" if name == config.TEST_UNKNOWN_DIR else "0123abcd_nohash_0.wav"
        sf.write(root / name / stem, np.zeros(config.CLIP_SAMPLES, np.int16), config.SAMPLE_RATE,
                 subtype="PCM_16")
    return root


def test_kws_test_dir_is_found_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _fake_test_set(tmp_path / "mine")
    monkeypatch.setenv("KWS_TEST_DIR", str(folder))
    assert real_audio.test_dir(download=False) == folder
    assert real_audio.available()


def test_absent_test_set_is_skipped_with_a_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("KWS_TEST_DIR", raising=False)
    monkeypatch.setenv("KWS_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("KWS_REAL_AUDIO_DIR", str(tmp_path / "nothing"))
    assert not real_audio.available()
    assert real_audio.test_dir(download=False) is None
    assert "SKIPPED" in capsys.readouterr().out
    assert real_audio.calibration_subsets(2, 10) == []


def test_speaker_ids_of_official_names() -> None:
    assert real_audio.speaker("yes/0a7c2a8d_nohash_1.wav") == "0a7c2a8d"
    assert real_audio.speaker("_unknown_/backward_0c540988_nohash_0.wav.wav") == "0c540988"
    assert real_audio.speaker("_silence_/12.wav") is None


@needs_real
def test_official_test_set_is_complete_and_registered() -> None:
    x, y = real_audio.test_set(download=False)
    assert tuple(x.shape) == (4890, *config.INPUT_SHAPE)
    assert torch.bincount(y, minlength=12).tolist() == [406, 402, 412, 405, 402, 396, 396, 411, 425,
                                                         419, 408, 408]
    with pytest.raises(InputError, match="test inputs"):
        holdout.refuse_test_inputs(x[100:105], "calibration")


@needs_real
@needs_pool
def test_pool_shares_no_clip_or_speaker_with_the_test_set() -> None:
    clips = real_audio.pool_clips()
    real_audio.check_not_test(clips)        # raises on any shared clip or speaker
    test_speakers = {real_audio.speaker(c.path) for c in data.test_clips(real_audio.test_dir(False))}
    assert not {real_audio.speaker(c.path) for c in clips} & test_speakers
    with pytest.raises(InputError, match="test clips or test speakers"):
        real_audio.check_not_test(clips[:3] + data.test_clips(real_audio.test_dir(False))[:1])


@needs_pool
def test_calibration_subsets_are_seeded_and_distinct() -> None:
    a = real_audio.calibration_subsets(3, 50, seed=1)
    b = real_audio.calibration_subsets(3, 50, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], a[1])
    pool_x = real_audio.pool_set()[0]     # calibration_picks names the clips of each subset
    for rows, pick in zip(a, real_audio.calibration_picks(3, 50, len(pool_x), seed=1)):
        assert torch.equal(rows[:50], pool_x[torch.from_numpy(pick)])
    with pytest.raises(InputError, match="size=0"):
        real_audio.calibration_subsets(1, 0)


@needs_pool
def test_calibration_copies_add_augmented_views_of_the_same_clips() -> None:
    (clean,) = real_audio.calibration_subsets(1, 20, seed=2, silence=False)
    (aug,) = real_audio.calibration_subsets(1, 20, seed=2, copies=2, silence=False)
    (again,) = real_audio.calibration_subsets(1, 20, seed=2, copies=2, silence=False)
    assert tuple(aug.shape) == (60, *config.INPUT_SHAPE)
    assert torch.equal(aug[:20], clean) and torch.equal(aug, again)     # clean first, seeded copies
    assert not torch.equal(aug[20:40], clean) and not torch.equal(aug[20:40], aug[40:])
    for bad in (-1, 1.5, True):
        with pytest.raises(InputError, match="copies="):
            real_audio.calibration_subsets(1, 20, copies=bad)


@needs_pool
@pytest.mark.skipif(not mlperf.available(), reason="MLPerf reference weights absent")
def test_calibration_subsets_end_with_a_twelfth_of_silence_cuts() -> None:
    (speech,) = real_audio.calibration_subsets(1, 100, seed=3, copies=1, silence=False)
    (mixed,) = real_audio.calibration_subsets(1, 100, seed=3, copies=1)
    n_silence = len(mixed) - len(speech)
    assert n_silence == round(200 / 11) and torch.equal(mixed[:200], speech)
    assert real_audio.describe_calibration(100, 1).endswith(f"+ {n_silence} silence cuts of the training noise recordings")
    # the reference model (trained on real silence) calls the added rows silence, the speech rows rarely
    with torch.no_grad():
        pred = model.reference_model()(mixed).argmax(1)
    assert (pred[200:] == config.SILENCE_INDEX).float().mean() > 0.9
    assert (pred[:200] == config.SILENCE_INDEX).float().mean() < 0.1
    assert not torch.equal(real_audio.calibration_silence(5, 1), real_audio.calibration_silence(5, 2))
    with pytest.raises(InputError, match="silence="):
        real_audio.calibration_subsets(1, 20, silence="yes")
    for n, cuts in ((-1, None), (2.5, None), (3, [])):
        with pytest.raises(InputError, match="n=|cuts"):
            real_audio.calibration_silence(n, 0, cuts=cuts)


def test_calibrating_on_registered_test_inputs_is_refused() -> None:
    x = torch.randn(20, *config.INPUT_SHAPE)
    holdout.register_test_inputs(x[:10], "a unit-test test set")
    holdout.refuse_test_inputs(x[10:], "calibration")        # other inputs pass
    wrapper = quant.TINPUTinyMLPTQFxModule(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(490, 12)),
                                           total_epochs=1, qconfig_type=quant.qconfig_for(8),
                                           example_inputs=x[:1])
    with pytest.raises(InputError, match="a unit-test test set"):
        quant.calibrate(wrapper, x[5:15])
    with pytest.raises(InputError, match="scoring only"):
        quant.learn_rounding(wrapper, x[:4], iters=1, batch_size=2, progress=False)
