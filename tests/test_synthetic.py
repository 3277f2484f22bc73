"""The offline synthetic dataset: layout, determinism, speaker splits, balanced test set."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import FAST_RECIPE
from kws_utils import config, synthetic

SPEAKERS = 6          # tiny: 4 train, 1 validation, 1 testing speaker
PER_CLASS = 5


def _digest(folder: Path) -> str:
    """A hash over every file's relative path and bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny synthetic dataset and test set, rendered in-process."""
    root = tmp_path_factory.mktemp("synth")
    return synthetic.ensure_synthetic(root / "train", root / "test", SPEAKERS, PER_CLASS, seed=3,
                                      workers=1, recipe=FAST_RECIPE)


def test_layout_matches_speech_commands(generated: tuple[Path, Path]) -> None:
    train, _ = generated
    assert {p.name for p in train.iterdir() if p.is_dir()} == {*config.ALL_WORDS,
                                                              config.BACKGROUND_NOISE_DIR}
    assert (train / "validation_list.txt").is_file() and (train / "testing_list.txt").is_file()
    for path in list((train / "yes").glob("*.wav")) + list((train / "marvin").glob("*.wav")):
        assert re.fullmatch(r"[0-9a-f]{8}_nohash_\d+\.wav", path.name)
        info = sf.info(str(path))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert 8000 <= info.frames <= config.CLIP_SAMPLES


def test_background_noise_recordings(generated: tuple[Path, Path]) -> None:
    noise = sorted((generated[0] / config.BACKGROUND_NOISE_DIR).glob("*.wav"))
    assert {p.stem for p in noise} == set(synthetic.noise_names())
    assert config.VALIDATION_NOISE_FILE in {p.name for p in noise}
    for path in noise:
        wave, rate = sf.read(str(path), dtype="int16")
        assert rate == 16000 and wave.size >= 30 * rate
        assert 0 < np.abs(wave).max() < 32767          # audible, not clipped


def test_keywords_have_more_takes_than_other_words(generated: tuple[Path, Path]) -> None:
    train, _ = generated
    assert len(list((train / "yes").glob("*.wav"))) == SPEAKERS * config.SYNTH_KEYWORD_REPEATS
    assert len(list((train / "bed").glob("*.wav"))) == SPEAKERS * config.SYNTH_AUX_REPEATS
    assert config.SYNTH_KEYWORD_REPEATS > config.SYNTH_AUX_REPEATS


def test_lists_split_by_speaker_hash(generated: tuple[Path, Path]) -> None:
    train, _ = generated
    speakers_of: dict[str, set[str]] = {}
    for split in ("validation", "testing"):
        for rel in (train / f"{split}_list.txt").read_text().split():
            assert (train / rel).is_file()
            assert synthetic.which_set(rel) == split          # the real dataset's rule
            speakers_of.setdefault(split, set()).add(rel.split("/")[1].split("_nohash_")[0])
    assert speakers_of["validation"].isdisjoint(speakers_of["testing"])
    listed = set().union(*speakers_of.values())
    train_speakers = {p.name.split("_nohash_")[0] for p in (train / "yes").glob("*.wav")} - listed
    assert all(synthetic.which_set(f"{s}_nohash_0.wav") == "training" for s in train_speakers)
    assert (len(train_speakers), len(speakers_of["validation"]), len(speakers_of["testing"])) \
        == (4, 1, 1)


def test_which_set_is_about_80_10_10() -> None:
    rng = np.random.default_rng(0)
    names = [f"{int(v):08x}_nohash_0.wav" for v in rng.integers(0, 2**32, 20_000)]
    splits = [synthetic.which_set(n) for n in names]
    assert 0.08 < splits.count("validation") / len(splits) < 0.12
    assert 0.08 < splits.count("testing") / len(splits) < 0.12
    assert synthetic.which_set("abc_nohash_0.wav") == synthetic.which_set("x/abc_nohash_7.wav")


