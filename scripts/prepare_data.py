"""Make everything the notebooks read before a session: the dataset, the feature caches, real audio.

For workshops: run it the evening before, on the machines the class will use, so that no notebook
spends its minutes generating speech or computing MFCC.

    KWS_PROFILE=workshop python scripts/prepare_data.py
    python scripts/prepare_data.py            # the default profile

It resolves the dataset as the notebooks do (KWS_DATASET), builds its feature cache, and computes
the MFCC of the official test set and of the real calibration clips when they are on this machine.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kws_utils import config, data, real_audio, training  # noqa: E402


def main() -> None:
    """Prepare the active profile's data and print what is ready."""
    start = time.perf_counter()
    info = data.ensure_dataset()
    print(data.banner(info))
    feats = training.prepare_features(info)
    print(f"features ({config.profile().name} profile): {len(feats.train_y)} training, "
          f"{len(feats.val_y)} validation, {len(feats.test_y)} test clips")
    training.clean_train_features(info)   # notebook 07's realism filter reads them
    official = real_audio.test_set()
    print(f"{real_audio.describe_test()}: {len(official[1])} clips" if official is not None
          else "official test set: not available (see the line above)")
    pool = real_audio.pool_set()
    print(f"real calibration clips: {len(pool[1])}" if pool is not None else "real calibration clips: none")
    print(f"ready in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":   # the dataset generator starts worker processes
    main()
