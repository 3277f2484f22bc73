"""The offline dataset's budget and its worth: time to generate it, and real-test-set accuracy of a model trained on it.

Issue 16's budget: generating the default-profile offline dataset takes at most 10 minutes on 2
cores. This script generates it from scratch in a temporary folder (nothing of output/ or data/ is
read or written), trains notebook 03's model on it with the profile's recipe (TI's), and scores that
model on the official Speech Commands test set; with the MLPerf reference weights it also applies
notebook 07's realism filter and prior correction and scores those models. It needs ``../shared/speech_commands`` (or
KWS_TEST_DIR) for the score; without it, it reports the times only.

    KWS_PROFILE=default python benchmarks/bench_offline_real.py      # about 25 min on 2 cores
    KWS_PROFILE=default python benchmarks/bench_offline_real.py --tts-share 0.25 --reverb-share 0.5
                                            # levers not adopted yet (config.py), about 35 min
    ... --tts-share 0.25 --reverb-share 0.5 --tts-voices 50 --tts-other-words 4
                                            # 50 voices, each saying the keywords + 4 other words

The neural voice bank (``--tts-share`` > 0) is rendered afresh too: its time counts in the budget.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from timing import timed  # noqa: E402


def run(tts_share: float | None = None, reverb_share: float | None = None,
        tts_voices: int | None = None, tts_other_words: int | None = None) -> dict:
    """Generate, featurize, train and score in a fresh data root; return the figures."""
    with tempfile.TemporaryDirectory(prefix="kws_offline_") as tmp:
        # Set before the course is imported: every path of the run then lies in the temp folder.
        os.environ.update(KWS_DATA_ROOT=str(Path(tmp) / "data"), KWS_OUTPUT=str(Path(tmp) / "out"),
                          KWS_DATASET="synthetic")
        from kws_utils import config, data, mlperf, real_audio, synthetic, training

        prof = config.profile()
        share = config.SYNTH_TTS_SHARE if tts_share is None else tts_share
        reverb = config.SYNTH_REVERB_SHARE if reverb_share is None else reverb_share
        voices = prof.tts_voices if tts_voices is None else tts_voices
        other = config.SYNTH_TTS_OTHER_WORDS if tts_other_words is None else tts_other_words
        recipe = synthetic.Recipe(reverb_share=reverb, tts_share=share, tts_voices=voices,
                                  tts_other_words=other)
        dirs, generate_s = timed(synthetic.ensure_synthetic, config.synthetic_data_dir(),
                                 config.synthetic_test_dir(), prof.synth_speakers,
                                 prof.synth_test_per_class, config.SEED, recipe=recipe)
        info = data.DatasetInfo("synthetic", *dirs, f"offline dataset, neural voices {share}, rooms {reverb}")
        feats, features_s = timed(training.prepare_features, info)
        net, generator = training.seeded_model()
        _, train_s = timed(training.fit, net, feats.train_views, feats.train_y, feats.val_x,
                           feats.val_y, prof.epochs, prof.lr, prof.batch_size, generator)
        figures = {
            "profile": prof.name, "speakers": prof.synth_speakers, "cores": os.cpu_count(),
            "tts_share": share, "tts_voices": voices if share else 0,
            "tts_other_words": other if share else 0, "reverb_share": reverb,
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
            return figures
        figures["official_test_accuracy"] = round(training.evaluate(net, *official).accuracy, 4)
        figures["official_test_clips"] = len(official[1])
        if mlperf.available():
            figures.update(notebook07(net, info, feats, official))
        return figures


def notebook07(net: "torch.nn.Module", info: "data.DatasetInfo", feats: "training.FeatureSets",
               official: tuple) -> dict:
    """Notebook 07's two steps on the same dataset: realism filter, prior correction; official-test figures."""
    from kws_utils import config, model, training

    prof = config.profile()
    keep, filter_s = timed(lambda: training.recognised_by(model.reference_model(),
                                                          training.clean_train_features(info), feats.train_y))
    filtered, generator = training.seeded_model()
    _, train_s = timed(training.fit, filtered, [v[keep] for v in feats.train_views], feats.train_y[keep],
                       feats.val_x, feats.val_y, prof.epochs, prof.lr, prof.batch_size, generator)
    scored = {"prior_corrected": model.prior_corrected(net, feats.train_y), "filtered": filtered,
              "filtered_prior_corrected": model.prior_corrected(filtered, feats.train_y[keep])}
    return {"realism_filter_kept": int(keep.sum()), "realism_filter_s": round(filter_s, 1),
            "filtered_train_s": round(train_s, 1),
            **{f"official_test_accuracy_{name}": round(training.evaluate(m, *official).accuracy, 4)
               for name, m in scored.items()},
            **{f"synthetic_test_accuracy_{name}": round(training.evaluate(m, feats.test_x, feats.test_y).accuracy, 4)
               for name, m in scored.items()}}


if __name__ == "__main__":   # the dataset generator starts worker processes
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tts-share", type=float, default=None,
                        help="share of training speakers voiced by the neural TTS bank "
                             "(default: the course's, config.SYNTH_TTS_SHARE)")
    parser.add_argument("--reverb-share", type=float, default=None,
                        help="share of speakers recorded in a reverberant room "
                             "(default: the course's, config.SYNTH_REVERB_SHARE)")
    parser.add_argument("--tts-voices", type=int, default=None,
                        help="neural voices in the bank (default: the profile's tts_voices)")
    parser.add_argument("--tts-other-words", type=int, default=None,
                        help="of the 25 other words, how many each neural voice says "
                             "(default: config.SYNTH_TTS_OTHER_WORDS)")
    args = parser.parse_args()
    # Where to save, read before run() points KWS_OUTPUT at its temporary folder.
    out_dir = Path(os.environ.get("KWS_OUTPUT") or Path(__file__).resolve().parent.parent / "output")
    result = run(args.tts_share, args.reverb_share, args.tts_voices, args.tts_other_words)
    print(json.dumps(result, indent=1))
    from kws_utils import files
    levers = "" if args.tts_share is None and args.reverb_share is None else \
        f"_tts{result['tts_share']}_reverb{result['reverb_share']}"
    if args.tts_voices is not None or args.tts_other_words is not None:
        levers += f"_voices{result['tts_voices']}x{result['tts_other_words']}"
    target = out_dir / f"bench_offline_real_{result['profile']}{levers}.json"
    files.write_text(target, json.dumps(result, indent=1))
    print(f"written to {target}")
