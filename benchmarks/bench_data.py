"""Benchmark of dataset preparation: synthetic generation, split building, clip loading."""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kws_utils import config, data, synthetic  # noqa: E402
from timing import timed  # noqa: E402

SPEAKERS = 20          # small: about 1,800 clips, a few seconds on 2 cores
TEST_PER_CLASS = 20
# espeak-ng's throughput: the neural voice bank is rendered once per seed, timed by bench_offline_real.py.
RECIPE = synthetic.Recipe(tts_share=0.0)


def run(speakers: int = SPEAKERS, workers: int = synthetic.WORKERS) -> dict:
    """Time generation, splitting and loading on a fresh small synthetic dataset."""
    with tempfile.TemporaryDirectory(prefix="kws_bench_") as tmp:
        root = Path(tmp)
        train, gen_s = timed(synthetic.generate_dataset, root / "train", speakers, config.SEED,
                             workers, RECIPE)
        test, test_s = timed(synthetic.generate_test_set, root / "test", speakers,
                             TEST_PER_CLASS, config.SEED, workers, RECIPE)
        info = data.DatasetInfo("synthetic", train, test, "benchmark")
        parts, split_s = timed(data.splits, info)
        clips = parts["train"]
        _, load_s = timed(data.load_clips, clips, "bench load")
        n_speech = synthetic.read_marker(train)["files"] - len(synthetic.NOISE_KINDS)
        return {
            "speakers": speakers, "workers": workers,
            "generated_clips": n_speech, "generate_s": round(gen_s, 3),
            "generate_clips_per_s": round(n_speech / gen_s, 1),
            "test_set_clips": 12 * TEST_PER_CLASS, "test_set_s": round(test_s, 3),
            "split_s": round(split_s, 4),
            "split_sizes": {name: len(items) for name, items in parts.items()},
            "loaded_clips": len(clips), "load_s": round(load_s, 3),
            "load_clips_per_s": round(len(clips) / load_s, 1),
        }


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
