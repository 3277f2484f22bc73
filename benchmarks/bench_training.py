"""Training throughput from cached features: the course's loop against a plain eager PyTorch loop."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kws_utils import config, training  # noqa: E402
from kws_utils.model import DSCNN  # noqa: E402

N_SAMPLES = 6000   # one "epoch" of cached features; values do not change the compute
BATCH = 100        # the course's batch size (MLPerf reference: 100)


def cached_like_features(n: int = N_SAMPLES) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tensors shaped like the cached MFCC features and labels."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, *config.INPUT_SHAPE, generator=g), torch.randint(0, 12, (n,), generator=g)


def plain_epoch(x: torch.Tensor, y: torch.Tensor) -> float:
    """Samples/s of a textbook loop: DataLoader over a TensorDataset, default memory layout."""
    net = DSCNN().train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)
    start = time.perf_counter()
    for xb, yb in loader:
        opt.zero_grad()
        loss_fn(net(xb), yb).backward()
        opt.step()
    return len(x) / (time.perf_counter() - start)


def course_epoch(x: torch.Tensor, y: torch.Tensor) -> float:
    """Samples/s of training.train_epoch: tensor batches, channels_last, rand-mask dropout, cosine step."""
    net = DSCNN().to(memory_format=torch.channels_last)
    batches = training.Batches(x, y, BATCH, shuffle=True, generator=torch.Generator().manual_seed(0))
    opt, sched = training.make_optimizer(net, 0.01, 1, len(batches), per_batch_schedule=True)
    start = time.perf_counter()
    training.train_epoch(net, batches, opt, nn.CrossEntropyLoss(), sched, channels_last=True)
    return len(x) / (time.perf_counter() - start)


def loader_only(x: torch.Tensor, y: torch.Tensor) -> float:
    """Samples/s of the course's batching alone (shuffle + gather), no model."""
    batches = training.Batches(x, y, BATCH, shuffle=True, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for xb, yb in batches:
        xb.contiguous(memory_format=torch.channels_last)
    return len(x) / (time.perf_counter() - start)


def run(repeats: int = 5) -> dict:
    """Best-of-``repeats`` throughput of each loop, run alternately so they share machine load."""
    x, y = cached_like_features()
    course_epoch(x[:1000], y[:1000])  # warm up oneDNN kernels for both layouts
    plain_epoch(x[:1000], y[:1000])
    plain, course, loader = [], [], []
    for _ in range(repeats):
        plain.append(plain_epoch(x, y))
        course.append(course_epoch(x, y))
        loader.append(loader_only(x, y))
    best = {"plain_eager_samples_per_s": max(plain), "course_loop_samples_per_s": max(course),
            "loader_only_samples_per_s": max(loader)}
    best["course_over_plain"] = best["course_loop_samples_per_s"] / best["plain_eager_samples_per_s"]
    best["loader_over_training"] = best["loader_only_samples_per_s"] / best["course_loop_samples_per_s"]
    best.update(batch_size=BATCH, torch_threads=torch.get_num_threads(), torch_version=torch.__version__)
    return best


if __name__ == "__main__":
    import json
    print(json.dumps(run(), indent=2))
