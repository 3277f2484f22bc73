"""Model: the MLPerf Tiny reference DS-CNN and the arithmetic that describes it."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kws_utils import config


class DSCNN(nn.Module):
    """MLPerf Tiny DS-CNN: conv + 4 depthwise-separable blocks + average pool + linear."""

    def __init__(self, n_classes: int = len(config.LABELS), filters: int = 64) -> None:
        super().__init__()
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, n_classes) for MFCC input (N, 1, 49, 10)."""
        x = self.dropout1(self.relu1(self.bn1(self.conv1(x))))
        for i in range(2, 6):
            x = getattr(self, f"relu{i}1")(getattr(self, f"bn{i}1")(getattr(self, f"depthwise{i}")(x)))
            x = getattr(self, f"relu{i}2")(getattr(self, f"bn{i}2")(getattr(self, f"pointwise{i}")(x)))
        return self.fc6(self.flatten(self.avgpool(self.dropout2(x))))


def check_input(x: torch.Tensor) -> None:
    """Raise a clear error unless ``x`` is a batch of MFCC inputs shaped (N, 1, 49, 10)."""
    if x.dim() != 4 or tuple(x.shape[1:]) != config.INPUT_SHAPE:
        raise ValueError(f"DS-CNN input must be (N, {', '.join(map(str, config.INPUT_SHAPE))}) "
                         f"(batch, channel, frames, MFCC coefficients); got {tuple(x.shape)}. "
                         "Add the channel axis with x.unsqueeze(1) for (N, 49, 10) features.")


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict (or a {'model': state_dict} checkpoint), naming missing or extra keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found: train the model in notebook 03 "
                                "or point to the MLPerf reference weights.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    expected, given = set(model.state_dict()), set(state)
    missing, extra = sorted(expected - given), sorted(given - expected)
    if missing or extra:
        raise KeyError(f"checkpoint {path} does not fit {type(model).__name__}: "
                       f"missing keys {missing or 'none'}; unexpected keys {extra or 'none'}.")
    model.load_state_dict(state, strict=True)
    return model


def reference_model(path: str | Path | None = None) -> DSCNN:
    """The MLPerf reference DS-CNN with its published weights, in eval mode."""
    path = Path(path) if path is not None else config.mlperf_dir() / "kws_dscnn_pb2pth_checkpoint.pth"
    return load_checkpoint(DSCNN(), path).eval()
