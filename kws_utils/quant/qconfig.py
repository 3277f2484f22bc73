"""qconfig_type dictionaries (TI's format): defaults per bit width, validation, normalization."""
from __future__ import annotations

import copy

import torch

from kws_utils.errors import InputTypeError

WEIGHT_BITS = (8, 4, 2)
MULT_BITS = 8          # the NPU's requantization multiplier is an 8-bit unsigned integer
MAX_SHIFT = 31
FLOAT32_EXACT = 2 ** 24  # integers carried in float32 (ONNX Conv/Gemm) are exact below this

# Keys with TI's meaning (tinyml_torchmodelopt 1.4.0, base/fx/qconfig_types.py), plus the
# course's own observer names. TI 1.4.0 reads no 'histogram_range' key (it selects histogram
# observers with observer='histogram'), so the key is accepted and, as in TI, has no effect.
_WEIGHT_KEYS = {"bitwidth", "qscheme", "power2_scale", "quant_min", "quant_max", "range_max",
                "fixed_range", "observer", "dtype", "soft_quant", "mixed_precision",
                "histogram_range"}
_ACTIVATION_KEYS = {"bitwidth", "qscheme", "power2_scale", "quant_min", "quant_max", "range_max",
                    "fixed_range", "observer", "dtype", "soft_quant", "bias_calibration_factor",
                    "histogram_range"}
SOFT_QUANT = ("default", "soft_sigmoid", "soft_tanh", "dbq")
WEIGHT_OBSERVERS = ("default", "mse", "current_minmax")   # the last two: course options
ACTIVATION_QSCHEMES = (torch.per_tensor_symmetric, torch.per_tensor_affine)


def default_qconfig_type() -> dict:
    """TI NPU default: 8-bit per-channel symmetric weights, 8-bit activations, power-of-2 scales."""
    return qconfig_for(8)


def qconfig_for(weight_bits: int, power2_scale: bool | None = None,
                keep_8bit: tuple[str, ...] = ()) -> dict:
    """A plain qconfig_type dict for 8, 4 or 2-bit weights (power-of-2 weight scales only for 8 bits).

    ``keep_8bit``: layer names whose weights stay 8-bit (TI's ``mixed_precision``), e.g.
    ``model.EDGE_LAYERS``, the first and last layer.
    """
    if weight_bits not in WEIGHT_BITS:
        raise ValueError(f"weight_bits={weight_bits}: the TI NPU supports {WEIGHT_BITS}.")
    if power2_scale is not None and not isinstance(power2_scale, bool):
        raise InputTypeError(f"power2_scale={power2_scale!r}: give True, False or None (None: "
                             "power-of-2 scales for 8-bit weights only).")
    if not isinstance(keep_8bit, (tuple, list)) or not all(isinstance(n, str) for n in keep_8bit):
        raise InputTypeError(f"keep_8bit={keep_8bit!r}: give a tuple of layer names, e.g. "
                             "model.EDGE_LAYERS = ('conv1', 'fc6').")
    power2 = weight_bits == 8 if power2_scale is None else power2_scale
    qt = {
        "weight": {"bitwidth": weight_bits, "qscheme": torch.per_channel_symmetric,
                   "power2_scale": power2, "range_max": None, "fixed_range": False},
        "activation": {"bitwidth": 8, "qscheme": torch.per_tensor_symmetric,
                       "power2_scale": True, "range_max": None, "fixed_range": False},
    }
    if keep_8bit and weight_bits != 8:
        qt["weight"]["mixed_precision"] = {8: list(keep_8bit)}
    return qt


