"""Deployment: read the exported integer ONNX back, run it in pure NumPy, write a C header, budget.

Everything here starts from the exported file, so it checks what will actually ship:

- ``load_integer_onnx`` (``kws_utils.tinpu_onnx``) reads the integer weights and requantization
  constants of a TINPU integer ONNX file, TI's export or the course's, into an ``NpuModel``;
- ``numpy_reference`` executes that model with int64 NumPy arithmetic (im2col + einsum), the
  computation the NPU performs, and must match onnxruntime bit for bit;
- ``write_header`` / ``read_header`` / ``unpack`` move the packed parameters into firmware and
  back (int4: two weights per byte, int2: four, low bits first, two's complement);
- ``budget`` measures weight bytes, peak activation memory, MACs and latency per variant.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from numpy.lib.stride_tricks import sliding_window_view
from onnx import numpy_helper
from torch import nn

from kws_utils import config, files, model as kws_model, quant, streaming, tinpu_onnx
from kws_utils.errors import FileFormatError, InputError, MissingFileError

OPS = ("conv", "avgpool", "linear")
INPUT_STEPS = ("Add", "Mul", "Div", "Floor", "Round")
_C_TYPES = {"int8_t": np.int8, "uint8_t": np.uint8, "int16_t": np.int16, "int32_t": np.int32}


# ----------------------------------------------------------------------------- ONNX -> model
load_integer_onnx = tinpu_onnx.load_integer_onnx
NpuModel, NpuLayer = tinpu_onnx.NpuModel, tinpu_onnx.NpuLayer


def _as_model(source: str | Path | NpuModel) -> NpuModel:
    """An NpuModel from itself or from a TINPU integer ONNX file."""
    return source if isinstance(source, NpuModel) else load_integer_onnx(source)


# ----------------------------------------------------------------------------- NumPy reference
def _requantize(acc: np.ndarray, layer: NpuLayer, axis_shape: list[int]) -> np.ndarray:
    """clamp(floor((acc + offset) * mult / 2**shift)), the product as the file computes it."""
    offset, mult, shift = (np.asarray(v, np.int64).reshape(axis_shape)
                           for v in (layer.offset, layer.mult, layer.shift))
    if layer.float32_product:
        # TI's graph multiplies in float32: identical to the integer shift while the product
        # stays below 2**24, rounded above it. Follow the file so the check is bit for bit.
        m = (mult * np.exp2(-shift.astype(np.float64))).astype(np.float32)
        y = np.floor((acc + offset).astype(np.float32) * m).astype(np.int64)
    else:
        y = ((acc + offset) * mult) >> shift   # an arithmetic right shift is the floor
    return np.clip(y, layer.qmin, layer.qmax)


def conv_int(x: np.ndarray, layer: NpuLayer) -> np.ndarray:
    """Grouped 2-D convolution of int64 activations (N, C, H, W) by im2col and einsum."""
    w = layer.weight.astype(np.int64)
    (ph, pw), (sh, sw), g = layer.padding, layer.stride, layer.groups
    kh, kw = w.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    cols = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]  # N,C,Ho,Wo,kh,kw
    n, c, ho, wo = cols.shape[:4]
    cols = cols.reshape(n, g, c // g, ho, wo, kh, kw)
    wg = w.reshape(g, w.shape[0] // g, c // g, kh, kw)
    return np.einsum("ngchwij,gocij->ngohw", cols, wg, optimize=True).reshape(n, -1, ho, wo)


def _bias(layer: NpuLayer, shape: list[int]) -> np.ndarray | int:
    """The layer's separate int32 bias (0 when it is folded into the offset, as in TI's form)."""
    return 0 if layer.bias is None else layer.bias.astype(np.int64).reshape(shape)


def run_layer(layer: NpuLayer, x: np.ndarray) -> np.ndarray:
    """One NPU layer on int64 activations: integer op + bias, then requantization."""
    if layer.op == "avgpool":
        return _requantize(x.sum(axis=(2, 3)), layer, [1, -1])
    if layer.op == "conv":
        return _requantize(conv_int(x, layer) + _bias(layer, [1, -1, 1, 1]), layer, [1, -1, 1, 1])
    acc = x @ layer.weight.astype(np.int64).T + _bias(layer, [1, -1])
    return _requantize(acc, layer, [1, -1])


def numpy_reference(source: str | Path | NpuModel, x: np.ndarray | torch.Tensor,
                    return_codes: bool = False) -> np.ndarray:
    """Run the integer model in pure NumPy integers: the same output as onnxruntime, bit for bit."""
    int_model = _as_model(source)
    x = np.asarray(x, dtype=np.float32)
    kws_model.check_input(torch.from_numpy(x))
    q = int_model.input_stage.quantize(x)
    for layer in int_model.layers:
        q = run_layer(layer, q)
    if return_codes:
        return q
    if np.isfinite(int_model.output_scale):
        return q.astype(np.float32) * np.float32(int_model.output_scale)
    return q.astype(int_model.output_dtype)


# ----------------------------------------------------------------------------- packing
def _check_bits(bits: object) -> None:
    """Refuse a weight bit width the NPU packing does not have (8, 4 or 2)."""
    if bits not in (8, 4, 2) or isinstance(bits, bool):
        raise ValueError(f"bits={bits!r}: packed weights are 8, 4 or 2 bits wide.")


def _check_values(values: object, bits: int) -> np.ndarray:
    """Integer weights that fit ``bits`` signed bits, or a clear error (no silent wrap-around)."""
    v = np.asarray(values)
    if not (np.issubdtype(v.dtype, np.integer) or (np.issubdtype(v.dtype, np.floating)
                                                   and np.isfinite(v).all() and (v == np.round(v)).all())):
        raise InputError(f"values must be whole numbers (integer weight codes), got dtype {v.dtype}; "
                         "quantize the weights first (e.g. deploy.load_integer_onnx).")
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if v.size and (v.min() < low or v.max() > high):
        raise InputError(f"values span {int(v.min())}..{int(v.max())}, outside the {bits}-bit range "
                         f"{low}..{high}: they would wrap around. Quantize to {bits} bits first.")
    return v.astype(np.int64)


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack signed weights into bytes: 8 // bits per byte, lowest bits first, two's complement."""
    _check_bits(bits)
    values = _check_values(values, bits)
    if bits == 8:
        return np.asarray(values, dtype=np.int8).ravel()
    per_byte, mask = 8 // bits, (1 << bits) - 1
    v = np.asarray(values, dtype=np.int64).ravel()
    v = np.concatenate([v, np.zeros(-len(v) % per_byte, np.int64)]).reshape(-1, per_byte)
    fields = (v & mask) << (bits * np.arange(per_byte))
    return fields.sum(axis=1).astype(np.uint8)


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of pack: the first ``count`` signed weights as int8."""
    _check_bits(bits)
    available = np.asarray(packed).size * (8 // bits)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 0 <= count <= available:
        raise InputError(f"count={count!r}: give a whole number from 0 to {available}, the number "
                         f"of {bits}-bit values these {np.asarray(packed).size} bytes hold.")
    if bits == 8:
        return np.asarray(packed, dtype=np.int8)[:count]
    per_byte, mask = 8 // bits, (1 << bits) - 1
    fields = (np.asarray(packed, np.int64)[:, None] >> (bits * np.arange(per_byte))) & mask
    signed = np.where(fields >= 1 << (bits - 1), fields - (1 << bits), fields)
    return signed.ravel()[:count].astype(np.int8)


# ----------------------------------------------------------------------------- C header
def _c_array(ctype: str, name: str, values: np.ndarray) -> list[str]:
    """A const C array definition, 16 values per line."""
    flat = [str(int(v)) for v in np.asarray(values).ravel()]
    rows = [", ".join(flat[i:i + 16]) for i in range(0, len(flat), 16)]
    return [f"static const {ctype} {name}[{len(flat)}] = {{", *(f"    {r}," for r in rows), "};"]


def power2_exponent(scale: float) -> int | None:
    """e with scale == 2**e exactly, else None."""
    mantissa, exponent = np.frexp(scale)
    return int(exponent - 1) if mantissa == 0.5 else None


def _int_ctype(values: np.ndarray) -> str:
    """The smallest C integer type holding ``values``."""
    lo, hi = int(np.min(values)), int(np.max(values))
    for ctype, dtype in (("uint8_t", np.uint8), ("int8_t", np.int8), ("int16_t", np.int16)):
        if np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
            return ctype
    return "int32_t"


def _layer_block(i: int, layer: NpuLayer) -> list[str]:
    """#defines and arrays of one layer."""
    p = f"KWS_L{i}_"
    lines = [f"/* layer {i}: {layer.name} ({layer.op}) */",
             f"#define {p}OP KWS_OP_{layer.op.upper()}", f"#define {p}CHANNELS {len(layer.offset)}",
             f"#define {p}QMIN {layer.qmin}", f"#define {p}QMAX {layer.qmax}",
             f"#define {p}FLOAT32_PRODUCT {int(layer.float32_product)}"]
    if layer.weight is not None:
        shape = list(layer.weight.shape) + [1] * (4 - layer.weight.ndim)
        lines += [f"#define {p}{k} {v}" for k, v in zip(("COUT", "CIN_PER_GROUP", "KH", "KW"), shape)]
        lines += [f"#define {p}STRIDE_H {layer.stride[0]}", f"#define {p}STRIDE_W {layer.stride[1]}",
                  f"#define {p}PAD_H {layer.padding[0]}", f"#define {p}PAD_W {layer.padding[1]}",
                  f"#define {p}GROUPS {layer.groups}", f"#define {p}WEIGHT_BITS {layer.weight_bits}",
                  f"#define {p}WEIGHT_COUNT {layer.weight.size}"]
        packed = pack(layer.weight, layer.weight_bits)
        lines += _c_array("int8_t" if layer.weight_bits == 8 else "uint8_t", f"kws_l{i}_weight", packed)
    if layer.bias is not None:
        lines += _c_array("int32_t", f"kws_l{i}_bias", layer.bias)
    lines += _c_array("int32_t", f"kws_l{i}_offset", layer.offset)
    lines += _c_array(_int_ctype(layer.mult), f"kws_l{i}_mult", layer.mult)
    lines += _c_array("uint8_t", f"kws_l{i}_shift", layer.shift)
    return lines + [""]


