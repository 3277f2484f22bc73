"""Streaming detection: incremental features, inference over a long recording, detection, scoring."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import onnx
import pytest
import torch

matplotlib.use("Agg")

from kws_utils import config, deploy, features, model, quant, streaming  # noqa: E402
from test_data import make_test_dir, make_train_dir  # noqa: E402  (the miniature dataset)
from test_notebook_code import marked_cells, run_cells  # noqa: E402  (notebook cells by marker)

RATE = config.SAMPLE_RATE


def _recording(seconds: float, seed: int = 0) -> np.ndarray:
    """Random int16 'speech' whose loudness (and so each window's max) changes over time."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    envelope = 0.2 + np.abs(np.sin(np.arange(n) / 5000))
    return (rng.standard_normal(n) * 3000 * envelope).astype(np.int16)


@pytest.mark.parametrize("hop_ms", [20, 100, 180, 1000])
def test_incremental_features_equal_full_mfcc_of_each_window(hop_ms: int) -> None:
    audio = _recording(2.3)
    hop = hop_ms * RATE // 1000
    windows = list(streaming.stream_features(audio, hop_ms))
    assert len(windows) == (audio.size - RATE) // hop + 1
    for w, got in enumerate(windows):
        want = features.mfcc(audio[w * hop:w * hop + RATE])
        assert got.shape == (config.N_FRAMES, config.N_MFCC)
        assert (got - want).abs().max().item() < 1e-4


def test_window_max_in_its_last_samples_and_negative_windows() -> None:
    # The max sits in samples 15840..15999, which no frame covers but the reference scales by;
    # the second window holds only negative samples (the |x| fallback of peak_scale).
    audio = np.concatenate([_recording(1.0) // 4, -np.abs(_recording(1.0, seed=1)) - 1])
    audio[RATE - 50] = 32000
    windows = list(streaming.stream_features(audio, 1000))
    for w, got in enumerate(windows):
        want = features.mfcc(audio[w * RATE:(w + 1) * RATE])
        assert (got - want).abs().max().item() < 1e-4


def test_recompute_mode_gives_the_same_features() -> None:
    audio = _recording(2.0)
    inc = torch.stack(list(streaming.stream_features(audio, 60)))
    full = torch.stack(list(streaming.stream_features(audio, 60, incremental=False)))
    assert (inc - full).abs().max().item() < 1e-4


@pytest.mark.parametrize("hop_ms", [0, -20, 30, 25, 10.0])
def test_hop_must_be_a_multiple_of_the_frame_step(hop_ms) -> None:
    with pytest.raises(ValueError, match="multiple of the 20 ms frame step"):
        streaming.hop_frames(hop_ms)


@pytest.mark.parametrize("audio", [np.zeros(0), np.zeros(RATE - 1), np.zeros((2, RATE))])
def test_empty_short_or_multichannel_recordings_are_rejected(audio: np.ndarray) -> None:
    with pytest.raises(ValueError, match="at least one full 1 s window|mono recording"):
        streaming.prepare_recording(audio)


def test_other_sample_rate_is_resampled_with_a_message(capsys) -> None:
    audio = _recording(1.5)
    resampled = streaming.prepare_recording(audio[::2], sample_rate=8000)
    assert "resampling to 16000 Hz" in capsys.readouterr().out
    assert abs(resampled.size - audio.size) <= 2


@pytest.mark.parametrize("threshold", [-0.1, 1.01])
def test_threshold_outside_unit_interval_is_rejected(threshold: float) -> None:
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        streaming.check_threshold(threshold)


def test_smoothing_is_a_causal_moving_average() -> None:
    x = np.arange(6, dtype=float)[:, None]
    assert np.allclose(streaming.smooth(x, 3)[:, 0], [0, 0.5, 1, 2, 3, 4])
    assert np.allclose(streaming.smooth(x, 1), x)


def _result(keyword_scores: dict[int, list[float]], hop_ms: int = 100) -> streaming.StreamResult:
    """A StreamResult whose smoothed posteriors are given per class (others zero)."""
    n = len(next(iter(keyword_scores.values())))
    post = np.zeros((n, len(config.LABELS)))
    for k, values in keyword_scores.items():
        post[:, k] = values
    times = 1.0 + np.arange(n) * hop_ms / 1000
    return streaming.StreamResult(times, post, post, hop_ms, hop_ms, float(times[-1]))


def test_detection_threshold_and_refractory_period() -> None:
    yes, no = config.LABELS.index("yes"), config.LABELS.index("no")
    result = _result({yes: [0, .9, .9, .9, 0, 0, 0, 0, 0, 0, 0, 0, .9],
                      no: [0, 0, 0, 0, 0, .3, 0, .8, 0, 0, 0, 0, 0]})
    dets = streaming.detect(result, threshold=0.5, refractory_ms=500)
    assert [(d.label, round(d.time_s, 1)) for d in dets] == [(yes, 1.1), (no, 1.7), (yes, 2.2)]
    assert len(streaming.detect(result, threshold=0.5, refractory_ms=1500)) == 1
    assert streaming.detect(result, threshold=0.95) == []
    silence = _result({config.SILENCE_INDEX: [1.0] * 5})
    assert streaming.detect(silence, threshold=0.1) == []    # only keywords are detected


def test_a_long_plateau_fires_once_and_a_dip_below_threshold_rearms() -> None:
    up = config.LABELS.index("up")
    plateau = _result({up: [0] + [.9] * 25 + [0]})          # 2.5 s above threshold: one word
    assert len(streaming.detect(plateau, 0.5, refractory_ms=1000)) == 1
    # the old rule (refractory only) fires again every second of the same plateau
    assert len(streaming.detect(plateau, 0.5, refractory_ms=1000, rearm=False)) == 3
    dip = _result({up: [0] + [.9] * 5 + [.4] + [.9] * 5 + [0]})   # falls below 0.5 once
    assert [round(d.time_s, 1) for d in streaming.detect(dip, 0.5, refractory_ms=0)] == [1.1, 1.7]
    # the refractory period still applies after a re-arm: the second detection waits for it
    assert [round(d.time_s, 1) for d in streaming.detect(dip, 0.5, refractory_ms=1000)] == [1.1, 2.1]
    # a score equal to the threshold counts as reached, so it does not re-arm
    touch = _result({up: [0, .9, .5, .9, 0]})
    assert len(streaming.detect(touch, 0.5, refractory_ms=0)) == 1


def test_scoring_counts_hits_misses_and_false_alarms() -> None:
    yes, no, up = (config.LABELS.index(w) for w in ("yes", "no", "up"))
    events = [streaming.Event(yes, 2.0, 3.0), streaming.Event(no, 5.0, 6.0),
              streaming.Event(up, 8.0, 9.0), streaming.Event(config.UNKNOWN_INDEX, 11.0, 12.0)]
    dets = [streaming.Detection(2.8, yes, .9),      # hit
            streaming.Detection(3.5, yes, .9),      # repeat of the same event: false alarm
            streaming.Detection(5.5, up, .9),       # wrong word: false alarm, "no" missed
            streaming.Detection(9.9, up, .9),       # within the tolerance after the clip: hit
            streaming.Detection(11.5, go := config.LABELS.index("go"), .9)]  # on a distractor
    s = streaming.score(dets, events, duration_s=1800.0)
    assert (s.hits, s.misses, s.false_alarms) == (2, 1, 3)
    assert s.fa_per_hour == pytest.approx(6.0) and s.miss_rate == pytest.approx(1 / 3)
    assert go not in (yes, no, up)


def test_false_alarm_causes_sort_every_false_alarm_once() -> None:
    yes, no, up = (config.LABELS.index(w) for w in ("yes", "no", "up"))
    events = [streaming.Event(yes, 2.0, 3.0), streaming.Event(no, 5.0, 6.0),
              streaming.Event(config.UNKNOWN_INDEX, 8.0, 9.0)]
    dets = [streaming.Detection(2.8, yes, .9),      # hit
            streaming.Detection(3.6, yes, .9),      # the same word again
            streaming.Detection(5.5, up, .9),       # wrong keyword while "no" is in view
            streaming.Detection(8.5, up, .9),       # on the unknown word
            streaming.Detection(12.0, no, .9)]      # nothing in view
    causes = streaming.false_alarm_causes(dets, events)
    assert list(causes.values()) == [1, 1, 1, 1]
    assert sum(causes.values()) == streaming.score(dets, events, 20.0).false_alarms
    assert streaming.fa_resolution(1800.0) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="duration_s"):
        streaming.fa_resolution(0.0)


def test_sweep_false_alarms_fall_as_threshold_rises_without_rearm() -> None:
    # (with re-arming a higher threshold can split one plateau into several crossings)
    rng = np.random.default_rng(0)
    result = _result({k: list(rng.uniform(0, 1, 300)) for k in range(10)})
    scores = streaming.sweep(result, [], np.linspace(0, 1, 11), refractory_ms=0, rearm=False)
    fas = [s.false_alarms for s in scores]
    assert fas == sorted(fas, reverse=True) and fas[0] == 300 and fas[-1] <= 3


# ----------------------------------------------------------------------------- with a model
@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory) -> dict[str, Path]:
    """PTQ int8 models (float and int8 output) of a random DS-CNN, calibrated on real MFCC."""
    torch.manual_seed(0)
    net = model.DSCNN().eval()
    calib = torch.stack(list(streaming.stream_features(_recording(3.0, seed=3), 100)))[:, None]
    tmp = tmp_path_factory.mktemp("stream_models")
    # the course's wrapper takes the output form; convert() again only picks it
    return {out: quant.ptq(net, 8, calib, backend=quant).convert(output=out).export(
        calib[:1], tmp / f"int8_{out}.onnx") for out in ("float", "int8")}


def test_run_stream_gives_posteriors_per_hop(onnx_files: dict[str, Path]) -> None:
    audio = _recording(3.0)
    result = streaming.run_stream(onnx_files["float"], audio, hop_ms=200, smooth_ms=400,
                                  progress=False)
    assert result.posteriors.shape == (11, len(config.LABELS))
    assert np.allclose(result.posteriors.sum(1), 1) and np.allclose(result.smoothed.sum(1), 1)
    assert result.times[0] == 1.0 and result.times[-1] == pytest.approx(3.0)
    assert result.duration_s == pytest.approx(3.0)


def test_int8_output_is_scaled_by_the_recorded_scale(onnx_files: dict[str, Path], tmp_path: Path) -> None:
    audio = _recording(1.6)
    as_float = streaming.run_stream(onnx_files["float"], audio, progress=False)
    as_int8 = streaming.run_stream(onnx_files["int8"], audio, progress=False)
    assert np.array_equal(as_float.posteriors, as_int8.posteriors)
    # integer-typed codes without a recorded scale cannot become posteriors
    proto = onnx.load(str(onnx_files["int8"]))
    del proto.metadata_props[:]
    out = proto.graph.output[0]
    proto.graph.node[-1].output[0] = "codes"
    proto.graph.node.append(onnx.helper.make_node("Cast", ["codes"], [out.name], to=onnx.TensorProto.INT8))
    out.type.tensor_type.elem_type = onnx.TensorProto.INT8
    onnx.save(proto, str(tmp_path / "no_scale.onnx"))
    with pytest.raises(ValueError, match="no output scale"):
        streaming.run_stream(tmp_path / "no_scale.onnx", audio, progress=False)


def test_timeline_plot_checks_inputs_before_drawing(onnx_files: dict[str, Path]) -> None:
    audio = _recording(2.0)
    result = streaming.run_stream(onnx_files["float"], audio, progress=False)
    dets = streaming.detect(result, 0.0)
    events = [streaming.Event(config.LABELS.index("yes"), 0.2, 1.2)]
    fig = streaming.plot_timeline(audio, result, dets, events, "synthetic", 0.0)
    assert len(fig.axes) == 3 and all(ax.get_title() for ax in fig.axes)
    empty = streaming.StreamResult(np.zeros(0), np.zeros((0, 12)), np.zeros((0, 12)), 100, 100, 0.0)
    with pytest.raises(ValueError, match="no decisions"):
        streaming.plot_timeline(audio, empty, [], [], "synthetic", 0.5)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        streaming.plot_timeline(np.zeros(0), result, dets, events, "synthetic", 0.5)
    with pytest.raises(ValueError, match="no scores"):
        streaming.plot_det([], "synthetic")


# ----------------------------------------------------------------------------- test recording
def _mini_info(tmp_path: Path):
    """The miniature dataset of test_data (constant-valued clips)."""
    from kws_utils import data
    return data.DatasetInfo("synthetic", make_train_dir(tmp_path / "train"),
                            make_test_dir(tmp_path / "test", per_class=3), "miniature")


def test_long_recording_places_clips_at_their_events(tmp_path: Path) -> None:
    info = _mini_info(tmp_path)
    audio, events = streaming.build_long_recording(info, 6, 2, snr_db=300, seed=1)
    assert audio.dtype == np.float32 and len(events) == 8
    assert sum(ev.label in streaming.KEYWORD_IDS for ev in events) == 6
    starts = [ev.start_s for ev in events]
    assert starts == sorted(starts)
    assert all(b.start_s - a.end_s >= 0.5 - 1e-9 for a, b in zip(events, events[1:]))
    inside = np.zeros(audio.size, bool)
    for ev in events:
        span = audio[round(ev.start_s * RATE):round(ev.end_s * RATE)]
        inside[round(ev.start_s * RATE):round(ev.end_s * RATE)] = True
        assert np.ptp(span) < 1e-6 and span[0] * 32768 == pytest.approx(round(span[0] * 32768), abs=1e-3)
    assert np.abs(audio[~inside]).max() < 1e-6   # noise 300 dB down
    again, _ = streaming.build_long_recording(info, 6, 2, snr_db=300, seed=1)
    assert np.array_equal(audio, again)


def test_long_recording_refuses_more_clips_than_the_test_set(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="clips given hold"):
        streaming.build_long_recording(_mini_info(tmp_path), 1000)


# ----------------------------------------------------------------------------- notebook 06's code
NB06 = "06_streaming_and_deployment.ipynb"


def _taught(marker: str) -> dict:
    """Namespace after running notebook 06's one cell marked ``# kws-code: marker``."""
    (source,) = marked_cells(NB06, marker)
    return run_cells([source], {"np": np, "config": config, "streaming": streaming})


def _random_result(seed: int, n: int = 300) -> streaming.StreamResult:
    """Smoothed posteriors with plateaus, dips and label changes, as a stream produces them."""
    rng = np.random.default_rng(seed)
    logits = np.repeat(rng.normal(0, 3, (n // 10, len(config.LABELS))), 10, axis=0)
    post = streaming.softmax(logits + rng.normal(0, 1, logits.shape))
    times = 1.0 + 0.1 * np.arange(len(post))
    return streaming.StreamResult(times, post, streaming.smooth(post, 3), 100, 300, float(times[-1]))


def test_notebook06_detector_is_streaming_detect() -> None:
    detect_by_hand = _taught("detect")["detect_by_hand"]
    for seed in range(4):
        result = _random_result(seed)
        for threshold, refractory_ms in ((0.3, 0), (0.5, 500), (0.7, 1000)):
            expected = streaming.detect(result, threshold, refractory_ms)
            assert expected, "the case should produce detections"
            assert detect_by_hand(result, threshold, refractory_ms) == expected


def test_notebook06_scorer_is_streaming_score() -> None:
    score_by_hand = _taught("score")["score_by_hand"]
    rng = np.random.default_rng(7)
    for _ in range(20):
        starts = np.sort(rng.uniform(0, 60, 12))
        events = [streaming.Event(int(rng.integers(0, 12)), float(t), float(t) + 1.0) for t in starts]
        dets = [streaming.Detection(float(t), int(rng.integers(0, 10)), 0.9)
                for t in np.sort(rng.uniform(0, 62, 15))]
        s = streaming.score(dets, events, 62.0)
        assert score_by_hand(dets, events, 62.0) == (s.hits, s.misses, s.false_alarms, pytest.approx(s.fa_per_hour))


def test_notebook06_integer_forward_is_numpy_reference(onnx_files: dict[str, Path], tmp_path: Path) -> None:
    integer_forward = _taught("integer_forward")["integer_forward"]
    x = torch.stack(list(streaming.stream_features(_recording(2.0, seed=9), 100)))[:, None].numpy()
    # and a file of the default backend (TI's package when installed: float32 products)
    net = model.DSCNN().eval()
    auto = quant.export_integer(quant.ptq(net, 8, torch.from_numpy(x)), tmp_path / "auto.onnx")
    for path in [*onnx_files.values(), auto]:
        int_model = deploy.load_integer_onnx(path)
        expected = deploy.numpy_reference(int_model, x, return_codes=True)
        assert np.array_equal(integer_forward(int_model, x), expected)
        # the product as TI's files write it (float32) is followed too
        for layer in int_model.layers:
            layer.float32_product = True
        assert np.array_equal(integer_forward(int_model, x),
                              deploy.numpy_reference(int_model, x, return_codes=True))


def test_place_clips_and_noise_folder_refuse_empty_inputs(tmp_path: Path) -> None:
    info = _mini_info(tmp_path)
    from kws_utils import data
    clips = data.splits(info)["test"]
    with pytest.raises(ValueError, match="noise holds no recordings"):
        streaming.place_clips(clips, [], 2)
    with pytest.raises(ValueError, match="no wav files"):
        streaming.noise_recordings(tmp_path / "empty")
    noise = streaming.noise_recordings(Path(info.train_dir) / config.BACKGROUND_NOISE_DIR)
    audio, events = streaming.place_clips(clips, noise, 0, 2, seed=3)   # keyword-free
    assert len(events) == 2 and all(ev.label == config.UNKNOWN_INDEX for ev in events)
    assert audio.size >= 2 * RATE
