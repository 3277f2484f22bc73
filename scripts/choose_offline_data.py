"""Choose the offline dataset's recipe on real speech that is not the test set.

Each candidate ``synthetic.Recipe`` generates a workshop-size offline dataset in a temporary folder;
notebook 03's model is trained on it with TI's recipe (the workshop profile's epochs and views) and
scored on the real calibration pool (``real_audio.pool_set``: real clips of speakers outside the
official test set). The official test set is never read. Two stages, both printed by notebook 03:

    python scripts/choose_offline_data.py          # about 15 min on 2 cores (3 candidates x 2 seeds)

scores espeak-ng-only candidates (takes of the 25 other words per speaker, speed perturbation) and
writes output/offline_data_choice.json: config.SYNTH_AUX_REPEATS and config.SYNTH_SPEED_RANGE are its
best mean pool keyword accuracy.

    python scripts/choose_offline_data.py --levers # every lever afresh: about 1.5 h on 2 cores, half of it
                                                    # rendering the four neural banks
    python scripts/choose_offline_data.py --levers --reuse   # only the levers not yet scored (a new
                                                    # neural bank takes about 6 min per seed)

scores that recipe beside levers (room reverberation, ``Recipe.reverb_share``; neural TTS voices,
``Recipe.tts_share`` / ``tts_voices`` / ``tts_other_words``, whose banks are kept in the course's data
root; SpecAugment-style time masks of the training views) the same way and writes
output/offline_data_levers.json: config.SYNTH_REVERB_SHARE, SYNTH_TTS_SHARE, SYNTH_TTS_OTHER_WORDS
and the profiles' tts_voices are its best mean pool keyword accuracy. Every entry names its whole
recipe, so the tables keep their meaning when the course's recipe changes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# (takes of each other word per speaker, slowest speed, fastest speed[, share of reverberant rooms,
#  share of neural voices[, other Recipe fields]])
CANDIDATES = {
    "2 takes of other words, no speed change (before)": (2, 1.0, 1.0),
    "1 take of other words": (1, 1.0, 1.0),
    "1 take of other words + speed 0.85-1.15": (1, 0.85, 1.15),
}
RECIPE_FIELDS = ("aux_repeats", "speed_min", "speed_max", "reverb_share", "tts_share")
# The first neural bank: 20 voices, each saying all 35 words.
BANK_20 = {"tts_voices": 20, "tts_other_words": 25}
LEVERS = {
    "espeak-ng only, dry rooms (1 take + speed 0.85-1.15)": (1, 0.85, 1.15, 0.0, 0.0),
    "+ neural TTS voices for a quarter of the training speakers": (1, 0.85, 1.15, 0.0, 0.25, BANK_20),
    "+ neural TTS voices for half the training speakers": (1, 0.85, 1.15, 0.0, 0.5, BANK_20),
    "+ neural TTS voices for 15 % of the training speakers": (1, 0.85, 1.15, 0.0, 0.15, BANK_20),
    "+ neural TTS voices for a quarter + reverberant rooms for half the speakers": (1, 0.85, 1.15, 0.5, 0.25, BANK_20),
    "+ neural TTS voices for a quarter + reverberant rooms for every speaker": (1, 0.85, 1.15, 1.0, 0.25, BANK_20),
    # The same rendering time spread over more voices: each says the keywords and 4 of the other words.
    "+ 50 neural voices (keywords + 4 other words each) for a quarter + rooms for half":
        (1, 0.85, 1.15, 0.5, 0.25, {"tts_voices": 50, "tts_other_words": 4}),
    "+ 50 neural voices (keywords + 4 other words each) for half + rooms for half":
        (1, 0.85, 1.15, 0.5, 0.5, {"tts_voices": 50, "tts_other_words": 4}),
    "+ 60 neural voices (keywords + 2 other words each) for a quarter + rooms for half":
        (1, 0.85, 1.15, 0.5, 0.25, {"tts_voices": 60, "tts_other_words": 2}),
    "+ 50 neural voices (keywords + 4 other words each) for 35 % + rooms for half":
        (1, 0.85, 1.15, 0.5, 0.35, {"tts_voices": 50, "tts_other_words": 4}),
    "+ 40 neural voices (keywords + 8 other words each) for a quarter + rooms for half":
        (1, 0.85, 1.15, 0.5, 0.25, {"tts_voices": 40, "tts_other_words": 8}),
    # Not a Recipe field: SpecAugment-style time masks of the training views (features.time_mask).
    "+ 50 neural voices (keywords + 4 other words) for a quarter + rooms for half + 2 time masks":
        (1, 0.85, 1.15, 0.5, 0.25, {"tts_voices": 50, "tts_other_words": 4, "time_masks": 2}),
    # Fewer other words per speaker: "unknown" is then a smaller share of the training clips.
    "+ 50 neural voices (keywords + 4 other words) for a quarter + rooms for half, 12 other words per speaker":
        (1, 0.85, 1.15, 0.5, 0.25, {"tts_voices": 50, "tts_other_words": 4, "aux_words": 12}),
    "+ 50 neural voices (keywords + 4 other words) for a quarter + rooms for half, 6 other words per speaker":
        (1, 0.85, 1.15, 0.5, 0.25, {"tts_voices": 50, "tts_other_words": 4, "aux_words": 6}),
}
# Seeds of the dataset and of the model's initial weights: one run moves by several points.
SEEDS = (0, 1)


def results_path(levers: bool = False) -> Path:
    """Where the comparison is saved (notebook 03 reads the choice, not the levers)."""
    from kws_utils import config
    return config.output_dir() / ("offline_data_levers.json" if levers else "offline_data_choice.json")


def score(root: Path, name: str, recipe: "synthetic.Recipe", seed: int, pool: tuple,
          bank_root: Path, time_masks: int = 0) -> dict:
    """Generate, train and score one candidate with one seed on the pool; its figures."""
    import torch

    from kws_utils import config, data, synthetic, training

    prof = config.profile()
    start = time.perf_counter()
    train, test = synthetic.ensure_synthetic(root / "train", root / "test", prof.synth_speakers,
                                             prof.synth_test_per_class, seed, recipe=recipe,
                                             bank_root=bank_root)
    generate_s = time.perf_counter() - start
    feats = training.prepare_features(data.DatasetInfo("synthetic", train, test, name),
                                      time_masks=time_masks)
    net, generator = training.seeded_model(seed)
    training.fit(net, feats.train_views, feats.train_y, feats.val_x, feats.val_y, prof.epochs,
                 prof.lr, prof.batch_size, generator)
    x, y = pool
    with torch.no_grad():
        pred = net.eval()(x).argmax(1)
    keyword = y < len(config.KEYWORDS)
    return {"seed": seed, "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "generate_s": round(generate_s, 1), "training_clips": len(feats.train_y),
            "synthetic_validation": round(training.evaluate(net, feats.val_x, feats.val_y).accuracy, 4),
            "pool_keywords": round(float((pred[keyword] == y[keyword]).float().mean()), 4),
            "pool_keywords_called_unknown": round(float((pred[keyword] == config.UNKNOWN_INDEX).float().mean()), 4),
            "pool_other_words": round(float((pred[~keyword] == y[~keyword]).float().mean()), 4)}


def candidate(values: tuple) -> tuple["synthetic.Recipe", dict, int]:
    """A CANDIDATES / LEVERS entry as (Recipe, the fields it sets, time masks of the training views)."""
    from kws_utils import synthetic

    values, extra = (values[:-1], dict(values[-1])) if isinstance(values[-1], dict) else (values, {})
    time_masks = extra.pop("time_masks", 0)
    # Fields an entry leaves out are espeak-ng only and dry rooms, whatever config.py now says.
    shares = dict(zip(("reverb_share", "tts_share"), values[3:5]))
    if shares.get("tts_share") and not {"tts_voices", "tts_other_words"} <= extra.keys():
        raise ValueError(f"lever {values}: name the neural bank's tts_voices and tts_other_words.")
    recipe = synthetic.Recipe(*values[:3], **{"reverb_share": 0.0, "tts_share": 0.0,
                                              "aux_words": len(synthetic.AUX_WORDS), **shares, **extra})
    # Only the fields a candidate sets: notebook 03 compares the choice's with the course's, and
    # --reuse compares them with an earlier run's.
    fields = dict(zip(RECIPE_FIELDS, values))
    if recipe.tts_share:
        fields["tts_voices"] = recipe.tts_voices
        if recipe.tts_other_words < len(synthetic.AUX_WORDS):   # all 25: recorded as before the option
            fields["tts_other_words"] = recipe.tts_other_words
    if recipe.aux_words < len(synthetic.AUX_WORDS):   # all 25: recorded as before the option
        fields["aux_words"] = recipe.aux_words
    if time_masks:
        fields["time_masks"] = time_masks
    return recipe, fields, time_masks


def earlier_runs(path: Path, name: str, recipe: dict) -> list[dict] | None:
    """A candidate's runs from an earlier results file, if it scored the same recipe on every seed."""
    try:
        earlier = json.loads(path.read_text())["candidates"][name]
    except (OSError, ValueError, KeyError):
        return None
    if earlier["recipe"] != recipe or [r["seed"] for r in earlier["runs"]] != list(SEEDS):
        return None
    return earlier["runs"]


