"""A sweep of bad inputs across the public API of kws_utils, sorted into outcome categories.

Each case calls one public function with one bad input (or a legal edge case) and expects either
a clear error or a correct result. Outcomes:

- handled:   an error raised on purpose by kws_utils (a ``raise`` statement in the package) whose
             message names the argument or file, or a correct result;
- raw:       an error raised inside torch, numpy, scipy, onnx, the standard library..., or by
             Python itself in kws_utils code (IndexError, KeyError from a lookup...);
- silent:    no error although the input is bad, or a wrong result;
- unclear:   an error raised on purpose by kws_utils whose message does not name the argument;
- partial:   a temporary or partial file left behind, or an existing file lost or changed.

``tests/test_bad_inputs.py`` runs every case under pytest; run this file directly to print the
counts per category (and the cases outside "handled"):

    PYTHONPATH=. KWS_PROFILE=ci OMP_NUM_THREADS=1 python tests/bad_input_sweep.py

The first cases call only the API that existed before the error-handling work, so the table
also measures older versions of the package. Cases tagged ``after_merge`` cover findings fixed on
other branches (quant wrappers, the integer ONNX reader). Round two (ids ``r2/...``, issue 19)
adds silent wrong results, stale caches, raw tracebacks, unclear errors and runs that collide or
die; a few of its cases use arguments added by that round (``features.cached(shape=...)``).
Set ``KWS_SWEEP_ONLY=r2/`` to run only the cases whose id starts with that prefix.
"""
from __future__ import annotations

import contextlib
import dis
import io
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import soundfile as sf
import torch

import kws_utils
from kws_utils import config, data, export, features, model, plots, streaming, synthetic, training

PACKAGE_DIR = Path(kws_utils.__file__).resolve().parent
LEFTOVER_MARKS = (".kws-tmp-", ".partial", ".tmp", ".old")
CATEGORIES = ("handled", "raw", "silent", "unclear", "partial")


# ============================================================================== the machinery
@dataclass
class Case:
    """One bad input: what to call, and the words a clear error must contain (or a result check)."""

    id: str
    call: Callable[["Ctx"], Any]
    names: tuple[str, ...] = ()                            # error must mention one of these
    # ("*",): the case makes a write fail on purpose; any error is right if the files are intact
    check: Callable[[Any, "Ctx"], bool] | None = None     # or: the result must pass this
    files_ok: Callable[["Ctx"], bool] | None = None       # and: files must still be intact
    after_merge: str = ""                                  # fixed on another branch (which)
    setup: Callable[["Ctx"], None] | None = None           # files that exist before the call


@dataclass
class Ctx:
    """A fresh scratch folder per case plus shared, lazily built artefacts."""

    root: Path
    shared: dict = field(default_factory=dict)
    tmp: Path | None = None

    def fresh(self, name: str) -> Path:
        """A new empty folder for one case."""
        self.tmp = self.root / name.replace("/", "_")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def get(self, key: str, build: Callable[[], Any]) -> Any:
        """A shared artefact, built once."""
        if key not in self.shared:
            self.shared[key] = build()
        return self.shared[key]


def _raised_on_purpose(err: BaseException) -> bool:
    """True if the innermost frame is a ``raise`` statement inside kws_utils."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    filename = Path(tb.tb_frame.f_code.co_filename).resolve()
    if PACKAGE_DIR not in filename.parents:
        return False
    # The instruction that raised: RAISE_VARARGS for a raise statement, a call or subscript for
    # an error Python or a library raised on the package's behalf.
    return dis.opname[tb.tb_frame.f_code.co_code[tb.tb_lasti]] == "RAISE_VARARGS"


def _leftovers(folder: Path | None) -> list[str]:
    """Temporary or partial files/folders inside ``folder``."""
    if folder is None or not folder.exists():
        return []
    return [p.name for p in folder.rglob("*") if any(m in p.name for m in LEFTOVER_MARKS)]


def run_case(case: Case, ctx: Ctx) -> tuple[str, str]:
    """Run one case; return (category, detail)."""
    folder = ctx.fresh(case.id)
    if case.setup is not None:
        case.setup(ctx)
    before = set(_leftovers(folder))
    result, error = None, None
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            result = case.call(ctx)
        except Exception as err:  # noqa: BLE001 - classifying every error is the point
            error = err
    new = sorted(set(_leftovers(folder)) - before)
    if new or (case.files_ok is not None and not case.files_ok(ctx)):
        return "partial", f"left {new}" if new else "existing files changed or lost"
    if error is None:
        if case.check is not None and case.check(result, ctx):
            return "handled", "correct result"
        return "silent", f"returned {type(result).__name__} without error"
    text = f"{type(error).__name__}: {error}"
    # The environment cases judge the child interpreter's traceback themselves.
    for marker, verdict in ((EnvHandled, "handled"), (EnvRaw, "raw"), (EnvUnclear, "unclear")):
        if type(error) is marker:
            return verdict, text
    if case.names == ("*",):
        return "handled", text
    if case.check is not None:
        return ("raw", text) if not _raised_on_purpose(error) else ("unclear", text)
    if not _raised_on_purpose(error):
        return "raw", text
    message = str(error).lower()
    if case.names and not any(n.lower() in message for n in case.names):
        return "unclear", text
    return "handled", text


# ============================================================================== helpers
def wav(ctx: Ctx, name: str, samples: np.ndarray, rate: int = 16000, subtype: str = "PCM_16") -> Path:
    """Write a test WAV into the case folder."""
    path = ctx.tmp / name
    sf.write(path, samples, rate, subtype=subtype)
    return path


def sine(n: int = 16000, level: float = 0.5, rate: int = 16000) -> np.ndarray:
    """A 440 Hz tone at ``level`` full scale."""
    return level * np.sin(2 * np.pi * 440 * np.arange(n) / rate)


def peak_is(level: float, tol: float = 0.02) -> Callable[[Any, Ctx], bool]:
    """Result check: an int16 wave whose peak is ``level`` of full scale."""
    def check(result: Any, _ctx: Ctx) -> bool:
        return (isinstance(result, np.ndarray) and result.dtype == np.int16
                and abs(np.abs(result).max() / 32768 - level) < tol)
    return check


def write_file(path: Path, content: bytes) -> Path:
    """Write raw bytes (a deliberately bad file)."""
    path.write_bytes(content)
    return path


def unchanged(path_of: Callable[[Ctx], Path], content: bytes) -> Callable[[Ctx], bool]:
    """files_ok: the file still holds exactly ``content``."""
    return lambda ctx: path_of(ctx).is_file() and path_of(ctx).read_bytes() == content


def tiny_model() -> torch.nn.Module:
    """A seeded, untrained DS-CNN."""
    torch.manual_seed(0)
    return model.DSCNN()


def float_onnx(ctx: Ctx) -> Path:
    """A float DS-CNN ONNX file shared by the cases."""
    return ctx.get("float_onnx", lambda: export.export_onnx(tiny_model(), ctx.root / "float.onnx"))


def ptq_wrapper(ctx: Ctx) -> Any:
    """An 8-bit PTQ wrapper of the DS-CNN, calibrated and converted."""
    from kws_utils import quant
    return ctx.get("ptq", lambda: quant.ptq(tiny_model(), 8, torch.randn(16, *config.INPUT_SHAPE)))


def int_onnx(ctx: Ctx) -> Path:
    """The integer ONNX of the PTQ wrapper."""
    return ctx.get("int_onnx", lambda: Path(ptq_wrapper(ctx).export(
        torch.zeros(1, *config.INPUT_SHAPE), ctx.root / "int8.onnx")))


def edited_int_onnx(ctx: Ctx, edit: Callable[[Any], None]) -> Path:
    """A copy of the integer ONNX with one initializer edited by ``edit(model_proto)``."""
    import onnx
    proto = onnx.load(str(int_onnx(ctx)))
    edit(proto)
    path = ctx.tmp / "edited.onnx"
    onnx.save(proto, str(path))
    return path


def set_weight(value: float, remove: bool = False) -> Callable[[Any], None]:
    """An ONNX edit: first weight initializer's first value set to ``value`` (or removed)."""
    from onnx import numpy_helper

    def edit(proto: Any) -> None:
        for i, init in enumerate(proto.graph.initializer):
            if init.name.endswith(".weight"):
                if remove:
                    del proto.graph.initializer[i]
                    return
                arr = numpy_helper.to_array(init).copy()
                arr.flat[0] = value
                init.CopyFrom(numpy_helper.from_array(arr, init.name))
                return
    return edit


def kws01_folder(ctx: Ctx, rows: list[str], bins: dict[str, int] | None = None) -> Path:
    """A kws01 folder: y_labels.csv with ``rows`` and .bin files of the given sizes."""
    folder = ctx.tmp / "kws01"
    folder.mkdir()
    (folder / "y_labels.csv").write_text("".join(r + "\n" for r in rows))
    for name, size in (bins if bins is not None else {"a.bin": 490}).items():
        (folder / name).write_bytes(bytes(size))
    return folder