def _input_lines(m: NpuModel) -> list[str]:
    """#defines of the input stage: its steps in order, and the scale they amount to."""
    stage = m.input_stage
    lines = [f"#define KWS_INPUT_QMIN {stage.qmin}", f"#define KWS_INPUT_QMAX {stage.qmax}",
             f"#define KWS_INPUT_N_STEPS {len(stage.steps)}"]
    for j, (op, c) in enumerate(stage.steps):
        lines.append(f"#define KWS_INPUT_STEP{j}_OP KWS_STEP_{op.upper()}")
        if c is not None:
            lines.append(f"#define KWS_INPUT_STEP{j}_VALUE {float(c.ravel()[0])!r}f")
    mult, div = stage.scalar("Mul"), stage.scalar("Div")
    scale = 1 / mult if mult else div
    if scale:
        exp = power2_exponent(scale)
        lines.append(f"#define KWS_INPUT_SCALE {scale!r}f  /* one input code is this much of x */")
        if exp is not None:
            lines.append(f"#define KWS_INPUT_SCALE_LOG2 ({exp})  /* scale = 2^({exp}) */")
    return lines


def header_text(source: str | Path | NpuModel, guard: str = "KWS_MODEL_H") -> str:
    """The C header of an integer model: shapes, bits, packed weights, requantization."""
    if not isinstance(guard, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", guard):
        raise InputError(f"guard={guard!r}: an include guard must be a C identifier (letters, "
                         "digits and _, not starting with a digit), e.g. 'KWS_MODEL_H'.")
    m = _as_model(source)
    lines = [f"#ifndef {guard}", f"#define {guard}", "/* TI NPU keyword-spotting model, generated by "
             "kws_utils.deploy from a TINPU integer ONNX file.", " * Input: q = clamp(steps(x), "
             "INPUT_QMIN, INPUT_QMAX), the steps applied in order in float32.",
             " * Each layer: acc = op(x, w) (+ bias) (int32); y = clamp((acc + offset) * mult >> "
             "shift, QMIN, QMAX).", " * int4/int2 weights are packed 2/4 per byte, lowest bits "
             "first, two's complement; order (COUT, CIN_PER_GROUP, KH, KW). */",
             "#include <stdint.h>", "", "#define KWS_OP_CONV 0", "#define KWS_OP_AVGPOOL 1",
             "#define KWS_OP_LINEAR 2", *(f"#define KWS_STEP_{op.upper()} {j}" for j, op in
                                        enumerate(INPUT_STEPS)),
             f"#define KWS_N_LAYERS {len(m.layers)}",
             *(f"#define KWS_INPUT_{k} {v}" for k, v in zip(("C", "H", "W"), m.input_shape)),
             *_input_lines(m)]
    if np.isfinite(m.output_scale):
        lines.append(f"#define KWS_OUTPUT_SCALE {m.output_scale!r}f  /* logit = code * scale */")
    lines.append("")
    for i, layer in enumerate(m.layers):
        lines += _layer_block(i, layer)
    return "\n".join(lines + [f"#endif  /* {guard} */", ""])


def write_header(source: str | Path | NpuModel, path: str | Path) -> Path:
    """Write the C header of an integer model (ONNX file or NpuModel) to ``path``."""
    return files.write_text(path, header_text(source))


@dataclass
class Header:
    """What a C header holds: #define values and const arrays (with their C types)."""

    defines: dict[str, int | float]
    arrays: dict[str, np.ndarray]


_DEFINE = re.compile(r"^#define\s+(\w+)\s+\(?([-\w.+]+?)f?\)?(?:\s|$)", re.M)
_ARRAY = re.compile(r"static const (\w+) (\w+)\[(\d+)\] = \{([^}]*)\};")


def _header_text_of(path: Path) -> str:
    """The text of a header file written by write_header, or a clear error."""
    if not path.is_file():
        raise MissingFileError(f"{path} not found: write it with deploy.write_header first.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FileFormatError(f"{path} is not a text file: give the C header written by "
                              "deploy.write_header.") from None
    if "#define KWS_N_LAYERS" not in text:
        raise FileFormatError(f"{path} is not a model header written by deploy.write_header (no "
                              "KWS_N_LAYERS): write it again with deploy.write_header.")
    return text


def read_header(path: str | Path) -> Header:
    """Parse a header written by write_header (numbers and macros naming other macros)."""
    text = _header_text_of(Path(path))
    raw = dict(_DEFINE.findall(text))
    defines: dict[str, int | float] = {}
    for name, value in raw.items():
        value = raw.get(value, value)   # one level of indirection: KWS_OP_CONV and friends
        defines[name] = int(value) if re.fullmatch(r"-?\d+", value) else float(value)
    arrays = {}
    for ctype, name, count, body in _ARRAY.findall(text):
        arrays[name] = np.array([int(v) for v in body.replace(",", " ").split()], _C_TYPES[ctype])
        if len(arrays[name]) != int(count):
            raise ValueError(f"{path}: {name} declares {count} values but holds {len(arrays[name])}.")
    return Header(defines, arrays)


def _header_layer(h: Header, i: int) -> NpuLayer:
    """Layer i of a parsed header as an NpuLayer."""
    d, a, p = h.defines, h.arrays, f"KWS_L{i}_"
    op = OPS[d[f"{p}OP"]]
    weight = None
    if f"kws_l{i}_weight" in a:
        shape = [d[f"{p}{k}"] for k in ("COUT", "CIN_PER_GROUP", "KH", "KW")]
        weight = unpack(a[f"kws_l{i}_weight"], d[f"{p}WEIGHT_BITS"], d[f"{p}WEIGHT_COUNT"])
        weight = weight.reshape(shape if op == "conv" else shape[:2])
    bias = a.get(f"kws_l{i}_bias")
    conv = op == "conv"
    return NpuLayer(
        name=f"layer{i}", op=op, weight=weight, bias=None if bias is None else bias.astype(np.int64),
        stride=(d[f"{p}STRIDE_H"], d[f"{p}STRIDE_W"]) if conv else (1, 1),
        padding=(d[f"{p}PAD_H"], d[f"{p}PAD_W"]) if conv else (0, 0),
        groups=d[f"{p}GROUPS"] if conv else 1, offset=a[f"kws_l{i}_offset"].astype(np.int64),
        mult=a[f"kws_l{i}_mult"].astype(np.int64), shift=a[f"kws_l{i}_shift"].astype(np.int64),
        qmin=d[f"{p}QMIN"], qmax=d[f"{p}QMAX"], weight_bits=d.get(f"{p}WEIGHT_BITS"),
        float32_product=bool(d.get(f"{p}FLOAT32_PRODUCT", 0)))


def model_from_header(path: str | Path) -> NpuModel:
    """Rebuild the integer model from a C header (to run it with numpy_reference)."""
    h = read_header(path)
    d = h.defines
    steps = []
    for j in range(d["KWS_INPUT_N_STEPS"]):
        op = INPUT_STEPS[d[f"KWS_INPUT_STEP{j}_OP"]]
        value = d.get(f"KWS_INPUT_STEP{j}_VALUE")
        steps.append((op, None if value is None else np.array([value], np.float32)))
    stage = tinpu_onnx.InputStage(steps, d["KWS_INPUT_QMIN"], d["KWS_INPUT_QMAX"])
    layers = [_header_layer(h, i) for i in range(d["KWS_N_LAYERS"])]
    return NpuModel(stage, layers, (d["KWS_INPUT_C"], d["KWS_INPUT_H"], d["KWS_INPUT_W"]),
                    d.get("KWS_OUTPUT_SCALE", float("nan")), source=str(path))


# ----------------------------------------------------------------------------- integer models
def integer_onnx_files(net: nn.Module, val_x: torch.Tensor) -> dict[int, Path]:
    """int8/int4/int2 integer ONNX files: notebook 05's (QAT first), else PTQ-calibrated here."""
    out = {}
    for bits in quant.WEIGHT_BITS:
        found = [p for p in (quant.variant_onnx_path(bits, m) for m in ("qat", "ptq")) if p.is_file()]
        if found:
            out[bits] = found[0]
            print(f"int{bits}: using {found[0].name} from notebook 05")
            continue
        calib = quant.calibration_subset(val_x, config.profile().calib_clips)
        out[bits] = quant.export_integer(quant.ptq(net, bits, calib), quant.variant_onnx_path(bits, "ptq"))
        print(f"int{bits}: notebook 05 has not run; PTQ-calibrated here on {len(calib)} "
              f"validation clips -> {out[bits].name}")
    return out


# ----------------------------------------------------------------------------- budget
@dataclass
class Budget:
    """One deployment variant: memory, work and measured latency per inference."""

    variant: str
    weight_bytes: int        # weights as stored (packed for int4/int2)
    other_param_bytes: int   # biases (+ requantization offset/mult/shift for integer models)
    peak_activation_bytes: int
    macs: int
    latency_ms: float

    def row(self, hop_ms: int) -> tuple:
        """Table row including the real-time load at one decision every ``hop_ms``."""
        per_s = 1000 / hop_ms
        return (self.variant, self.weight_bytes, self.other_param_bytes,
                self.weight_bytes + self.other_param_bytes, self.peak_activation_bytes, self.macs,
                self.latency_ms, per_s, self.latency_ms * per_s / 10)


BUDGET_HEADERS = ["variant", "weights (B)", "bias+requant (B)", "params total (B)",
                  "peak activations (B)", "MACs", "latency (ms)", "inferences/s", "CPU load (%)"]


packed_weight_bytes = tinpu_onnx.packed_weight_bytes


def integer_param_bytes(source: str | Path | NpuModel) -> tuple[int, int]:
    """(packed weight bytes, bias + offset/mult/shift bytes) as laid out in the C header."""
    m = _as_model(source)
    sizes = {"uint8_t": 1, "int8_t": 1, "int16_t": 2, "int32_t": 4}
    # int32 bias (when separate) and offset, mult in its C type, uint8 shift per output channel
    other = sum(4 * (l.bias.size if l.bias is not None else 0) + 5 * l.offset.size
                + sizes[_int_ctype(l.mult)] * l.mult.size for l in m.layers)
    return packed_weight_bytes(m), other


def float_param_bytes(net: nn.Module) -> tuple[int, int]:
    """(float32 weight bytes, float32 bias bytes) of the conv/linear layers, BatchNorm folded in."""
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return 4 * sum(m.weight.numel() for m in layers), 4 * sum(m.weight.shape[0] for m in layers)


def peak_activation_values(net: nn.Module) -> int:
    """Largest input + output activation count of any layer (both buffers live at once)."""
    stats = [s for s in kws_model.layer_stats(net) if s.kind != "BatchNorm2d"]
    sizes = [int(np.prod(config.INPUT_SHAPE))] + [s.activations for s in stats]
    return max(a + b for a, b in zip(sizes, sizes[1:]))


def macs(net: nn.Module) -> int:
    """Multiply-accumulates per inference (from model.layer_stats)."""
    return sum(s.macs for s in kws_model.layer_stats(net))


def latency_ms(onnx_path: str | Path, runs: int = 200, warmup: int = 20) -> float:
    """Median onnxruntime wall time of one batch-1 inference on this machine (ms)."""
    for name, value, least in (("runs", runs, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise InputError(f"{name}={value!r}: give a whole number >= {least} (default "
                             f"{200 if name == 'runs' else 20}).")
    session = streaming.onnx_session(onnx_path)
    feed = {session.get_inputs()[0].name: np.zeros((1, *config.INPUT_SHAPE), np.float32)}
    times = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        session.run(None, feed)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def budget(net: nn.Module, float_onnx: str | Path, int_onnx: dict[int, Path],
           runs: int = 200) -> list[Budget]:
    """The budget of the float model and of each integer variant (latencies measured here)."""
    work, act = macs(net), peak_activation_values(net)
    rows = [Budget("float32", *float_param_bytes(net), 4 * act, work, latency_ms(float_onnx, runs))]
    for bits, path in sorted(int_onnx.items(), reverse=True):
        rows.append(Budget(f"int{bits} weights", *integer_param_bytes(load_integer_onnx(path)),
                           act, work, latency_ms(path, runs)))
    return rows
