"""Notebook 07's four models with other seeds: is the pool's choice, and its official-test figure, one seed's luck?

Trains the model on every training clip and on the realism-filtered clips (TI's recipe, the active
profile's settings) for each seed, applies the prior correction to both, and prints the pool's mean recall
over its 11 classes (what notebook 07 chooses on) and the official test accuracy (scoring only).

    KWS_PROFILE=default python scripts/notebook07_seeds.py --seeds 1 2    # about 9 min on 2 cores
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from kws_utils import config, data, model, real_audio, training  # noqa: E402


def pool_mean_recall(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean recall over the classes the pool holds (notebook 07's choice column)."""
    recall = training.per_class_accuracy(training.confusion_matrix(training.evaluate(net, x, y).preds, y))
    return recall[torch.bincount(y, minlength=len(config.LABELS)) > 0].mean().item()


def main(seeds: list[int]) -> None:
    """Print notebook 07's four rows for every seed."""
    prof, info = config.profile(), data.ensure_dataset()
    feats = training.prepare_features(info)
    pool, official = real_audio.pool_set(), real_audio.test_set()
    if pool is None or official is None:
        sys.exit("needs the real calibration pool and the official test set (../shared/speech_commands)")
    keep = training.recognised_by(model.reference_model(), training.clean_train_features(info), feats.train_y)
    for seed in seeds:
        for name, mask in (("every clip", torch.ones_like(keep)), ("realism-filtered", keep)):
            net, generator = training.seeded_model(seed)
            training.fit(net, [v[mask] for v in feats.train_views], feats.train_y[mask], feats.val_x,
                         feats.val_y, prof.epochs, prof.lr, prof.batch_size, generator)
            for label, m in ((name, net), (f"{name} + prior correction", model.prior_corrected(net, feats.train_y[mask]))):
                print(f"seed {seed}, {label}: pool mean recall {pool_mean_recall(m, *pool):.1%}, "
                      f"official test {training.evaluate(m, *official).accuracy:.2%}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    main(parser.parse_args().seeds)