def main(levers: bool = False, reuse: bool = False) -> None:
    """Score every candidate (or lever) in a temporary data folder and save the table atomically."""
    # The neural voice banks are kept in the course's data root: rendered once, reused by every run.
    bank_root = Path(os.environ.get("KWS_DATA_ROOT") or REPO / "data")
    with tempfile.TemporaryDirectory(prefix="kws_choose_") as tmp:
        # Set before the course is imported: datasets and feature caches go to the temp folder.
        os.environ.update(KWS_DATA_ROOT=tmp, KWS_PROFILE="workshop", KWS_DATASET="synthetic",
                          KWS_PROGRESS=os.environ.get("KWS_PROGRESS", "none"))
        sys.path.insert(0, str(REPO))
        from kws_utils import config, files, real_audio, synthetic

        pool = real_audio.pool_set()
        if pool is None:
            sys.exit("needs the real calibration pool (../shared/speech_commands/real_calibration_pool)")
        keyword = pool[1] < len(config.KEYWORDS)
        out = {"profile": config.profile().name, "speakers": config.profile().synth_speakers,
               "seeds": list(SEEDS), "trained_with": "TI's recipe (notebook 03), workshop profile",
               "scored_on": f"real calibration pool: {int(keyword.sum())} keyword clips and "
                            f"{int((~keyword).sum())} clips of other words, speakers outside the official "
                            "test set",
               "candidates": {}}
        for i, (name, values) in enumerate((LEVERS if levers else CANDIDATES).items()):
            recipe, fields, time_masks = candidate(values)
            runs = earlier_runs(results_path(levers), name, fields) if reuse else None
            if runs is not None:
                print(name, "reused from the earlier results file", flush=True)
                out["candidates"][name] = {"recipe": fields, "runs": runs}
                continue
            runs = []
            for seed in SEEDS:
                runs.append(score(Path(tmp) / f"candidate{i}_seed{seed}", name, recipe, seed, pool,
                                  bank_root, time_masks))
                print(name, json.dumps(runs[-1]), flush=True)
            out["candidates"][name] = {"recipe": fields, "runs": runs}
        files.write_text(results_path(levers), json.dumps(out, indent=1))
        print(f"wrote {results_path(levers)}")


if __name__ == "__main__":   # the dataset generator starts worker processes
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levers", action="store_true",
                        help="score levers not adopted yet (output/offline_data_levers.json)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the runs of candidates already in the results file with the same "
                             "recipe and seeds (each run records its date)")
    args = parser.parse_args()
    main(levers=args.levers, reuse=args.reuse)
