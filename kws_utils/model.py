"""Model: the MLPerf Tiny reference DS-CNN and the arithmetic that describes it."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kws_utils import config, files, mlperf
from kws_utils.errors import FileFormatError, InputError, InputTypeError, MissingFileError


# The first and last layer, which low-bit quantization commonly keeps at 8 bits (quant.qconfig_for's
# keep_8bit). Both are small: 3,328 of the DS-CNN's 22,016 weights.
EDGE_LAYERS = ("conv1", "fc6")
# The four 3x3 depthwise layers: 2,304 weights, each applied at every time-frequency position. At int2,
# keeping them 8-bit too lifted held-out pool accuracy on every calibration subset
# (benchmarks/bench_int2_mixed.py).
DEPTHWISE_LAYERS = tuple(f"depthwise{i}" for i in range(2, 6))
# The mixed-precision choices the scripts' --keep-8bit options name: which layers keep 8-bit weights.
KEEP_8BIT = {"none": (), "edges": EDGE_LAYERS, "edges_dw": EDGE_LAYERS + DEPTHWISE_LAYERS}


class DSCNN(nn.Module):
    """MLPerf Tiny DS-CNN: conv + 4 depthwise-separable blocks + average pool + linear."""

    def __init__(self, n_classes: int = len(config.LABELS), filters: int = 64) -> None:
        super().__init__()
        for name, value in (("n_classes", n_classes), ("filters", filters)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name}={value!r}: give a whole number >= 1 (the course's DS-CNN "
                                 f"has n_classes={len(config.LABELS)}, filters=64).")
        self.conv1 = nn.Conv2d(1, filters, kernel_size=(10, 4), stride=(2, 2), padding=(5, 1))
        self.bn1 = nn.BatchNorm2d(filters)
        self.relu1 = nn.ReLU()
        self.dropout1 = nn.Dropout(0.2)
        # Attribute names follow the reference checkpoint, so it loads with strict=True.
        for i in range(2, 6):
            setattr(self, f"depthwise{i}", nn.Conv2d(filters, filters, 3, padding=1, groups=filters))
            setattr(self, f"bn{i}1", nn.BatchNorm2d(filters))
            setattr(self, f"relu{i}1", nn.ReLU())
            setattr(self, f"pointwise{i}", nn.Conv2d(filters, filters, 1))
            setattr(self, f"bn{i}2", nn.BatchNorm2d(filters))
            setattr(self, f"relu{i}2", nn.ReLU())
        self.dropout2 = nn.Dropout(0.4)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc6 = nn.Linear(filters, n_classes)
        # A pre-hook rather than a check in forward(): FX tracing for quantization calls forward()
        # directly, where a data-dependent shape test could not be traced.
        self.register_forward_pre_hook(_check_call, with_kwargs=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, n_classes) for MFCC input (N, 1, 49, 10)."""
        x = self.dropout1(self.relu1(self.bn1(self.conv1(x))))
        for i in range(2, 6):
            x = getattr(self, f"relu{i}1")(getattr(self, f"bn{i}1")(getattr(self, f"depthwise{i}")(x)))
            x = getattr(self, f"relu{i}2")(getattr(self, f"bn{i}2")(getattr(self, f"pointwise{i}")(x)))
        return self.fc6(self.flatten(self.avgpool(self.dropout2(x))))