def test_test_set_balanced_and_from_test_speakers(generated: tuple[Path, Path]) -> None:
    train, test = generated
    testers = {rel.split("/")[1].split("_nohash_")[0]
               for rel in (train / "testing_list.txt").read_text().split()}
    folders = {*config.KEYWORDS, config.TEST_SILENCE_DIR, config.TEST_UNKNOWN_DIR}
    assert {p.name for p in test.iterdir() if p.is_dir()} == folders
    for name in folders:
        assert len(list((test / name).glob("*.wav"))) == PER_CLASS
    for path in (test / config.TEST_UNKNOWN_DIR).glob("*.wav"):
        word, speaker = path.stem.split("_nohash_")[0].split("_")
        assert word in synthetic.AUX_WORDS and speaker in testers
    for path in (test / "yes").glob("*.wav"):
        assert path.name.split("_nohash_")[0] in testers
    for path in (test / config.TEST_SILENCE_DIR).glob("*.wav"):
        assert sf.info(str(path)).frames == config.CLIP_SAMPLES


def test_same_seed_same_bytes_any_worker_count(generated: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    # Two worker processes instead of one: espeak state must not leak between clips.
    again = synthetic.generate_dataset(tmp_path / "again", SPEAKERS, seed=3, workers=2, recipe=FAST_RECIPE)
    assert _digest(again) == _digest(generated[0])
    test_again = synthetic.generate_test_set(tmp_path / "t", SPEAKERS, PER_CLASS, seed=3, recipe=FAST_RECIPE)
    assert _digest(test_again) == _digest(generated[1])


def test_other_seed_other_data(tmp_path: Path) -> None:
    a = synthetic.generate_test_set(tmp_path / "a", 3, 2, seed=1, workers=1)
    b = synthetic.generate_test_set(tmp_path / "b", 3, 2, seed=2, workers=1)
    assert _digest(a) != _digest(b)


def test_marker_records_parameters(generated: tuple[Path, Path]) -> None:
    train, test = generated
    assert synthetic.is_complete(train, synthetic.train_params(SPEAKERS, 3, FAST_RECIPE))
    assert not synthetic.is_complete(train, synthetic.train_params(SPEAKERS, 4, FAST_RECIPE))
    assert not synthetic.is_complete(train, synthetic.train_params(SPEAKERS, 3))   # with neural voices
    assert synthetic.is_complete(test, synthetic.test_params(SPEAKERS, PER_CLASS, 3, FAST_RECIPE))
    assert synthetic.read_marker(train)["files"] == len(list(train.rglob("*.wav")))


def test_interrupted_generation_leaves_nothing_complete(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args: object) -> None:
        """Stand-in for a step late in generation: the user presses Ctrl-C."""
        raise KeyboardInterrupt
    monkeypatch.setattr(synthetic, "_write_lists", crash)
    target = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate_dataset(target, 3, seed=0, workers=1, recipe=FAST_RECIPE)
    assert not target.exists()
    assert not synthetic.is_complete(target, synthetic.train_params(3, 0, FAST_RECIPE))


def test_every_voice_speaks() -> None:
    with synthetic.Espeak() as espeak:
        voices = [*synthetic.LANGUAGES, *(f"en+{v}" for v in synthetic.VARIANTS if v)]
        for voice in voices:
            wave = espeak.speak("go", voice, 175, 50, 50)
            assert wave.dtype == np.int16 and wave.size > 0.1 * espeak.sample_rate, voice
        with pytest.raises(ValueError):
            espeak.speak("go", "no-such-voice", 175, 50, 50)


def test_too_few_speakers_rejected() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        synthetic.split_quotas(2)


def test_real_noise_replaces_generated_noise_when_available(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    real = tmp_path / "real" / config.BACKGROUND_NOISE_DIR
    real.mkdir(parents=True)
    names = ["doing_the_dishes", "dude_miaowing", "exercise_bike", "pink_noise", "running_tap", "white_noise"]
    rng = np.random.default_rng(0)
    for name in names:
        sf.write(real / f"{name}.wav", (rng.standard_normal(3 * 16000) * 3000).astype(np.int16), 16000,
                 subtype="PCM_16")
    monkeypatch.setenv("KWS_REAL_AUDIO_DIR", str(real.parent))
    monkeypatch.setenv("KWS_DATA_DIR", str(tmp_path / "no_real_dataset"))
    assert synthetic.noise_names() == tuple(names)
    assert synthetic.train_params(5, 0)["noise"].startswith("real")
    synthetic.write_background_noise(tmp_path / "out", seed=0)
    for name in names:
        copied, _ = sf.read(str(tmp_path / "out" / f"{name}.wav"), dtype="int16")
        original, _ = sf.read(str(real / f"{name}.wav"), dtype="int16")
        assert np.abs(copied.astype(int) - original).max() <= 1      # the recording, not new noise
    job = synthetic.Job("_silence_/pink_noise_0000.wav", "pink_noise", -1, (0, 4, 10, 0))
    clip = synthetic.render_job(None, job, [])
    assert clip.shape == (config.CLIP_SAMPLES,) and clip.dtype == np.int16 and np.abs(clip).max() > 0
    monkeypatch.setenv("KWS_REAL_AUDIO_DIR", str(tmp_path / "absent"))
    assert synthetic.noise_names() == synthetic.NOISE_KINDS and "noise" not in synthetic.train_params(5, 0)


def test_change_speed_shortens_and_raises_pitch() -> None:
    t = np.arange(16000) / 16000
    tone = np.sin(2 * np.pi * 500 * t)
    faster = synthetic.change_speed(tone, 1.1)
    assert abs(faster.size - tone.size / 1.1) <= 2
    peak_hz = np.argmax(np.abs(np.fft.rfft(faster))) * 16000 / faster.size
    assert abs(peak_hz - 550) < 5
    assert synthetic.change_speed(tone, 1.0) is tone          # no perturbation: untouched


def test_recipe_sets_takes_and_speed(tmp_path: Path) -> None:
    recipe = synthetic.Recipe(aux_repeats=3, speed_min=1.0, speed_max=1.0, tts_share=0.0)
    train = synthetic.generate_dataset(tmp_path / "r", 3, seed=3, workers=1, recipe=recipe)
    assert len(list((train / "bed").glob("*.wav"))) == 3 * 3
    assert synthetic.is_complete(train, synthetic.train_params(3, 3, recipe))
    assert not synthetic.is_complete(train, synthetic.train_params(3, 3))    # the course's recipe
    speeds = [job.speed for shard in synthetic.train_jobs(synthetic.make_speakers(3, 3), 3, FAST_RECIPE)
              for job in shard]
    lo, hi = config.SYNTH_SPEED_RANGE
    assert all(lo <= s <= hi for s in speeds) and len(set(speeds)) > 1
    assert {job.speed for shard in synthetic.train_jobs(synthetic.make_speakers(3, 3), 3, recipe)
            for job in shard} == {1.0}


def test_aux_words_gives_each_speaker_a_seeded_subset_of_the_other_words() -> None:
    recipe = synthetic.Recipe(aux_words=6, tts_share=0.0)
    speakers = synthetic.make_speakers(20, 0)
    jobs = [job for shard in synthetic.train_jobs(speakers, 0, recipe) for job in shard]
    said = {}
    for sp in speakers:
        mine = [job.word for job in jobs if job.speaker == sp.index]
        others = [w for w in mine if w not in config.KEYWORDS]
        assert len(others) == 6 == len(set(others)) and set(others) == set(recipe.draw_aux_words(0, sp.index))
        assert len(mine) - len(others) == len(config.KEYWORDS) * config.SYNTH_KEYWORD_REPEATS
        said[sp.index] = frozenset(others)
    assert len(set(said.values())) > 10                     # speakers differ
    assert set().union(*said.values()) == set(synthetic.AUX_WORDS)   # every word is still said
    assert synthetic.Recipe(tts_share=0.0).draw_aux_words(0, 3) == synthetic.AUX_WORDS
    assert synthetic.train_params(5, 0, recipe)["aux_words"] == 6
    assert "aux_words" not in synthetic.train_params(5, 0, synthetic.Recipe(aux_words=25))


@pytest.mark.parametrize("aux_words", [0, 26, 2.5])
def test_bad_aux_words_is_refused_by_name(aux_words: object, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="recipe.aux_words"):
        synthetic.generate_dataset(tmp_path / "bad", 3, workers=1,
                                   recipe=synthetic.Recipe(aux_words=aux_words, tts_share=0.0))
    assert not (tmp_path / "bad").exists()


def test_room_response_decays_in_rt60_with_its_direct_to_reverberant_ratio() -> None:
    rir = synthetic.room_response(0.5, 6.0, np.random.default_rng(0))
    assert rir[0] == 1.0 and rir.size == 8000
    assert 10 * np.log10(1.0 / np.sum(rir[1:] ** 2)) == pytest.approx(6.0)
    # Energy in the last and first 50 ms of the tail: about 60 dB apart over 0.45 s (60 * 0.9 = 54).
    first, last = np.sum(rir[1:801] ** 2), np.sum(rir[-800:] ** 2)
    assert 10 * np.log10(first / last) == pytest.approx(54, abs=4)


def test_reverberation_keeps_the_word_and_adds_a_tail() -> None:
    t = np.arange(4000) / 16000
    burst = np.sin(2 * np.pi * 300 * t)
    wet = synthetic.reverberate(burst, 0.4, 3.0, np.random.default_rng(1))
    assert wet.size == burst.size + int(0.4 * 16000) - 1
    assert np.abs(wet[burst.size + 100:]).max() > 0.01      # sound goes on after the word ends
    assert np.corrcoef(wet[:burst.size], burst)[0, 1] > 0.5  # the direct sound is still there


@pytest.mark.parametrize("args, name", [((0.0, 3.0), "rt60"), ((float("nan"), 3.0), "rt60"),
                                        ((0.4, float("inf")), "drr_db"), ((0.4, "3"), "drr_db")])
def test_bad_room_is_refused_by_name(args: tuple, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        synthetic.reverberate(np.ones(100), *args, np.random.default_rng(0))
    with pytest.raises(ValueError, match="wave"):
        synthetic.reverberate(np.ones((2, 100)), 0.4, 3.0, np.random.default_rng(0))


def test_reverb_share_gives_that_share_of_speakers_a_room() -> None:
    rooms = [synthetic.Recipe(reverb_share=0.5).draw_room(0, i) for i in range(400)]
    wet = [r for r in rooms if r[0] > 0]
    assert 0.4 < len(wet) / len(rooms) < 0.6
    assert all(0.15 <= rt60 <= 0.9 and -2 <= drr <= 12 for rt60, drr in wet)
    assert synthetic.Recipe(reverb_share=0.0).draw_room(0, 3) == (0.0, 0.0)
    assert synthetic.Recipe(reverb_share=0.5).draw_room(0, 3) == synthetic.Recipe(reverb_share=0.5).draw_room(0, 3)


@pytest.mark.parametrize("recipe", [synthetic.Recipe(0, 1.0, 1.0), synthetic.Recipe(1, 1.2, 0.9),
                                    synthetic.Recipe(1, 0.1, 1.0), synthetic.Recipe(1, 1.0, 1.0, 1.5),
                                    synthetic.Recipe(1, 1.0, 1.0, "half"), "fast"])
def test_bad_recipe_is_refused_by_name(recipe: object, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="recipe"):
        synthetic.generate_dataset(tmp_path / "bad", 3, workers=1, recipe=recipe)
    assert not (tmp_path / "bad").exists()