def tar_of(ctx: Ctx, members: dict[str, bytes], symlink: str | None = None) -> Path:
    """A .tar.gz archive holding ``members`` (and optionally one symlink member)."""
    path = ctx.tmp / "archive.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return path


def user_folder(ctx: Ctx) -> Path:
    """A folder of the user's own files (no completion marker)."""
    folder = ctx.tmp / "target"
    folder.mkdir()
    (folder / "my_notes.txt").write_text("precious")
    return folder


def user_folder_intact(ctx: Ctx) -> bool:
    """files_ok: the user's folder and file are untouched."""
    return (ctx.tmp / "target" / "my_notes.txt").is_file() and \
        (ctx.tmp / "target" / "my_notes.txt").read_text() == "precious"


def env_import(var: str, value: str) -> Any:
    """Import kws_utils.config in a fresh interpreter with one environment variable set."""
    env = {**os.environ, var: value}
    code = ("from kws_utils import config\n"
            "config.profile(); config.dataset_choice(); config.quant_backend_choice()\n"
            "print(config.SEED)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode:
        return SubprocessError(proc.stderr)
    return proc.stdout.strip()


@dataclass
class SubprocessError:
    """The stderr of a failed child interpreter."""

    stderr: str


def env_case(var: str, value: str, expect_seed: str | None = None) -> Case:
    """A bad (or empty) value of one environment variable, judged from the child's traceback."""
    def call(_ctx: Ctx) -> Any:
        out = env_import(var, value)
        if isinstance(out, SubprocessError):
            lines = out.stderr.strip().splitlines()
            last = lines[-1]
            # On purpose: the innermost traceback frame is a raise statement inside kws_utils.
            frames = [i for i, line in enumerate(lines) if line.strip().startswith("File ")]
            clear = bool(frames) and "kws_utils" in lines[frames[-1]] and \
                lines[frames[-1] + 1].strip().startswith("raise ")
            if clear and var in last:
                raise EnvHandled(last)
            raise EnvRaw(last) if not clear else EnvUnclear(last)
        return out
    check = (lambda r, _c: r == expect_seed) if expect_seed is not None else None
    return Case(f"config/{var}={value!r}", call, (var,), check)


class EnvHandled(Exception):
    """Marker: the child failed with a clear kws_utils error naming the variable."""


class EnvRaw(Exception):
    """Marker: the child failed with a raw Python error."""


class EnvUnclear(Exception):
    """Marker: the child failed with a kws_utils error not naming the variable."""


def shape_is(*shape: int) -> Callable[[Any, Ctx], bool]:
    """Result check: a tensor/array of this shape with finite values."""
    return lambda r, _c: tuple(r.shape) == shape and bool(np.isfinite(np.asarray(r)).all())


def mel_like() -> streaming.StreamResult:
    """A small StreamResult for detection cases."""
    post = np.full((20, 12), 1 / 12)
    return streaming.StreamResult(np.arange(20) * 0.1 + 1, post, post, 100, 300, 3.0)


# ============================================================================== the cases
def cases() -> list[Case]:
    """Every case of the sweep."""
    out: list[Case] = []
    add = out.append
    clip = (sine() * 32767).astype(np.int16)

    # ---------------------------------------------------------------- data.load_audio
    subtypes = ("PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE", "ULAW", "ALAW")
    for subtype in subtypes:
        for rate in (16000, 8000, 44100):
            tol = 0.05 if subtype in ("PCM_U8", "ULAW", "ALAW") else 0.02
            add(Case(f"load_audio/level/{subtype}/{rate}",
                     lambda c, s=subtype, r=rate: data.load_audio(wav(c, "x.wav", sine(r, 0.5, r), r, s)),
                     check=peak_is(0.5, tol)))
    for subtype in ("FLOAT", "DOUBLE"):
        for bad, label in ((np.nan, "nan"), (np.inf, "inf"), (-np.inf, "-inf"), (2.0, "over")):
            def call(c, s=subtype, b=bad):
                x = sine(16000, 0.5)
                x[100] = b
                return data.load_audio(wav(c, "bad.wav", x, 16000, s))
            add(Case(f"load_audio/{label}/{subtype}", call, ("bad.wav",)))
    for channels in (3, 4, 6):
        add(Case(f"load_audio/channels{channels}",
                 lambda c, n=channels: data.load_audio(wav(c, "multi.wav", np.tile(sine(16000, 0.3)[:, None], (1, n)))),
                 ("multi.wav",)))
    add(Case("load_audio/stereo_mixdown",
             lambda c: data.load_audio(wav(c, "st.wav", np.stack([sine(16000, 0.5), sine(16000, 0.5)], 1))),
             check=peak_is(0.5)))
    for rate in (0, -1, -16000, 16000.5, "16000", None, True, 10**9):
        add(Case(f"load_audio/sample_rate={rate!r}",
                 lambda c, r=rate: data.load_audio(wav(c, "x.wav", sine()), r), ("sample_rate",)))
    add(Case("load_audio/missing", lambda c: data.load_audio(c.tmp / "nope.wav"), ("nope.wav",)))
    add(Case("load_audio/empty_file", lambda c: data.load_audio(write_file(c.tmp / "e.wav", b"")), ("e.wav",)))
    add(Case("load_audio/text_file", lambda c: data.load_audio(write_file(c.tmp / "t.wav", b"hello" * 50)), ("t.wav",)))
    add(Case("load_audio/folder", lambda c: data.load_audio(c.tmp), (c_name := "load_audio_folder",)))
    add(Case("load_audio/no_samples", lambda c: data.load_audio(wav(c, "z.wav", np.zeros(0))), ("z.wav",)))

    def truncated(c: Ctx) -> Any:
        path = wav(c, "cut.wav", sine())
        path.write_bytes(path.read_bytes()[:20000])
        return data.load_audio(path)
    add(Case("load_audio/truncated", truncated, ("cut.wav",)))

    # ---------------------------------------------------------------- data.fix_length
    for length in (0, -1, 1.5, "100", None):
        add(Case(f"fix_length/length={length!r}", lambda c, n=length: data.fix_length(clip, n), ("length",)))
    add(Case("fix_length/scalar", lambda c: data.fix_length(np.int16(3)), ("wave",)))
    add(Case("fix_length/pad", lambda c: data.fix_length(clip[:100]), check=shape_is(16000)))
    add(Case("fix_length/crop_batch", lambda c: data.fix_length(np.zeros((2, 20000))), check=shape_is(2, 16000)))

    # ---------------------------------------------------------------- data.load_kws01
    kws01_bad = {"one_field": ["a.bin"], "two_fields": ["a.bin,12"], "empty_name": [",12,3"],
                 "label_text": ["a.bin,12,3", "a.bin,twelve,3"], "label_12": ["a.bin,12,12"],
                 "label_neg": ["a.bin,12,-1"], "classes_10": ["a.bin,10,3"],
                 "header_in_middle": ["a.bin,12,3", "file,classes,label"], "no_rows": []}
    for name, rows in kws01_bad.items():
        add(Case(f"load_kws01/{name}", lambda c, r=rows: data.load_kws01(kws01_folder(c, r)),
                 ("y_labels.csv",)))
    add(Case("load_kws01/missing_bin", lambda c: data.load_kws01(kws01_folder(c, ["b.bin,12,3"])), ("b.bin",)))
    add(Case("load_kws01/bin_size", lambda c: data.load_kws01(kws01_folder(c, ["a.bin,12,3"], {"a.bin": 100})),
             ("a.bin",)))
    add(Case("load_kws01/missing_csv", lambda c: data.load_kws01(c.tmp), ("y_labels.csv",)))
    add(Case("load_kws01/header_row", lambda c: data.load_kws01(kws01_folder(c, ["file,classes,label", "a.bin,12,3"])),
             check=lambda r, _c: tuple(r[0].shape) == (1, 1, 49, 10) and r[1].tolist() == [3]))
    add(Case("load_kws01/blank_lines", lambda c: data.load_kws01(kws01_folder(c, ["", "a.bin,12,3", ""])),
             check=lambda r, _c: r[1].tolist() == [3]))

    # ---------------------------------------------------------------- data.extract
    good = {"a/x.wav": b"1", "b/y.wav": b"2"}
    add(Case("extract/user_folder", lambda c: data.extract(tar_of(c, good), user_folder(c), {"kind": "t"}),
             ("target",), files_ok=user_folder_intact))
    add(Case("extract/user_file", lambda c: data.extract(tar_of(c, good), write_file(c.tmp / "target", b"mine"), {}),
             ("target",), files_ok=unchanged(lambda c: c.tmp / "target", b"mine")))

    def user_siblings(c: Ctx) -> None:
        for name in ("target.old", "target.partial"):
            (c.tmp / name).mkdir()
            (c.tmp / name / "keep.txt").write_text("mine")
    add(Case("extract/keeps_user_siblings",
             lambda c: data.extract(tar_of(c, good), c.tmp / "target", {"kind": "t"}), setup=user_siblings,
             check=lambda r, c: (r / "a" / "x.wav").is_file(),
             files_ok=lambda c: all((c.tmp / n / "keep.txt").is_file() for n in ("target.old", "target.partial"))))

    def extract_twice(c: Ctx) -> Any:
        data.extract(tar_of(c, good), c.tmp / "target", {"kind": "t"})
        return data.extract(tar_of(c, {"c/z.wav": b"3"}), c.tmp / "target", {"kind": "t"})
    add(Case("extract/replaces_own", extract_twice,
             check=lambda r, c: (r / "c" / "z.wav").is_file() and not (r / "a").exists()))
    add(Case("extract/missing_archive", lambda c: data.extract(c.tmp / "none.tar.gz", c.tmp / "t", {}), ("none.tar.gz",)))
    add(Case("extract/corrupt_archive", lambda c: data.extract(write_file(c.tmp / "bad.tar.gz", b"x" * 999), c.tmp / "t", {}),
             ("bad.tar.gz",)))

    def truncated_archive(c: Ctx) -> Any:
        path = tar_of(c, {f"f{i}.wav": os.urandom(5000) for i in range(5)})
        path.write_bytes(path.read_bytes()[:9000])
        return data.extract(path, c.tmp / "t", {})
    add(Case("extract/truncated_archive", truncated_archive, ("archive.tar.gz",)))
    add(Case("extract/traversal", lambda c: data.extract(tar_of(c, {"../evil.txt": b"x"}), c.tmp / "t", {}),
             ("evil",), files_ok=lambda c: not (c.tmp / "evil.txt").exists()))
    add(Case("extract/symlink", lambda c: data.extract(tar_of(c, good, symlink="link"), c.tmp / "t", {}), ("link",)))

    # ---------------------------------------------------------------- synthetic folders
    add(Case("generate_dataset/user_folder", lambda c: synthetic.generate_dataset(user_folder(c), 3, workers=1),
             ("target",), files_ok=user_folder_intact))
    add(Case("generate_test_set/user_file",
             lambda c: synthetic.generate_test_set(write_file(c.tmp / "target", b"mine"), 3, 1, workers=1),
             ("target",), files_ok=unchanged(lambda c: c.tmp / "target", b"mine")))
    for n in (0, 2, -1):
        add(Case(f"split_quotas/{n}", lambda c, k=n: synthetic.split_quotas(k), ("speakers",)))
    add(Case("make_noise/kind", lambda c: synthetic.make_noise("rain", 100, np.random.default_rng(0)), ("rain",)))

    # ---------------------------------------------------------------- features: clips
    bad_waves = {
        "stereo_16000x2": np.zeros((16000, 2), np.int16), "mono_16000x1": np.zeros((16000, 1), np.int16),
        "stereo_float": np.random.default_rng(0).standard_normal((16000, 2)).astype(np.float32),
        "three_d": np.zeros((2, 3, 16000)), "scalar": np.float32(1.0), "empty": np.zeros(0),
        "complex": np.zeros(16000, np.complex64), "bool": np.zeros(16000, bool),
        "strings": ["a", "b"], "nan": np.full(16000, np.nan, np.float32),
        "inf": np.concatenate([np.zeros(15999), [np.inf]]), "none": None,
    }
    for fname, fn in (("mfcc", features.mfcc), ("normalize", features.normalize),
                      ("spectrogram_db", features.spectrogram_db)):
        for name, wave in bad_waves.items():
            add(Case(f"{fname}/{name}", lambda c, f=fn, w=wave: f(w), ("wave",)))
    for dtype in (torch.float16, torch.int32, "float32", np.float64):
        add(Case(f"mfcc/dtype={dtype}", lambda c, d=dtype: features.mfcc(clip, d), ("dtype",)))
    add(Case("mfcc/int16_clip", lambda c: features.mfcc(clip), check=shape_is(49, 10)))
    add(Case("mfcc/float_batch", lambda c: features.mfcc(np.stack([sine(), sine()]).astype(np.float32)),
             check=shape_is(2, 49, 10)))
    add(Case("mfcc/short_clip", lambda c: features.mfcc(clip[:8000]), check=shape_is(49, 10)))
    add(Case("mfcc/long_clip", lambda c: features.mfcc(np.tile(clip, 2)), check=shape_is(49, 10)))
    add(Case("mfcc/silence", lambda c: features.mfcc(np.zeros(16000, np.int16)), check=shape_is(49, 10)))

    # ---------------------------------------------------------------- features: batches
    batch = np.stack([clip] * 3)
    for bs in (0, -1, 1.5, None, "8", True):
        add(Case(f"compute_features/batch_size={bs!r}",
                 lambda c, b=bs: features.compute_features(batch, batch_size=b), ("batch_size",)))
    for name, waves in (("one_d", clip), ("three_d", batch[None]), ("nan", np.full((2, 16000), np.nan)),
                        ("channels_last", np.zeros((16000, 2))), ("strings", [["a"]])):
        add(Case(f"compute_features/{name}", lambda c, w=waves: features.compute_features(w), ("waves",)))
    add(Case("compute_features/augment_not_pair",
             lambda c: features.compute_features(batch, augment=[np.zeros(16000)]), ("augment",)))
    add(Case("compute_features/dtype", lambda c: features.compute_features(batch, dtype=torch.float16), ("dtype",)))
    add(Case("compute_features/batch_size_1", lambda c: features.compute_features(batch, batch_size=1),
             check=shape_is(3, 1, 49, 10)))
    add(Case("compute_features/batch_size_big", lambda c: features.compute_features(batch, batch_size=1000),
             check=shape_is(3, 1, 49, 10)))
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    norm = features.normalize(batch)
    for shift in (-1, 1.5, "10"):
        add(Case(f"time_shift/max_shift={shift!r}",
                 lambda c, s=shift: features.time_shift(norm, gen(), s), ("max_shift_samples",)))
    add(Case("time_shift/generator_none", lambda c: features.time_shift(norm, None), ("generator",)))
    bank = [np.zeros(20000, np.float32)]
    for name, kwargs in (("prob=-0.1", {"prob": -0.1}), ("prob=1.5", {"prob": 1.5}), ("prob=nan", {"prob": math.nan}),
                         ("max_volume=-1", {"max_volume": -1.0}), ("max_volume=inf", {"max_volume": math.inf}),
                         ("max_volume=nan", {"max_volume": math.nan})):
        add(Case(f"mix_background/{name}", lambda c, k=kwargs: features.mix_background(norm, bank, gen(), **k),
                 (name.split("=")[0],)))
    for name, noise in (("empty_bank", []), ("two_d", [np.zeros((2, 20000))]), ("short", [np.zeros(100)]),
                        ("nan", [np.full(20000, np.nan)])):
        add(Case(f"mix_background/{name}", lambda c, b=noise: features.mix_background(norm, b, gen()),
                 ("noise",)))
    add(Case("noise_tensor/strings", lambda c: features.noise_tensor(["x"] * 20000), ("noise",)))
    add(Case("augmented_mfcc/stereo", lambda c: features.augmented_mfcc(np.zeros((16000, 2)), bank, gen()), ("wave",)))

    # ---------------------------------------------------------------- features.cached
    for name, content in (("empty", b""), ("text", b"not a tensor file"), ("truncated", None)):
        def call(c, content=content):
            path = c.tmp / "cache.pt"
            if content is None:
                torch.save(torch.zeros(1000), path)
                content = path.read_bytes()[:300]
            path.write_bytes(content)
            return features.cached(path, lambda: torch.zeros(3))
        add(Case(f"cached/{name}", call, ("cache.pt",)))

    def cached_build_fails(c: Ctx) -> Any:
        def build() -> torch.Tensor:
            raise KeyboardInterruptLike("build failed")
        return features.cached(c.tmp / "cache.pt", build)
    add(Case("cached/build_fails", cached_build_fails, ("*",),
             files_ok=lambda c: not (c.tmp / "cache.pt").exists()))
    add(Case("cached/round_trip", lambda c: (features.cached(c.tmp / "v.pt", lambda: torch.ones(3)),
                                             features.cached(c.tmp / "v.pt", lambda: torch.zeros(3)))[1],
             check=lambda r, _c: torch.equal(r, torch.ones(3))))

    # ---------------------------------------------------------------- model
    net = tiny_model()
    for name, x in (("wide", torch.zeros(2, 1, 49, 20)), ("no_channel", torch.zeros(1, 49, 10)),
                    ("five_d", torch.zeros(1, 1, 49, 10, 1)), ("numpy", np.zeros((1, 1, 49, 10), np.float32)),
                    ("int", torch.zeros(1, 1, 49, 10, dtype=torch.int64)), ("list", [[0.0]])):
        add(Case(f"DSCNN/{name}", lambda c, v=x: net(v), ("input",)))
        add(Case(f"check_input/{name}", lambda c, v=x: model.check_input(v), ("input",)))

    def ckpt(c: Ctx, content: bytes | None = None, obj: Any = None) -> Path:
        path = c.tmp / "model.pth"
        if content is not None:
            path.write_bytes(content)
        else:
            torch.save(obj, path)
        return path
    state = net.state_dict()
    for name, make in (("empty", lambda c: ckpt(c, b"")), ("text", lambda c: ckpt(c, b"hello world")),
                       ("truncated", lambda c: ckpt(c, ckpt(c, obj={"model": state}).read_bytes()[:5000])),
                       ("not_dict", lambda c: ckpt(c, obj=torch.zeros(3))),
                       ("wrong_shapes", lambda c: ckpt(c, obj={k: torch.zeros(1) for k in state})),
                       ("wrong_keys", lambda c: ckpt(c, obj={"w": torch.zeros(1)}))):
        add(Case(f"load_checkpoint/{name}", lambda c, m=make: model.load_checkpoint(tiny_model(), m(c)),
                 ("model.pth",)))
    add(Case("load_checkpoint/missing", lambda c: model.load_checkpoint(tiny_model(), c.tmp / "no.pth"), ("no.pth",)))

    # ---------------------------------------------------------------- training
    x8, y8 = torch.randn(8, 1, 49, 10), torch.arange(8) % 12
    for bs in (0, -1, 2.5, None):
        add(Case(f"Batches/batch_size={bs!r}", lambda c, b=bs: list(training.Batches(x8, y8, b)), ("batch_size",)))
    add(Case("Batches/mismatch", lambda c: training.Batches(x8, y8[:5], 2), ("labels",)))

    def fit(c: Ctx, views: Any = None, y: Any = None, epochs: int = 1, lr: float = 0.05, bs: int = 4) -> Any:
        torch.manual_seed(0)
        return training.fit(model.DSCNN(), [x8] if views is None else views, y8 if y is None else y,
                            x8, y8, epochs, lr, bs, torch.Generator().manual_seed(0), channels_last=False)
    for lr in (math.nan, math.inf, 0.0, -0.1, "0.1", None):
        add(Case(f"fit/lr={lr!r}", lambda c, v=lr: fit(c, lr=v), ("lr",)))
    add(Case("fit/lr=1e6", lambda c: fit(c, lr=1e6, epochs=4), ("lr", "learning rate")))
    add(Case("fit/nan_data", lambda c: fit(c, views=[torch.full_like(x8, math.nan)]), ("nan",)))
    add(Case("fit/inf_data", lambda c: fit(c, views=[torch.full_like(x8, math.inf)]), ("nan", "inf")))
    add(Case("fit/epochs=-1", lambda c: fit(c, epochs=-1), ("epochs",)))
    add(Case("fit/batch_size=0", lambda c: fit(c, bs=0), ("batch_size",)))
    add(Case("fit/no_views", lambda c: fit(c, views=[]), ("train_views",)))
    add(Case("fit/view_mismatch", lambda c: fit(c, views=[x8[:5]]), ("train_y", "labels")))
    add(Case("fit/ok", lambda c: fit(c), check=lambda r, _c: len(r.train_loss) == 1 and math.isfinite(r.train_loss[0])))
    for name, (p, l) in {"label_12": (torch.tensor([0, 1]), torch.tensor([0, 12])),
                         "label_neg": (torch.tensor([0, 1]), torch.tensor([0, -1])),
                         "pred_12": (torch.tensor([0, 12]), torch.tensor([0, 1])),
                         "float_preds": (torch.tensor([0.0, 1.0]), torch.tensor([0, 1])),
                         "two_d": (torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long)),
                         "length": (torch.tensor([0, 1, 2]), torch.tensor([0, 1]))}.items():
        add(Case(f"confusion_matrix/{name}", lambda c, a=p, b=l: training.confusion_matrix(a, b),
                 ("labels", "preds")))
    add(Case("confusion_matrix/n_classes=0", lambda c: training.confusion_matrix(torch.tensor([0]), torch.tensor([0]), 0),
             ("n_classes",)))
    add(Case("confusion_matrix/ok", lambda c: training.confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2])),
             check=lambda r, _c: r.sum() == 3 and r[2, 1] == 1 and r.shape == (12, 12)))
    add(Case("evaluate/empty", lambda c: training.evaluate(net, x8[:0], y8[:0]), ("x",)))
    add(Case("evaluate/label_12", lambda c: training.evaluate(net, x8, torch.full((8,), 12)), ("y",)))
    add(Case("evaluate/float_labels", lambda c: training.evaluate(net, x8, y8.float()), ("y",)))
    add(Case("evaluate/wrong_shape", lambda c: training.evaluate(net, torch.zeros(8, 49, 10), y8), ("input",)))

    def save_keeps_user_tmp(c: Ctx) -> Any:
        training.save_checkpoint(net, c.tmp / "model.pth")
        return model.load_checkpoint(tiny_model(), c.tmp / "model.pth")
    add(Case("save_checkpoint/user_tmp_file", save_keeps_user_tmp, check=lambda r, _c: r is not None,
             setup=lambda c: (c.tmp / "model.tmp").write_bytes(b"user file"),
             files_ok=unchanged(lambda c: c.tmp / "model.tmp", b"user file")))

    def save_fails(c: Ctx) -> Any:
        (c.tmp / "model.pth").write_bytes(b"old checkpoint")
        # torch.save fails half-way through pickling this metadata
        return training.save_checkpoint(net, c.tmp / "model.pth", extra=Unpicklable())
    add(Case("save_checkpoint/failure_keeps_old", save_fails, ("*",),
             files_ok=unchanged(lambda c: c.tmp / "model.pth", b"old checkpoint")))
    add(Case("save_checkpoint/to_folder", lambda c: training.save_checkpoint(net, c.tmp), ("folder", str(Path()))))

    # ---------------------------------------------------------------- export
    def export_fails(c: Ctx) -> Any:
        (c.tmp / "m.onnx").write_bytes(b"old model")
        bad = tiny_model()
        bad.fc6.register_forward_hook(lambda *a: (_ for _ in ()).throw(KeyboardInterruptLike("export broke")))
        return export.export_onnx(bad, c.tmp / "m.onnx")
    add(Case("export_onnx/failure_keeps_old", export_fails, ("*",),
             files_ok=unchanged(lambda c: c.tmp / "m.onnx", b"old model")))
    for name, ex in (("example_wide", torch.zeros(1, 1, 49, 20)), ("example_3d", torch.zeros(1, 49, 10))):
        add(Case(f"export_onnx/{name}", lambda c, e=ex: export.export_onnx(net, c.tmp / "m.onnx", e), ("input",)))
    add(Case("export_onnx/to_folder", lambda c: export.export_onnx(net, c.tmp), ("folder",)))
    add(Case("export_onnx/ok", lambda c: export.onnx_predict(float_onnx(c), x8),
             check=lambda r, _c: r.shape == (8, 12) and np.allclose(r, net.eval()(x8).detach().numpy(), atol=1e-4)))
    bad_onnx = {"text": b"this is not onnx", "empty": b"", "binary": bytes(range(256)) * 4}
    for name, content in bad_onnx.items():
        add(Case(f"onnx_predict/{name}", lambda c, b=content: export.onnx_predict(write_file(c.tmp / "m.onnx", b), x8),
                 ("m.onnx",)))
        add(Case(f"graph_summary/{name}", lambda c, b=content: export.graph_summary(write_file(c.tmp / "m.onnx", b)),
                 ("m.onnx",)))
        add(Case(f"run_stream/{name}", lambda c, b=content: streaming.run_stream(
            str(write_file(c.tmp / "m.onnx", b)), np.zeros(20000, np.float32), progress=False), ("m.onnx",)))

    def truncated_onnx(c: Ctx) -> Path:
        return write_file(c.tmp / "m.onnx", float_onnx(c).read_bytes()[:2000])
    add(Case("onnx_predict/truncated", lambda c: export.onnx_predict(truncated_onnx(c), x8), ("m.onnx",)))
    add(Case("onnx_predict/missing", lambda c: export.onnx_predict(c.tmp / "none.onnx", x8), ("none.onnx",)))
    for name, x in (("wide", torch.zeros(2, 1, 49, 20)), ("strings", ["a"]), ("three_d", torch.zeros(2, 49, 10))):
        add(Case(f"onnx_predict/x_{name}", lambda c, v=x: export.onnx_predict(float_onnx(c), v), ("input", "x")))
    for bs in (0, -5):
        add(Case(f"onnx_predict/batch_size={bs}", lambda c, b=bs: export.onnx_predict(float_onnx(c), x8, b),
                 ("batch_size",)))

    # ---------------------------------------------------------------- integer ONNX and header
    def header_fails(c: Ctx) -> Any:
        from kws_utils import deploy
        (c.tmp / "kws_model.h").write_bytes(b"old header")
        return deploy.write_header(c.tmp / "missing.onnx", c.tmp / "kws_model.h")
    add(Case("write_header/failure_keeps_old", header_fails, ("missing.onnx",), after_merge="i9ti",
             files_ok=unchanged(lambda c: c.tmp / "kws_model.h", b"old header")))

    def header_round_trip(c: Ctx) -> Any:
        from kws_utils import deploy
        deploy.write_header(int_onnx(c), c.tmp / "kws_model.h")
        return deploy.numpy_reference(deploy.model_from_header(c.tmp / "kws_model.h"), x8, return_codes=True)
    add(Case("write_header/round_trip", header_round_trip,
             check=lambda r, c: np.array_equal(r, deploy.numpy_reference(int_onnx(c), x8, return_codes=True))))
    from kws_utils import deploy
    add(Case("load_integer_onnx/text", lambda c: deploy.load_integer_onnx(write_file(c.tmp / "m.onnx", b"xx")),
             ("m.onnx",)))
    add(Case("load_integer_onnx/float_model", lambda c: deploy.load_integer_onnx(float_onnx(c)), ("float.onnx",)))
    for name, edit in (("weight_3.7", set_weight(3.7)), ("weight_300.5", set_weight(300.5)),
                       ("weight_-200", set_weight(-200.0)), ("weight_nan", set_weight(math.nan)),
                       ("weight_missing", set_weight(0, remove=True))):
        add(Case(f"load_integer_onnx/{name}", lambda c, e=edit: deploy.load_integer_onnx(edited_int_onnx(c, e)),
                 ("edited.onnx", "weight"), after_merge="i9ti"))
    for bits in (0, 3, 16):
        add(Case(f"pack/bits={bits}", lambda c, b=bits: deploy.pack(np.zeros(8, np.int8), b), ("bits",)))
        add(Case(f"unpack/bits={bits}", lambda c, b=bits: deploy.unpack(np.zeros(8, np.uint8), b, 8), ("bits",)))

    # ---------------------------------------------------------------- quant wrappers
    def wrapper_wide(c: Ctx) -> Any:
        return ptq_wrapper(c)(torch.zeros(2, 1, 49, 20))
    add(Case("quant/wrapper_wide_input", wrapper_wide, ("input",), after_merge="i9core"))

    def wrapper_example(c: Ctx) -> Any:
        from kws_utils import quant
        return quant.TINPUTinyMLPTQFxModule(tiny_model(), 1, quant.qconfig_for(8),
                                            example_inputs=torch.zeros(1, 49, 10))
    add(Case("quant/example_inputs_3d", wrapper_example, ("input",), after_merge="i9core"))

    def export_after_training(c: Ctx) -> Any:
        from kws_utils import quant
        torch.manual_seed(0)
        w = quant.TINPUTinyMLQATFxModule(tiny_model(), 2, quant.qconfig_for(8),
                                         example_inputs=torch.zeros(1, *config.INPUT_SHAPE))
        w.train()
        w(torch.randn(4, *config.INPUT_SHAPE))
        w.convert()
        w.train()
        opt = torch.optim.SGD(w.parameters(), lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            w(torch.randn(4, *config.INPUT_SHAPE)).sum().backward()
            opt.step()
        w.eval()
        path = w.export(torch.zeros(1, *config.INPUT_SHAPE), c.tmp / "q.onnx")
        return w, path
    # Correct if the file holds the model as trained now (converted again), not the old one.
    add(Case("quant/export_after_more_training", export_after_training, ("convert",),
             check=lambda r, c: np.array_equal(
                 deploy.numpy_reference(r[1], x8), r[0].convert()(x8).numpy()),
             after_merge="i9core"))
    add(Case("quant/qconfig_bits=3", lambda c: __import__("kws_utils.quant").quant.qconfig_for(3), ("bit",)))

    # ---------------------------------------------------------------- streaming
    for hop in (0, -20, 30, 20.5, "100", None):
        add(Case(f"hop_frames/{hop!r}", lambda c, h=hop: streaming.hop_frames(h), ("hop_ms",)))
    for t in (-0.1, 1.1, math.nan, math.inf, "0.5", None):
        add(Case(f"check_threshold/{t!r}", lambda c, v=t: streaming.check_threshold(v), ("threshold",)))
    long = np.zeros(20000, np.float32)
    for name, (audio, rate) in {"two_d": (np.zeros((20000, 2)), 16000), "nan": (np.full(20000, np.nan), 16000),
                                "short": (np.zeros(100), 16000), "strings": (np.array(["a"] * 20000), 16000),
                                "complex": (np.zeros(20000, complex), 16000)}.items():
        add(Case(f"prepare_recording/{name}", lambda c, a=audio, r=rate: streaming.prepare_recording(a, r),
                 ("audio", "recording")))
    for rate in (0, -8000, 1.5, "16000", None):
        add(Case(f"prepare_recording/sample_rate={rate!r}",
                 lambda c, r=rate: streaming.prepare_recording(long, r), ("sample_rate",)))
    add(Case("prepare_recording/resample_8k", lambda c: streaming.prepare_recording(np.zeros(16000), 8000),
             check=lambda r, _c: r.shape == (32000,)))
    post = np.full((10, 12), 1 / 12)
    for span in (0, -1, 1.5, None):
        add(Case(f"smooth/span={span!r}", lambda c, s=span: streaming.smooth(post, s), ("span",)))
    add(Case("smooth/nan", lambda c: streaming.smooth(np.full((3, 12), np.nan), 2), ("posteriors",)))
    add(Case("smooth/one_d", lambda c: streaming.smooth(np.zeros(12), 2), ("posteriors",)))
    for name, kwargs in (("refractory=-1", {"refractory_ms": -1}), ("refractory=nan", {"refractory_ms": math.nan}),
                         ("refractory=str", {"refractory_ms": "1000"}), ("threshold=2", {"threshold": 2.0}),
                         ("threshold=nan", {"threshold": math.nan})):
        add(Case(f"detect/{name}", lambda c, k=kwargs: streaming.detect(mel_like(), **k),
                 (name.split("=")[0],)))
    add(Case("detect/ok", lambda c: streaming.detect(mel_like(), 0.05, 500),
             check=lambda r, _c: len(r) == 1 and r[0].time_s == 1.0))   # one plateau: one detection
    for d in (0.0, -1.0, math.nan):
        add(Case(f"score/duration={d}", lambda c, v=d: streaming.score([], [], v), ("duration_s",)))
    add(Case("match/tolerance=-1", lambda c: streaming.match([], [], -1.0), ("tolerance_s",)))
    add(Case("sweep/thresholds_scalar", lambda c: streaming.sweep(mel_like(), [], 0.5), ("thresholds",)))
    for name, kwargs in (("smooth_ms=-100", {"smooth_ms": -100}), ("hop_ms=30", {"hop_ms": 30}),
                         ("sample_rate=0", {"sample_rate": 0})):
        add(Case(f"run_stream/{name}", lambda c, k=kwargs: streaming.run_stream(
            str(float_onnx(c)), long, progress=False, **k), (name.split("=")[0],)))
    for name, kwargs in (("n_keywords=-1", {"n_keywords": -1}), ("n_distractors=-2", {"n_keywords": 1, "n_distractors": -2}),
                         ("gap_s", {"n_keywords": 1, "gap_s": (2.0, 1.0)}), ("snr_db", {"n_keywords": 1, "snr_db": math.nan})):
        add(Case(f"build_long_recording/{name}", lambda c, k=kwargs: streaming.build_long_recording(None, **k),
                 (name.split("=")[0],)))

    # ---------------------------------------------------------------- plots
    add(Case("source_tag/unknown", lambda c: plots.source_tag("fake"), ("fake",)))
    add(Case("source_tag/none", lambda c: plots.source_tag(None), ("none",)))
    add(Case("table/short_row", lambda c: plots.table([[1]], ["a", "b"]), ("rows",)))
    add(Case("table/ok", lambda c: plots.table([[1, 2.5]], ["a", "b"]), check=lambda r, _c: "2.5" in r))
    add(Case("class_counts/length", lambda c: plots.class_counts({"train": [1, 2]}, "synthetic"), ("counts",)))
    add(Case("class_counts/empty", lambda c: plots.class_counts({}, "synthetic"), ("counts",)))
    add(Case("confusion/shape", lambda c: plots.confusion(np.zeros((3, 3)), "synthetic"), ("cm",)))
    add(Case("confusion/negative", lambda c: plots.confusion(-np.ones((12, 12)), "synthetic"), ("cm",)))
    add(Case("mfcc_grid/size", lambda c: plots.mfcc_grid({"a": np.zeros(10)}, "synthetic", "t"), ("mfccs",)))
    add(Case("mfcc_grid/empty", lambda c: plots.mfcc_grid({}, "synthetic", "t"), ("mfccs",)))
    add(Case("accuracy_vs_weight_bytes/bytes", lambda c: plots.accuracy_vs_weight_bytes([("int8 PTQ", 0, 0.5)], "synthetic"),
             ("bytes",)))
    add(Case("accuracy_vs_weight_bytes/acc", lambda c: plots.accuracy_vs_weight_bytes([("int8 PTQ", 100, 93.0)], "synthetic"),
             ("accuracy",)))
    add(Case("training_curves/empty", lambda c: plots.training_curves(training.History(), "synthetic"), ("history",)))

    # ---------------------------------------------------------------- config (environment)
    for value in ("abc", "1.5", "-1", "0x10", "1e3"):
        add(env_case("KWS_SEED", value))
    add(env_case("KWS_SEED", "", expect_seed="0"))
    add(env_case("KWS_SEED", " 7 ", expect_seed="7"))
    for var in ("KWS_PROFILE", "KWS_DATASET", "KWS_QUANT_BACKEND"):
        add(env_case(var, "bogus"))
    out += round_two(clip, net)
    return out


class KeyboardInterruptLike(RuntimeError):
    """An error raised on purpose by a case to simulate a failure half-way through a write."""


class Unpicklable:
    """An object torch.save cannot pickle (to make a save fail half-way)."""

    def __reduce__(self) -> Any:
        raise KeyboardInterruptLike("cannot pickle this")


def classify_all(root: Path | None = None) -> list[tuple[Case, str, str]]:
    """Run every case in a scratch folder; (case, category, detail) for each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with tempfile.TemporaryDirectory() as tmp:
        ctx = Ctx(Path(root or tmp))
        results = []
        only = os.environ.get("KWS_SWEEP_ONLY", "")
        for case in (c for c in cases() if c.id.startswith(only)):
            if os.environ.get("KWS_SWEEP_VERBOSE"):
                print(case.id, file=sys.stderr, flush=True)
            category, detail = run_case(case, ctx)
            results.append((case, category, detail))
            plt.close("all")
        return results


def main() -> None:
    """Print the counts per category and every case outside 'handled'."""
    import resource
    # Older versions turn some bad inputs (a sample rate of 10**9...) into huge allocations:
    # cap the address space so that they fail with MemoryError instead of the OOM killer.
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, resource.RLIM_INFINITY))
    os.environ["KWS_QUANT_BACKEND"] = "course"   # the sweep checks kws_utils.quant itself
    results = classify_all()
    counts = Counter(category for _, category, _ in results)
    for case, category, detail in results:
        if category != "handled":
            tag = f" [after merge: {case.after_merge}]" if case.after_merge else ""
            print(f"{category:8s} {case.id}{tag}: {detail[:160]}")
    print(f"\n{len(results)} cases")
    for category in CATEGORIES:
        print(f"  {category:8s} {counts.get(category, 0)}")
    pending = [c for c, cat, _ in results if cat != "handled" and c.after_merge]
    print(f"  (of the cases not handled, {len(pending)} are fixed on other branches: "
          f"{', '.join(sorted({c.after_merge for c in pending})) or 'none'})")



# ============================================================================== round two
def _fake_train_dir(ctx: Ctx, words: tuple[str, ...] | None = None, lists: bool = True,
                    noise_s: float = 2.0) -> data.DatasetInfo:
    """A tiny Speech Commands style folder (one clip per word) and an empty-test DatasetInfo."""
    root = ctx.tmp / "train"
    for word in (config.ALL_WORDS if words is None else words):
        (root / word).mkdir(parents=True)
        sf.write(root / word / "a_nohash_0.wav", sine(16000, 0.3), 16000, subtype="PCM_16")
    (root / config.BACKGROUND_NOISE_DIR).mkdir(parents=True, exist_ok=True)
    sf.write(root / config.BACKGROUND_NOISE_DIR / "hum.wav", sine(int(noise_s * 16000), 0.1), 16000)
    if lists:
        (root / "validation_list.txt").write_text("yes/a_nohash_0.wav\n")
        (root / "testing_list.txt").write_text("no/a_nohash_0.wav\n")
    test = ctx.tmp / "test"
    for name in data.TEST_FOLDERS:
        (test / name).mkdir(parents=True, exist_ok=True)
        sf.write(test / name / "t.wav", sine(16000, 0.3), 16000, subtype="PCM_16")
    return data.DatasetInfo("synthetic", root, test, "fake")


def _cache_key_changes(ctx: Ctx, change: Callable[[data.DatasetInfo], None]) -> bool:
    """True if the feature cache folder differs after ``change`` (same names and counts)."""
    info = _fake_train_dir(ctx)
    (info.train_dir / config.COMPLETE_MARKER).write_text('{"kind": "synthetic", "files": 1}')
    before = training.feature_cache_dir(info, data.splits(info))
    change(info)
    return before != training.feature_cache_dir(info, data.splits(info))


def _rerecord(info: data.DatasetInfo) -> None:
    """Re-record one clip under the same name (other content, other size)."""
    path = info.train_dir / "yes" / "a_nohash_0.wav"
    sf.write(path, sine(12000, 0.6), 16000, subtype="PCM_24")


def _dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _file_url(ctx: Ctx, content: bytes = b"dataset bytes") -> tuple[str, str]:
    """A file:// URL of a small source file and its SHA-256."""
    import hashlib
    src = write_file(ctx.tmp / "src.bin", content)
    return src.resolve().as_uri(), hashlib.sha256(content).hexdigest()


def _ten_class_onnx(ctx: Ctx) -> Path:
    """A float ONNX model with 10 outputs instead of 12."""
    torch.manual_seed(0)
    return ctx.get("onnx10", lambda: export.export_onnx(model.DSCNN(n_classes=10), ctx.root / "ten.onnx"))


def _state_with(edit: Callable[[dict], Any]) -> Callable[[Ctx], Path]:
    """A checkpoint file holding ``edit(state_dict)`` of the seeded DS-CNN."""
    def make(ctx: Ctx) -> Path:
        path = ctx.tmp / "model.pth"
        torch.save(edit(tiny_model().state_dict()), path)
        return path
    return make


def _nan_state(state: dict) -> dict:
    """A state dict whose first weight is all NaN."""
    state["conv1.weight"] = torch.full_like(state["conv1.weight"], math.nan)
    return state


def _same_weights(ctx: Ctx) -> Callable[[Any, Ctx], bool]:
    """Result check: the loaded model holds the seeded DS-CNN's weights."""
    return lambda r, _c: all(torch.equal(a, b) for a, b in zip(r.state_dict().values(),
                                                                 tiny_model().state_dict().values()))


def _atomic_fails(ctx: Ctx, err: OSError) -> Any:
    """A write through atomic_path that fails with ``err`` (a full disk, a too large file)."""
    from kws_utils import files
    with files.atomic_path(ctx.tmp / "out.bin") as tmp:
        tmp.write_bytes(b"half")
        raise err


def _with_env(var: str, value: str, call: Callable[[], Any]) -> Any:
    """Call with one environment variable set, restored afterwards."""
    old = os.environ.get(var)
    os.environ[var] = value
    try:
        return call()
    finally:
        if old is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = old


def _lock(ctx: Ctx, pid: int) -> None:
    """A lock file of ``pid`` on the folder 'target'."""
    (ctx.tmp / "target.lock").write_text(f"{pid}\n")


def _kws01_bom(ctx: Ctx) -> Path:
    """A kws01 folder whose y_labels.csv starts with a UTF-8 byte order mark."""
    folder = kws01_folder(ctx, ["a.bin,12,3"])
    (folder / "y_labels.csv").write_bytes(b"\xef\xbb\xbf" + (folder / "y_labels.csv").read_bytes())
    return folder


def _upper_wav_test_set(ctx: Ctx) -> Path:
    """A balanced test folder whose clips end in upper-case .WAV."""
    folder = ctx.tmp / "test"
    for name in data.TEST_FOLDERS:
        (folder / name).mkdir(parents=True)
        sf.write(folder / name / "clip.WAV", sine(16000, 0.3), 16000, subtype="PCM_16")
    data.validate_test_dir(folder, require_marker=False)
    return folder


def round_two(clip: np.ndarray, net: torch.nn.Module) -> list[Case]:
    """The second sweep: silent results, stale caches, raw tracebacks, unclear errors, collisions."""
    from kws_utils import deploy, files, quant
    out: list[Case] = []
    add = out.append
    x8, y8 = torch.randn(8, 1, 49, 10), torch.arange(8) % 12

    # ---------------------------------------------------------------- silent wrong results
    for dtype in (np.uint8, np.uint16, np.int8, np.uint32):
        add(Case(f"r2/mfcc/{np.dtype(dtype).name}", lambda c, d=dtype: features.mfcc(np.full(16000, 7, d)),
                 ("wave",)))
    add(Case("r2/compute_features/uint8", lambda c: features.compute_features(np.zeros((2, 16000), np.uint8)),
             ("waves",)))
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    add(Case("r2/mix_background/int16_clips",
             lambda c: features.mix_background(torch.as_tensor(np.stack([clip] * 2)), [np.zeros(20000, np.float32)],
                                               gen()), ("clips",)))
    add(Case("r2/time_shift/int16_clips",
             lambda c: features.time_shift(torch.as_tensor(np.stack([clip] * 2)), gen()), ("clips",)))
    add(Case("r2/silence_clips/short_noise", lambda c: data.silence_clips(_fake_train_dir(c, (), noise_s=0.5).train_dir),
             ("hum.wav",)))
    add(Case("r2/validate_train_dir/short_noise",
             lambda c: data.validate_train_dir(_fake_train_dir(c, noise_s=0.5).train_dir, require_marker=False),
             ("hum.wav",)))
    for label in (12, -1):
        add(Case(f"r2/class_counts/label={label}", lambda c, v=label: data.class_counts([data.Clip("x.wav", v)]),
                 ("label",)))
        add(Case(f"r2/weighted_sampler/label={label}",
                 lambda c, v=label: data.weighted_sampler([data.Clip("x.wav", v)]), ("label",)))
    add(Case("r2/load_kws01/same_file_two_labels",
             lambda c: data.load_kws01(kws01_folder(c, ["a.bin,12,3", "a.bin,12,4"])), ("a.bin",)))
    add(Case("r2/load_checkpoint/nan", lambda c: model.load_checkpoint(tiny_model(), _state_with(_nan_state)(c)),
             ("model.pth",)))
    for name, kwargs in (("n_classes=0", {"n_classes": 0}), ("n_classes=-3", {"n_classes": -3}),
                         ("n_classes='12'", {"n_classes": "12"}), ("filters=0", {"filters": 0}),
                         ("filters=2.5", {"filters": 2.5})):
        add(Case(f"r2/DSCNN/{name}", lambda c, k=kwargs: model.DSCNN(**k), (name.split("=")[0],)))
    add(Case("r2/qconfig_for/power2_scale='no'", lambda c: quant.qconfig_for(8, "no"), ("power2_scale",)))

    def qt_with(**weight: Any) -> dict:
        qt = quant.qconfig_for(8)
        qt["weight"].update(weight)
        return qt
    for name, kw in (("quant_min=-7.5", {"quant_min": -7.5, "quant_max": 7}),
                     ("quant_max='7'", {"quant_min": -7, "quant_max": "7"})):
        add(Case(f"r2/normalize_qconfig_type/{name}",
                 lambda c, k=kw: quant.normalize_qconfig_type(qt_with(**k)), (name.split("=")[0],)))
    for epochs in (True, 0, 2.5):
        add(Case(f"r2/QATFxModule/total_epochs={epochs!r}", lambda c, e=epochs: quant.TINPUTinyMLQATFxModule(
            tiny_model(), e, quant.qconfig_for(8), example_inputs=torch.zeros(1, *config.INPUT_SHAPE)),
            ("total_epochs",)))
    add(Case("r2/integer_model/nan_input",
             lambda c: ptq_wrapper(c).convert()(torch.full((2, *config.INPUT_SHAPE), math.nan)), ("nan",)))
    add(Case("r2/pack/out_of_range", lambda c: deploy.pack(np.array([9, 0]), 4), ("values",)))
    add(Case("r2/pack/floats", lambda c: deploy.pack(np.array([1.5, 0.0]), 4), ("values",)))
    add(Case("r2/pack/int8_overflow", lambda c: deploy.pack(np.array([200]), 8), ("values",)))
    add(Case("r2/unpack/count_too_big", lambda c: deploy.unpack(np.zeros(2, np.uint8), 4, 9), ("count",)))
    add(Case("r2/unpack/count_negative", lambda c: deploy.unpack(np.zeros(2, np.uint8), 4, -1), ("count",)))
    add(Case("r2/pack/round_trip", lambda c: deploy.unpack(deploy.pack(np.array([-2, 1, 0, -1, 1]), 2), 2, 5),
             check=lambda r, _c: r.tolist() == [-2, 1, 0, -1, 1]))
    for name, kwargs in (("runs=0", {"runs": 0}), ("runs=-5", {"runs": -5}), ("warmup=-1", {"warmup": -1}),
                         ("runs=2.5", {"runs": 2.5})):
        add(Case(f"r2/latency_ms/{name}", lambda c, k=kwargs: deploy.latency_ms(float_onnx(c), **k),
                 (name.split("=")[0],)))
    for guard in ("1BAD", "kws model.h", ""):
        add(Case(f"r2/header_text/guard={guard!r}", lambda c, g=guard: deploy.header_text(int_onnx(c), g),
                 ("guard",)))
    add(Case("r2/run_stream/ten_classes", lambda c: streaming.run_stream(
        str(_ten_class_onnx(c)), np.zeros(20000, np.float32), progress=False), ("ten.onnx",)))
    add(Case("r2/onnx_predict/ten_classes", lambda c: export.onnx_predict(_ten_class_onnx(c), x8),
             check=lambda r, _c: r.shape == (8, 10)))
    for opset in (99, 5, "17"):
        add(Case(f"r2/export_onnx/opset={opset!r}",
                 lambda c, o=opset: export.export_onnx(net, c.tmp / "m.onnx", opset_version=o), ("opset_version",)))
    add(Case("r2/data_root/empty", lambda c: _with_env("KWS_DATA_ROOT", "", config.data_root), ("KWS_DATA_ROOT",)))
    add(Case("r2/data_root/relative", lambda c: _with_env("KWS_DATA_ROOT", "some/data", config.data_root),
             check=lambda r, _c: r.is_absolute()))
    for name, (speakers, per_class) in (("per_class=0", (3, 0)), ("per_class=-1", (3, -1)),
                                        ("speakers=0", (0, 1)), ("per_class=1.5", (3, 1.5))):
        add(Case(f"r2/generate_test_set/{name}", lambda c, s=speakers, p=per_class: synthetic.generate_test_set(
            c.tmp / "t", s, p, workers=1), (name.split("=")[0],),
            files_ok=lambda c: not (c.tmp / "t").exists()))
    add(Case("r2/generate_dataset/speakers=0", lambda c: synthetic.generate_dataset(c.tmp / "t", 0, workers=1),
             ("speakers",), files_ok=lambda c: not (c.tmp / "t").exists()))

    # ---------------------------------------------------------------- stale caches
    add(Case("r2/feature_cache/rerecorded_clip", lambda c: _cache_key_changes(c, _rerecord),
             check=lambda r, _c: r is True))
    add(Case("r2/feature_cache/new_marker", lambda c: _cache_key_changes(
        c, lambda i: (i.train_dir / config.COMPLETE_MARKER).write_text('{"kind": "synthetic", "files": 2}')),
        check=lambda r, _c: r is True))
    add(Case("r2/feature_cache/same_content", lambda c: _cache_key_changes(c, lambda i: None),
             check=lambda r, _c: r is False))

    def wrong_shape(c: Ctx) -> Any:
        torch.save(torch.zeros(5, 1, 49, 10), c.tmp / "cache.pt")
        return features.cached(c.tmp / "cache.pt", lambda: torch.zeros(3, 1, 49, 10), shape=(3, 1, 49, 10))
    add(Case("r2/cached/wrong_shape", wrong_shape, ("cache.pt",)))

    def wrong_type(c: Ctx) -> Any:
        torch.save({"a": torch.zeros(3)}, c.tmp / "cache.pt")
        return features.cached(c.tmp / "cache.pt", lambda: torch.zeros(3), shape=(3,))
    add(Case("r2/cached/wrong_type", wrong_type, ("cache.pt",)))
    add(Case("r2/cached/right_shape", lambda c: (features.cached(c.tmp / "v.pt", lambda: torch.ones(3), shape=(3,)),
                                                 features.cached(c.tmp / "v.pt", lambda: torch.zeros(3), shape=(3,)))[1],
             check=lambda r, _c: torch.equal(r, torch.ones(3))))

    # ---------------------------------------------------------------- raw tracebacks
    add(Case("r2/splits/half_extracted", lambda c: data.splits(_fake_train_dir(c, ("yes", "no"))), ("train",)))
    add(Case("r2/splits/no_validation_list", lambda c: data.splits(_fake_train_dir(c, lists=False)),
             ("validation_list.txt",)))

    def latin1_list(c: Ctx) -> Any:
        info = _fake_train_dir(c)
        (info.train_dir / "validation_list.txt").write_bytes("yes/caf\xe9.wav\n".encode("latin-1"))
        return data.splits(info)
    add(Case("r2/splits/non_utf8_list", latin1_list, ("validation_list.txt",)))
    add(Case("r2/weighted_sampler/empty", lambda c: data.weighted_sampler([]), ("clips",)))
    add(Case("r2/class_weights/two_d", lambda c: data.class_weights(np.ones((2, 12))), ("counts",)))

    def fit(c: Ctx, y: Any) -> Any:
        torch.manual_seed(0)
        return training.fit(model.DSCNN(), [x8], y, x8, y8, 1, 0.05, 4, torch.Generator().manual_seed(0),
                            channels_last=False)
    for name, y in (("label_12", torch.full((8,), 12)), ("label_-1", torch.full((8,), -1)),
                    ("float_labels", y8.float())):
        add(Case(f"r2/fit/train_y_{name}", lambda c, v=y: fit(c, v), ("train_y",)))
    add(Case("r2/fit/val_y_label_12", lambda c: training.fit(
        model.DSCNN(), [x8], y8, x8, torch.full((8,), 12), 1, 0.05, 4, torch.Generator().manual_seed(0),
        channels_last=False), ("val_y",)))
    for seed in (-1, 1.5, "7", 2**64):
        add(Case(f"r2/set_seed/{seed!r}", lambda c, s=seed: training.set_seed(s), ("seed",)))
    add(Case("r2/download/not_a_url", lambda c: data.download("not a url", c.tmp / "d.bin", "0" * 64), ("url",)))
    add(Case("r2/download/bad_sha256", lambda c: data.download(_file_url(c)[0], c.tmp / "d.bin", "xyz"),
             ("sha256",)))

    def blocker(c: Ctx) -> Path:
        return write_file(c.tmp / "blocker", b"a file, not a folder")
    for name, call in (("save_checkpoint", lambda c: training.save_checkpoint(net, blocker(c) / "m.pth")),
                       ("export_onnx", lambda c: export.export_onnx(net, blocker(c) / "m.onnx")),
                       ("write_header", lambda c: deploy.write_header(int_onnx(c), blocker(c) / "m.h")),
                       ("cached", lambda c: features.cached(blocker(c) / "v.pt", lambda: torch.ones(3))),
                       ("write_text", lambda c: files.write_text(blocker(c) / "sub" / "a.txt", "x"))):
        add(Case(f"r2/{name}/inside_a_file", call, ("blocker",),
                 files_ok=unchanged(lambda c: c.tmp / "blocker", b"a file, not a folder")))
    import errno
    add(Case("r2/atomic_path/disk_full", lambda c: _atomic_fails(c, OSError(errno.ENOSPC, "No space left on device")),
             ("out.bin",)))
    def unwritable(c: Ctx) -> Any:
        def refuse(*_a: Any, dir: Any = None, **_k: Any) -> Any:   # noqa: A002 - mkstemp's name
            raise PermissionError(errno.EACCES, "Permission denied", str(Path(dir) / ".kws-tmp-x"))
        real, tempfile.mkstemp = tempfile.mkstemp, refuse    # as root, chmod would not stop a write
        try:
            return files.write_text(c.tmp / "report.txt", "x")
        finally:
            tempfile.mkstemp = real
    add(Case("r2/atomic_path/unwritable_folder", unwritable, ("report.txt",)))
    add(Case("r2/atomic_path/too_large", lambda c: _atomic_fails(c, OSError(errno.EFBIG, "File too large")),
             ("out.bin",)))
    for name, content in (("binary", bytes(range(256)) * 4), ("empty", b""), ("text", b"hello\n")):
        add(Case(f"r2/read_header/{name}", lambda c, b=content: deploy.read_header(write_file(c.tmp / "k.h", b)),
                 ("k.h",)))
    add(Case("r2/read_header/missing", lambda c: deploy.read_header(c.tmp / "none.h"), ("none.h",)))
    for bs in (0, -1, 2.5):
        add(Case(f"r2/ptq/batch_size={bs!r}", lambda c, b=bs: quant.ptq(tiny_model(), 8, x8, batch_size=b),
                 ("batch_size",)))
    add(Case("r2/ptq/empty_calibration", lambda c: quant.ptq(tiny_model(), 8, x8[:0]), ("calib_x",)))
    add(Case("r2/IntegerModel/no_layers", lambda c: quant.IntegerModel((0.1, -128, 127), [], config.INPUT_SHAPE),
             ("layers",)))
    add(Case("r2/integer_model/numpy_input",
             lambda c: ptq_wrapper(c).convert()(np.zeros((1, *config.INPUT_SHAPE), np.float32)), ("input",)))
    add(Case("r2/onnx_predict/empty_batch", lambda c: export.onnx_predict(float_onnx(c), x8[:0]),
             check=lambda r, _c: r.shape == (0, 12)))
    add(Case("r2/DSCNN/keyword_x", lambda c: net.eval()(x=x8), check=lambda r, _c: torch.equal(r, net.eval()(x8))))
    add(Case("r2/DSCNN/two_inputs", lambda c: net(x8, x8), ("input",)))
    add(Case("r2/DSCNN/no_argument", lambda c: net(), ("input",)))

    # ---------------------------------------------------------------- unclear errors
    def upper_sha(c: Ctx) -> Any:
        url, sha = _file_url(c)
        return data.download(url, c.tmp / "d.bin", sha.upper(), show_progress=False)
    add(Case("r2/download/upper_case_sha256", upper_sha, check=lambda r, _c: r.read_bytes() == b"dataset bytes"))
    add(Case("r2/load_kws01/bom", lambda c: data.load_kws01(_kws01_bom(c)), check=lambda r, _c: r[1].tolist() == [3]))
    add(Case("r2/test_clips/upper_case_wav", lambda c: data.test_clips(_upper_wav_test_set(c)),
             check=lambda r, _c: len(r) == len(data.TEST_FOLDERS)))
    for hop, ok in ((100.0, True), (40.0, True), (30.5, False)):
        if ok:
            add(Case(f"r2/hop_frames/{hop!r}", lambda c, h=hop: streaming.hop_frames(h),
                     check=lambda r, _c, h=hop: r == int(h) // 20))
        else:
            add(Case(f"r2/hop_frames/{hop!r}", lambda c, h=hop: streaming.hop_frames(h), ("hop_ms",)))
    add(Case("r2/prepare_recording/one_row", lambda c: streaming.prepare_recording(np.zeros((1, 20000))),
             check=lambda r, _c: r.shape == (20000,)))
    add(Case("r2/prepare_recording/two_rows", lambda c: streaming.prepare_recording(np.zeros((2, 20000))),
             ("audio[0]", "mean(axis=0)")))
    add(Case("r2/ptq/nan_calibration", lambda c: quant.ptq(tiny_model(), 8, torch.full((4, *config.INPUT_SHAPE), math.nan)),
             ("calib_x",)))

    def qdq_file(c: Ctx) -> Path:
        w = ptq_wrapper(c)
        return Path(w.export(torch.zeros(1, *config.INPUT_SHAPE), c.tmp / "fq.onnx",
                             model_qconfig_format=quant.TinyMLModelQConfigFormat.QDQ_MODEL))
    add(Case("r2/load_integer_onnx/fake_quant_form", lambda c: deploy.load_integer_onnx(qdq_file(c)), ("QDQ",)))
    add(Case("r2/load_checkpoint/module_prefix", lambda c: model.load_checkpoint(
        tiny_model(), _state_with(lambda s: {f"module.{k}": v for k, v in s.items()})(c)), check=_same_weights(None)))
    add(Case("r2/load_checkpoint/state_dict_key", lambda c: model.load_checkpoint(
        tiny_model(), _state_with(lambda s: {"state_dict": s, "epoch": 3})(c)), check=_same_weights(None)))

    # ---------------------------------------------------------------- runs that collide or die
    good = {"a/x.wav": b"1", "b/y.wav": b"2"}
    add(Case("r2/extract/live_lock", lambda c: data.extract(tar_of(c, good), c.tmp / "target", {"kind": "t"}),
             ("target.lock",), setup=lambda c: _lock(c, os.getppid()),
             files_ok=lambda c: not (c.tmp / "target").exists() and (c.tmp / "target.lock").is_file()))
    add(Case("r2/extract/stale_lock", lambda c: data.extract(tar_of(c, good), c.tmp / "target", {"kind": "t"}),
             setup=lambda c: _lock(c, _dead_pid()),
             check=lambda r, c: (r / "a" / "x.wav").is_file() and not (c.tmp / "target.lock").exists()))
    add(Case("r2/generate_test_set/live_lock", lambda c: synthetic.generate_test_set(c.tmp / "target", 3, 1, workers=1),
             ("target.lock",), setup=lambda c: _lock(c, os.getppid())))

    def dead_tmp(c: Ctx) -> None:
        write_file(c.tmp / f"{files.TEMP_PREFIX}d.bin.{_dead_pid()}.abc123.bin", b"half a download")
    add(Case("r2/download/removes_dead_tmp", lambda c: data.download(_file_url(c)[0], c.tmp / "d.bin", _file_url(c)[1],
                                                                      show_progress=False),
             setup=dead_tmp, check=lambda r, c: not any(p.name.startswith(".kws-tmp-") for p in c.tmp.iterdir())))

    def live_tmp(c: Ctx) -> None:
        write_file(c.tmp / f"{files.TEMP_PREFIX}d.bin.{os.getppid()}.abc123.bin", b"another run writing")
    add(Case("r2/download/keeps_live_tmp", lambda c: data.download(_file_url(c)[0], c.tmp / "d.bin", _file_url(c)[1],
                                                                    show_progress=False),
             setup=live_tmp, files_ok=lambda c: any(p.name.startswith(".kws-tmp-") for p in c.tmp.iterdir()),
             check=lambda r, _c: r.is_file()))
    add(Case("r2/extract/folder_mode", lambda c: data.extract(tar_of(c, good), c.tmp / "target", {"kind": "t"}),
             check=lambda r, _c: (r.stat().st_mode & 0o777) == 0o777 & ~files._umask()))
    return out


if __name__ == "__main__":
    main()