def prior_log_ratio(train_y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """log(n x p(c)) per class: what a softmax trained on ``train_y``'s class mix adds to each logit."""
    if (not isinstance(train_y, torch.Tensor) or train_y.dtype.is_floating_point or train_y.ndim != 1
            or len(train_y) == 0 or train_y.min() < 0 or train_y.max() >= n_classes):
        raise InputError(f"train_y must be the 1-D tensor of class indices 0..{n_classes - 1} the model was "
                         "trained on (e.g. feats.train_y).")
    counts = torch.bincount(train_y, minlength=n_classes)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise InputError(f"train_y holds no clip of class {missing}: give the labels of the whole training "
                         "split, so that every class has a prior.")
    return torch.log(counts.double() / counts.sum() * n_classes).float()


def prior_corrected(net: nn.Module, train_y: torch.Tensor) -> nn.Module:
    """A copy of ``net`` whose classifier bias expects balanced classes, not the training split's mix."""
    fc = getattr(net, "fc6", None)
    if not isinstance(fc, nn.Linear):
        raise InputTypeError(f"net must be a DS-CNN whose classifier is `fc6` (model.DSCNN), got "
                             f"{type(net).__name__}.")
    ratio = prior_log_ratio(train_y, fc.out_features)
    out = copy.deepcopy(net)
    with torch.no_grad():
        # A softmax trained on prior p(c) adds log p(c) to each logit; a balanced test set has 1/n.
        out.fc6.bias -= ratio.to(out.fc6.bias.dtype)
    return out


def check_input(x: torch.Tensor) -> None:
    """Raise a clear error unless ``x`` is a batch of MFCC inputs shaped (N, 1, 49, 10)."""
    if not isinstance(x, torch.Tensor):
        raise InputTypeError(f"DS-CNN input must be a torch.Tensor (N, 1, 49, 10), got "
                             f"{type(x).__name__}; convert with torch.as_tensor(x, dtype=torch.float32).")
    if not x.is_floating_point():
        raise InputTypeError(f"DS-CNN input must hold float MFCC values, got dtype {x.dtype}; "
                             "convert with x.float().")
    if x.dim() != 4 or tuple(x.shape[1:]) != config.INPUT_SHAPE:
        raise InputError(f"DS-CNN input must be (N, {', '.join(map(str, config.INPUT_SHAPE))}) "
                         f"(batch, channel, frames, MFCC coefficients); got {tuple(x.shape)}. "
                         "Add the channel axis with x.unsqueeze(1) for (N, 49, 10) features.")


def _check_call(_module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: validate the model input (given as net(x) or net(x=x)) before any layer runs."""
    if len(args) + len(kwargs) != 1 or (kwargs and "x" not in kwargs):
        raise InputError(f"DS-CNN input: call the model with one input batch, net(x), x shaped "
                         f"(N, 1, 49, 10); got {len(args)} positional and keywords {sorted(kwargs)}.")
    check_input(args[0] if args else kwargs["x"])


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict (or a {'model': state_dict} checkpoint), naming missing or extra keys."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} not found: train the model in notebook 03 "
                               "or point to the MLPerf reference weights.")
    state = _state_dict_of(files.load_torch(path, "checkpoint"))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in
                                              state.get("model", state).values()):
        raise FileFormatError(f"checkpoint {path} holds no state dict of tensors: save one with "
                              "training.save_checkpoint or torch.save(model.state_dict(), path).")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    expected, given = set(model.state_dict()), set(state)
    missing, extra = sorted(expected - given), sorted(given - expected)
    if missing or extra:
        raise KeyError(f"checkpoint {path} does not fit {type(model).__name__}: "
                       f"missing keys {missing or 'none'}; unexpected keys {extra or 'none'}.")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FileFormatError(f"checkpoint {path} holds NaN or infinite values in {bad[:3]}: the "
                              "training that saved it diverged. Train again (a smaller learning "
                              "rate) or load another checkpoint.")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise FileFormatError(f"checkpoint {path} does not fit {type(model).__name__} (tensor "
                              f"shapes differ: {str(err).splitlines()[-1].strip()}). Load it into "
                              "the model it was saved from.") from None
    return model


def _state_dict_of(obj: object) -> object:
    """The state dict inside common checkpoint layouts: {'model'|'state_dict': ...}, 'module.' keys."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}   # saved from nn.DataParallel
    return obj


def reference_model(path: str | Path | None = None) -> DSCNN:
    """The MLPerf reference DS-CNN with its published weights (local copy or download), eval mode."""
    if path is None:
        path = mlperf.checkpoint_path()
    path = Path(path)
    return load_checkpoint(DSCNN(), path).eval()


@dataclass
class LayerStats:
    """One layer's output shape, parameter count, multiply-accumulates and output activations."""

    name: str
    kind: str
    out_shape: tuple[int, ...]
    params: int
    macs: int
    activations: int


def _macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    """Multiply-accumulates of one Conv2d/Linear/pool call (batch of one)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return out.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return inp.numel()  # one accumulate per input value
    return 0


COUNTED = (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d, nn.Linear)


def layer_stats(model: nn.Module, input_shape: tuple[int, ...] = config.INPUT_SHAPE) -> list[LayerStats]:
    """Measure every conv, batch-norm, pool and linear layer by running one input through it."""
    rows: list[LayerStats] = []

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            params = sum(p.numel() for p in module.parameters(recurse=False))
            rows.append(LayerStats(name, type(module).__name__, tuple(out.shape[1:]), params,
                                   _macs(module, inputs[0], out), out.numel()))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, COUNTED)]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return rows


def receptive_field(model: nn.Module) -> tuple[int, int]:
    """Input (frames, coefficients) seen by one output position of the last convolution."""
    field, jump = [1, 1], [1, 1]
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            for axis in (0, 1):
                field[axis] += (module.kernel_size[axis] - 1) * jump[axis]
                jump[axis] *= module.stride[axis]
    return field[0], field[1]


def separable_vs_plain(channels: int = 64, kernel: int = 3, height: int = 25, width: int = 5) -> dict[str, dict[str, int]]:
    """Parameters and MACs of one depthwise-separable block against a plain conv of the same shape."""
    positions = height * width
    depthwise = {"params": channels * kernel * kernel + channels,
                 "macs": positions * channels * kernel * kernel}
    pointwise = {"params": channels * channels + channels, "macs": positions * channels * channels}
    plain = {"params": channels * channels * kernel * kernel + channels,
             "macs": positions * channels * channels * kernel * kernel}
    separable = {k: depthwise[k] + pointwise[k] for k in depthwise}
    return {"depthwise": depthwise, "pointwise": pointwise, "separable": separable, "plain": plain}