def ti_example_qconfig(weight_bits: int) -> dict:
    """TI's example settings per weight width (issue 9's "TI example" runs).

    From TI's TinyMLQConfigType (tinyml_torchmodelopt.common): w8 uses power-of-2 scales; w4
    uses no power-of-2 scales and soft-sigmoid rounding of weights and activations; w2 uses
    ternary 'dbq' weights and soft-tanh activations. Added as issue 9 lists them: below 8-bit
    weights, per-tensor affine activations with 'histogram_range' and bias calibration, and at
    w4 depthwise2/3 and pointwise2/3 kept at 8 bits (mixed_precision). The bias-calibration
    factor 0.01 is this function's choice. TI 1.4.0 reads no 'histogram_range' key, so it has no
    effect in either backend.
    """
    qt = qconfig_for(weight_bits)
    if weight_bits == 8:
        return qt
    soft_w, soft_a = ("soft_sigmoid", "soft_sigmoid") if weight_bits == 4 else ("dbq", "soft_tanh")
    qt["weight"].update(power2_scale=False, soft_quant=soft_w)
    qt["activation"].update(power2_scale=False, soft_quant=soft_a, qscheme=torch.per_tensor_affine,
                            histogram_range=True, bias_calibration_factor=0.01)
    if weight_bits == 4:
        qt["weight"]["mixed_precision"] = {8: ["depthwise2", "pointwise2", "depthwise3", "pointwise3"]}
    return qt


def with_affine_activations(qt: dict) -> dict:
    """A copy of ``qt`` with TI's example activation settings: per-tensor affine, scales not powers of 2."""
    qt = copy.deepcopy(qt)
    qt["activation"].update(power2_scale=False, qscheme=torch.per_tensor_affine)
    return qt


def _check_keys(part: dict, known: set, kind: str) -> None:
    """Reject keys this implementation does not know, naming them."""
    unknown = set(part) - known
    if unknown:
        raise ValueError(f"qconfig_type['{kind}'] has unknown keys {sorted(unknown)}; "
                         f"known: {sorted(known)}.")


def _weight_range(w: dict) -> None:
    """Fill in and check the weight quant range of its bit width (TI's default: symmetric)."""
    half = 2 ** (w["bitwidth"] - 1)
    for key in ("quant_min", "quant_max"):
        if w.get(key) is not None and (isinstance(w[key], bool) or not isinstance(w[key], int)):
            raise InputTypeError(f"qconfig_type['weight']['{key}']={w[key]!r}: give a whole number "
                                 f"(or None for the symmetric {w['bitwidth']}-bit range).")
    w["quant_min"] = -(half - 1) if w.get("quant_min") is None else w["quant_min"]
    w["quant_max"] = half - 1 if w.get("quant_max") is None else w["quant_max"]
    if not -half <= w["quant_min"] < 0 < w["quant_max"] <= half - 1:
        raise ValueError(f"weight quant range [{w['quant_min']}, {w['quant_max']}] does not fit "
                         f"{w['bitwidth']} bits [{-half}, {half - 1}].")


def _mixed_precision(w: dict) -> dict[int, list[str]]:
    """TI's per-layer weight widths {bits: [module names]}; only widths whose activations stay 8-bit."""
    mixed = w.get("mixed_precision") or {}
    if not isinstance(mixed, dict):
        raise ValueError("qconfig_type['weight']['mixed_precision'] must be a dict {bits: [module names]}.")
    for bits, names in mixed.items():
        # TI gives a mixed layer activations of the same width; the NPU's are 8-bit only.
        if bits != 8:
            raise NotImplementedError(f"mixed_precision width {bits}: TI would give those layers "
                                      f"{bits}-bit activations; kws_utils.quant supports 8 only.")
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"mixed_precision[{bits}] must be a list of module names.")
    return {int(b): list(n) for b, n in mixed.items()}


