"""The offline dataset's budget and its worth: time to generate it, and real-test-set accuracy of a model trained on it.

Issue 16's budget: generating the default-profile offline dataset takes at most 10 minutes on 2
cores. This script generates it from scratch in a temporary folder (nothing of output/ or data/ is
read or written), trains notebook 03's model on it with the profile's recipe (TI's), and scores that
model on the official Speech Commands test set. It needs ``../shared/speech_commands`` (or
KWS_TEST_DIR) for the score; without it, it reports the times only.

    KWS_PROFILE=default python benchmarks/bench_offline_real.py      # about 25 min on 2 cores
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from timing import timed  # noqa: E402


def run() -> dict:
    """Generate, featurize, train and score in a fresh data root; return the figures."""
    with tempfile.TemporaryDirectory(prefix="kws_offline_") as tmp:
        # Set before the course is imported: every path of the run then lies in the temp folder.
        os.environ.update(KWS_DATA_ROOT=str(Path(tmp) / "data"), KWS_OUTPUT=str(Path(tmp) / "out"),
                          KWS_DATASET="synthetic")
        from kws_utils import config, data, real_audio, training
        from kws_utils.model import DSCNN

        prof = config.profile()
        info, generate_s = timed(data.ensure_dataset)
        feats, features_s = timed(training.prepare_features, info)
        net = DSCNN()
        _, train_s = timed(training.fit, net, feats.train_views, feats.train_y, feats.val_x,
                           feats.val_y, prof.epochs, prof.lr, prof.batch_size, training.set_seed())
        figures = {
            "profile": prof.name, "speakers": prof.synth_speakers, "cores": os.cpu_count(),
            "generate_s": round(generate_s, 1), "budget_s": 600,
            "within_budget": generate_s <= 600,
            "training_clips": len(feats.train_y), "features_s": round(features_s, 1),
            "epochs": prof.epochs, "train_s": round(train_s, 1),
            "synthetic_test_accuracy": round(training.evaluate(net, feats.test_x, feats.test_y).accuracy, 4),
        }
        official = real_audio.test_set()
        if official is None:
            figures["official_test_accuracy"] = None
            print("official test set unavailable: reporting times only")
        else:
            figures["official_test_accuracy"] = round(training.evaluate(net, *official).accuracy, 4)
            figures["official_test_clips"] = len(official[1])
        return figures


if __name__ == "__main__":   # the dataset generator starts worker processes
    result = run()
    print(json.dumps(result, indent=1))
