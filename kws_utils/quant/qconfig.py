"""qconfig_type dictionaries (TI's format): defaults per bit width, validation, normalization."""
from __future__ import annotations

import copy

import torch

WEIGHT_BITS = (8, 4, 2)
MULT_BITS = 8          # the NPU's requantization multiplier is an 8-bit unsigned integer
MAX_SHIFT = 31
FLOAT32_EXACT = 2 ** 24  # integers carried in float32 (ONNX Conv/Gemm) are exact below this

_KNOWN_KEYS = {"bitwidth", "qscheme", "power2_scale", "quant_min", "quant_max", "range_max",
               "fixed_range", "observer", "dtype"}


def default_qconfig_type() -> dict:
    """TI NPU default: 8-bit per-channel symmetric weights, 8-bit activations, power-of-2 scales."""
    return qconfig_for(8)


def qconfig_for(weight_bits: int, power2_scale: bool | None = None) -> dict:
    """A qconfig_type dict for 8, 4 or 2-bit weights (power-of-2 weight scales only for 8 bits)."""
    if weight_bits not in WEIGHT_BITS:
        raise ValueError(f"weight_bits={weight_bits}: the TI NPU supports {WEIGHT_BITS}.")
    power2 = weight_bits == 8 if power2_scale is None else power2_scale
    return {
        "weight": {"bitwidth": weight_bits, "qscheme": torch.per_channel_symmetric,
                   "power2_scale": power2, "range_max": None, "fixed_range": False},
        "activation": {"bitwidth": 8, "qscheme": torch.per_tensor_symmetric,
                       "power2_scale": True, "range_max": None, "fixed_range": False},
    }


def _check_part(part: dict, kind: str) -> None:
    """Reject keys and values this implementation cannot honour, with the reason."""
    unknown = set(part) - _KNOWN_KEYS
    if unknown:
        raise ValueError(f"qconfig_type['{kind}'] has unknown keys {sorted(unknown)}; "
                         f"known: {sorted(_KNOWN_KEYS)}.")
    if part.get("range_max") is not None or part.get("fixed_range"):
        raise NotImplementedError(f"qconfig_type['{kind}']: range_max/fixed_range are not "
                                  "implemented in kws_utils.quant; leave them None/False.")


def normalize_qconfig_type(qconfig_type: dict | None) -> dict:
    """Validate a qconfig_type dict and fill in defaults; raise on unsupported settings."""
    given = copy.deepcopy(qconfig_type) if qconfig_type is not None else default_qconfig_type()
    if not isinstance(given, dict) or set(given) - {"weight", "activation"}:
        raise ValueError("qconfig_type must be None or a dict {'weight': {...}, 'activation': {...}}.")
    w = {**default_qconfig_type()["weight"], **given.get("weight", {})}
    a = {**default_qconfig_type()["activation"], **given.get("activation", {})}
    _check_part(w, "weight")
    _check_part(a, "activation")
    if w["bitwidth"] not in WEIGHT_BITS:
        raise ValueError(f"weight bitwidth {w['bitwidth']} is not supported: use one of {WEIGHT_BITS}.")
    if a["bitwidth"] != 8:
        raise ValueError(f"activation bitwidth {a['bitwidth']} is not supported: the NPU uses 8.")
    if w["qscheme"] not in (torch.per_channel_symmetric, torch.per_tensor_symmetric):
        raise ValueError("weight qscheme must be torch.per_channel_symmetric or "
                         "torch.per_tensor_symmetric (the NPU has no weight zero points).")
    if a["qscheme"] != torch.per_tensor_symmetric:
        raise ValueError("activation qscheme must be torch.per_tensor_symmetric.")
    if w["bitwidth"] == 8 and not w["power2_scale"]:
        raise ValueError("8-bit weights need power2_scale=True on the TI NPU.")
    half = 2 ** (w["bitwidth"] - 1)
    w.setdefault("quant_min", None)
    w.setdefault("quant_max", None)
    w["quant_min"] = -(half - 1) if w["quant_min"] is None else w["quant_min"]
    w["quant_max"] = half - 1 if w["quant_max"] is None else w["quant_max"]
    if not -half <= w["quant_min"] < 0 < w["quant_max"] <= half - 1:
        raise ValueError(f"weight quant range [{w['quant_min']}, {w['quant_max']}] does not fit "
                         f"{w['bitwidth']} bits [{-half}, {half - 1}].")
    if (a.get("quant_min"), a.get("quant_max")) not in ((None, None), (0, 255)):
        raise ValueError("activation quant_min/quant_max must be 0/255 (quint8, as TI stores them).")
    a["quant_min"], a["quant_max"] = 0, 255
    w["observer"] = w.get("observer") or ("minmax" if w["bitwidth"] == 8 else "mse")
    if w["observer"] not in ("minmax", "mse"):
        raise ValueError(f"weight observer {w['observer']!r}: use 'minmax' or 'mse'.")
    return {"weight": w, "activation": a}



def output_int_dtype(layer) -> torch.dtype:
    """The smallest integer dtype holding the layer's clamp range (int8 for signed logits)."""
    if layer.qmin >= -128 and layer.qmax <= 127:
        return torch.int8
    return torch.uint8 if layer.qmin >= 0 and layer.qmax <= 255 else torch.int16