def normalize_qconfig_type(qconfig_type: dict | None) -> dict:
    """Validate a qconfig_type dict and fill in defaults (TI's meaning); raise on unsupported settings."""
    given = copy.deepcopy(qconfig_type) if qconfig_type is not None else default_qconfig_type()
    if not isinstance(given, dict) or set(given) - {"weight", "activation", "auto_quantization"}:
        raise ValueError("qconfig_type must be None or a dict {'weight': {...}, 'activation': {...}}.")
    if given.get("auto_quantization"):
        raise NotImplementedError("auto_quantization (TI's bit-width search) is not implemented in "
                                  "kws_utils.quant: give the bit widths, or use KWS_QUANT_BACKEND=ti.")
    defaults = default_qconfig_type()
    w = {**defaults["weight"], **given.get("weight", {})}
    a = {**defaults["activation"], **given.get("activation", {})}
    _check_keys(w, _WEIGHT_KEYS, "weight")
    _check_keys(a, _ACTIVATION_KEYS, "activation")
    if w["bitwidth"] not in WEIGHT_BITS:
        raise ValueError(f"weight bitwidth {w['bitwidth']} is not supported: use one of {WEIGHT_BITS}.")
    if a["bitwidth"] != 8:
        raise ValueError(f"activation bitwidth {a['bitwidth']} is not supported: the NPU uses 8.")
    if w["qscheme"] not in (torch.per_channel_symmetric, torch.per_tensor_symmetric):
        raise ValueError("weight qscheme must be torch.per_channel_symmetric or "
                         "torch.per_tensor_symmetric (the NPU has no weight zero points).")
    if a["qscheme"] not in ACTIVATION_QSCHEMES:
        raise ValueError("activation qscheme must be torch.per_tensor_symmetric or torch.per_tensor_affine.")
    if w["bitwidth"] == 8 and not w["power2_scale"]:
        raise ValueError("8-bit weights need power2_scale=True on the TI NPU.")
    _weight_range(w)
    if (a.get("quant_min"), a.get("quant_max")) not in ((None, None), (0, 255)):
        raise ValueError("activation quant_min/quant_max must be 0/255 (quint8, as TI stores them).")
    a["quant_min"], a["quant_max"] = 0, 255
    for part, kind in ((w, "weight"), (a, "activation")):
        part["soft_quant"] = part.get("soft_quant") or "default"
        if part["soft_quant"] not in SOFT_QUANT:
            raise ValueError(f"qconfig_type['{kind}']['soft_quant'] {part['soft_quant']!r}: use one of {SOFT_QUANT}.")
        if part.get("range_max") is not None and part["range_max"] <= 0:
            raise ValueError(f"qconfig_type['{kind}']['range_max'] must be None or > 0.")
    if a["soft_quant"] == "dbq":
        raise ValueError("soft_quant 'dbq' is a weight quantizer (ternary weights); not for activations.")
    w["observer"] = w.get("observer") or "default"
    if w["observer"] not in WEIGHT_OBSERVERS:
        raise NotImplementedError(f"weight observer {w['observer']!r}: kws_utils.quant has {WEIGHT_OBSERVERS}.")
    a["observer"] = a.get("observer") or "default"
    if a["observer"] != "default":
        raise NotImplementedError(f"activation observer {a['observer']!r}: kws_utils.quant has 'default' "
                                  "(moving-average min/max) only; use KWS_QUANT_BACKEND=ti for others.")
    a["bias_calibration_factor"] = float(a.get("bias_calibration_factor") or 0.0)
    w["mixed_precision"] = _mixed_precision(w)
    return {"weight": w, "activation": a}


def layer_qconfig_type(qt: dict, bits: int) -> dict:
    """The normalized qconfig of a mixed-precision layer: TI's dict with both bit widths set to ``bits``."""
    w = {**qt["weight"], "bitwidth": bits, "quant_min": None, "quant_max": None, "mixed_precision": {}}
    _weight_range(w)
    return {"weight": w, "activation": {**qt["activation"], "bitwidth": bits}}


def output_int_dtype(layer) -> torch.dtype:
    """The smallest integer dtype holding the layer's clamp range (int8 for signed logits)."""
    if layer.qmin >= -128 and layer.qmax <= 127:
        return torch.int8
    return torch.uint8 if layer.qmin >= 0 and layer.qmax <= 255 else torch.int16
