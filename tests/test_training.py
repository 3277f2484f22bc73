"""Training: batching, the float loop, evaluation, checkpoints and the feature cache."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from kws_utils import config, data, features, model, training
from kws_utils.errors import InputError


def toy_problem(n: int = 600) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs whose class sets their mean level (global pooling keeps levels): easy to learn."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, len(config.LABELS), (n,), generator=g)
    x = torch.randn(n, *config.INPUT_SHAPE, generator=g) * 0.3
    x += (y.float() - 5.5).view(-1, 1, 1, 1)
    return x, y


def test_batches_cover_every_sample_once() -> None:
    x, y = torch.arange(10.0), torch.arange(10)
    plain = torch.cat([xb for xb, _ in training.Batches(x, y, 3)])
    shuffled = torch.cat([xb for xb, _ in training.Batches(x, y, 3, shuffle=True,
                                                           generator=torch.Generator().manual_seed(1))])
    assert torch.equal(plain, x) and len(training.Batches(x, y, 3)) == 4
    assert not torch.equal(shuffled, x) and torch.equal(shuffled.sort().values, x)


def test_batches_follow_a_weighted_sampler() -> None:
    y = torch.tensor([0] * 90 + [1] * 10)
    sampler = torch.utils.data.WeightedRandomSampler(torch.where(y == 0, 1 / 90, 1 / 10).double(), 1000,
                                                     generator=torch.Generator().manual_seed(0))
    drawn = torch.cat([yb for _, yb in training.Batches(y.float(), y, 100, sampler=sampler)])
    assert len(drawn) == 1000 and 0.4 < drawn.float().mean() < 0.6


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="pair one to one"):
        training.Batches(torch.zeros(3), torch.zeros(4), 2)


def test_rand_dropout_keeps_one_minus_p_and_rescales() -> None:
    torch.manual_seed(0)
    drop = training.RandDropout(0.4).train()
    out = drop(torch.ones(200_000))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.6) < 0.005
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.6))
    x = torch.randn(10)
    assert torch.equal(drop.eval()(x), x)


def test_rand_dropout_gradient_flows_through_kept_elements_only() -> None:
    torch.manual_seed(1)
    x = torch.ones(1000, requires_grad=True)
    out = training.RandDropout(0.2).train()(x)
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())


def test_faster_dropout_swaps_and_restores_every_dropout() -> None:
    net = model.DSCNN()
    originals = [m for m in net.modules() if isinstance(m, torch.nn.Dropout)]
    with training.faster_dropout(net):
        swapped = [m for m in net.modules() if isinstance(m, training.RandDropout)]
        assert [m.p for m in swapped] == [m.p for m in originals] == [0.2, 0.4]
        assert not any(isinstance(m, torch.nn.Dropout) for m in net.modules())
    assert [m for m in net.modules() if isinstance(m, torch.nn.Dropout)] == originals


def test_fit_learns_and_anneals_the_learning_rate() -> None:
    x, y = toy_problem()
    net = model.DSCNN()
    history = training.fit(net, [x], y, x[:200], y[:200], epochs=4, lr=0.05, batch_size=50,
                           generator=training.set_seed(0))
    assert history.train_loss[-1] < history.train_loss[0]
    assert history.val_acc[-1] > 0.3                     # chance is 1/12
    assert history.lr[0] == 0.05 and history.lr[-1] < history.lr[1] < history.lr[0]


def test_fit_is_reproducible() -> None:
    x, y = toy_problem(200)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        net = model.DSCNN()
        training.fit(net, [x], y, x, y, epochs=1, lr=0.05, batch_size=50, generator=training.set_seed(3))
        runs.append(net.fc6.weight.detach().clone())
    assert torch.equal(runs[0], runs[1])


def test_evaluate_and_confusion_matrix() -> None:
    x, y = toy_problem(100)
    result = training.evaluate(model.DSCNN(), x, y)
    cm = training.confusion_matrix(result.preds, result.labels)
    assert cm.sum() == 100 and cm.diag().sum() == (result.preds == y).sum()
    assert result.accuracy == pytest.approx((result.preds == y).float().mean().item())
    assert training.per_class_accuracy(cm).shape == (len(config.LABELS),)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    net = model.DSCNN().to(memory_format=torch.channels_last)
    path = tmp_path / "float.pth"
    training.save_checkpoint(net, path, epochs=1, source="synthetic")
    loaded = model.load_checkpoint(model.DSCNN(), path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))
    assert not path.with_suffix(".tmp").exists()


def test_prepare_features_caches_and_augments(tiny_dataset: data.DatasetInfo, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KWS_DATA_ROOT", str(tmp_path))
    feats = training.prepare_features(tiny_dataset, views=2)
    splits = data.splits(tiny_dataset)
    assert feats.source == "synthetic"
    assert feats.val_x.shape == (len(splits["validation"]), *config.INPUT_SHAPE)
    assert feats.test_y.tolist() == [c.label for c in splits["test"]]
    clean_val = features.compute_features(data.load_clips(splits["validation"]))
    assert torch.equal(feats.val_x, clean_val)
    assert not torch.equal(feats.train_views[0], feats.train_views[1])   # two different augmentations
    cached = list((tmp_path / "feature_cache").rglob("*.pt"))
    assert len(cached) == 4
    again = training.prepare_features(tiny_dataset, views=2)
    assert torch.equal(again.train_views[1], feats.train_views[1])


def test_float_model_loads_the_saved_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KWS_OUTPUT", str(tmp_path))
    net = model.DSCNN()
    training.save_checkpoint(net, training.float_checkpoint_path("synthetic"), epochs=10)
    x, y = toy_problem(20)
    feats = training.FeatureSets("synthetic", [x], y, x, y, x, y)
    loaded = training.float_model(feats)
    assert torch.equal(loaded.fc6.weight, net.fc6.weight)


def test_float_model_fallback_is_loud_and_saved_under_its_own_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("KWS_OUTPUT", str(tmp_path))
    monkeypatch.setattr(training, "SHORT_EPOCHS", 1)
    x, y = toy_problem(200)
    feats = training.FeatureSets("synthetic", [x], y, x[:50], y[:50], x[:50], y[:50])
    training.float_model(feats)
    out = capsys.readouterr().out
    assert "NOT the model of notebook 03" in out and "!!!" in out
    assert not training.float_checkpoint_path("synthetic").exists()   # notebook 03's name stays free
    fallback = training.fallback_checkpoint_path("synthetic")
    assert fallback.is_file() and "fallback" in fallback.name
    training.float_model(feats)   # second call loads the stand-in, still loudly
    assert "stand-in" in capsys.readouterr().out


def test_artifacts_are_kept_per_profile_and_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KWS_OUTPUT", str(tmp_path))
    monkeypatch.setattr(config, "_ACTIVE_DATASET", [])
    assert config.artifacts_dir() == tmp_path / "artifacts" / config.profile().name / "untrained"
    config.set_active_dataset("real")
    assert config.artifacts_dir() == tmp_path / "artifacts" / config.profile().name / "real"
    assert training.float_checkpoint_path("synthetic").parent.name == "synthetic"
    with pytest.raises(ValueError, match="real"):
        config.set_active_dataset("toy")


def test_feature_cache_key_changes_with_augmentation_settings(
        tiny_dataset: data.DatasetInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    splits = data.splits(tiny_dataset)
    base = training.feature_cache_dir(tiny_dataset, splits)
    for name, value in (("BACKGROUND_VOLUME", 0.2), ("BACKGROUND_FREQUENCY", 0.5),
                        ("MAX_SHIFT_SAMPLES", 0), ("LOG_OFFSET", 1e-5)):
        with monkeypatch.context() as patch:
            patch.setattr(features, name, value)
            assert training.feature_cache_dir(tiny_dataset, splits) != base, name
    assert training.feature_cache_dir(tiny_dataset, splits) == base


def test_default_recipe_is_tis() -> None:
    prof = config.PROFILES["default"]
    assert prof.momentum == 0 and not prof.per_batch_schedule
    # TI's QAT rate at 8 and 4 bits; at 2 bits the rate scripts/choose_int2_qat_lr.py chose on validation
    # (with notebook 05's prior-adjusted loss), half TI's: a named departure.
    assert config.qat_lr_for(4, prof) == config.qat_lr_for(8, prof) == prof.lr / 100
    assert config.qat_lr_for(2, prof) == prof.int2_qat_lr == prof.lr / 200
    # The other named departure of the default profile: TI's rule gives 100 QAT epochs below 8 bits.
    assert prof.qat_epochs_cap == 5 and config.qat_epochs_for(2, prof) == 5
    uncapped = dataclasses.replace(prof, qat_epochs_cap=None)
    assert config.qat_epochs_for(8, uncapped) == max(prof.epochs // 2, 5)
    assert config.qat_epochs_for(4, uncapped) == config.qat_epochs_for(2, uncapped) == prof.epochs * 10
    optimizer, scheduler = training.make_optimizer(model.DSCNN(), prof.lr, prof.epochs, 400)
    assert optimizer.defaults["momentum"] == 0 and optimizer.defaults["weight_decay"] == 1e-4
    assert scheduler.T_max == prof.epochs


def test_workshop_profile_teaches_the_same_recipe_on_less_data() -> None:
    default, workshop = config.PROFILES["default"], config.PROFILES["workshop"]
    same = ("epochs", "batch_size", "lr", "momentum", "per_batch_schedule")
    assert all(getattr(workshop, f) == getattr(default, f) for f in same)
    # Both run int2 QAT below TI's rate, each at the rate chosen on its own validation split.
    assert config.qat_lr_for(2, workshop) < config.qat_lr_for(2, default) < default.qat_lr
    assert workshop.synth_speakers < default.synth_speakers and workshop.aug_views < default.aug_views
    assert all(name in config.STREAM_CLIPS for name in config.PROFILES)


def test_per_batch_schedule_and_momentum_are_options() -> None:
    x, y = toy_problem(200)
    for per_batch in (False, True):
        net = model.DSCNN()
        history = training.fit(net, [x], y, x[:50], y[:50], epochs=2, lr=0.05, batch_size=50,
                               generator=training.set_seed(0), momentum=0.9, per_batch_schedule=per_batch)
        # per epoch: epoch 2 starts at cos(pi/2) -> lr/2; per batch it has also fallen to lr/2 by then
        assert history.lr[0] == 0.05 and history.lr[1] == pytest.approx(0.025)
    optimizer, scheduler = training.make_optimizer(model.DSCNN(), 0.05, 2, 4, 0.9, True)
    assert scheduler.T_max == 8 and optimizer.defaults["momentum"] == 0.9


def test_recognised_by_keeps_the_clips_the_judge_gets_right() -> None:
    class Judge(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:   # says class 3 when the first value is > 0
            out = torch.zeros(len(x), 12)
            out[:, 3] = x[:, 0, 0, 0]
            return out
    x = torch.zeros(4, *config.INPUT_SHAPE)
    x[[0, 2], 0, 0, 0] = 1.0
    keep = training.recognised_by(Judge(), x, torch.tensor([3, 3, 5, 0]))
    assert keep.tolist() == [True, False, False, True]   # clip 1 says 0 (a tie, argmax), labelled 3


def test_a_seeded_model_starts_from_the_same_weights_and_data_order() -> None:
    (a, gen_a), (b, gen_b) = training.seeded_model(7), training.seeded_model(7)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(torch.randperm(50, generator=gen_a), torch.randperm(50, generator=gen_b))
    c, _ = training.seeded_model(8)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def _feats(n: int = 36) -> training.FeatureSets:
    x, _ = toy_problem(n)
    y = torch.arange(n) % len(config.LABELS)   # every class present: each has a prior
    return training.FeatureSets("synthetic", [x, x + 1], y, x[:10], y[:10], x[:10], y[:10])


def test_keep_training_clips_filters_every_view_and_says_so() -> None:
    feats = _feats()
    keep = torch.arange(len(feats.train_y)) % 3 != 0
    kept = training.keep_training_clips(feats, keep)
    assert all(torch.equal(v, w[keep]) for v, w in zip(kept.train_views, feats.train_views))
    assert torch.equal(kept.train_y, feats.train_y[keep]) and torch.equal(kept.val_x, feats.val_x)
    assert kept.trained_on() == f"synthetic training split, realism-filtered (24 of {len(keep)} clips)"
    assert feats.trained_on() == "synthetic training split"
    for bad in (keep[:5], keep.long(), torch.zeros_like(keep)):
        with pytest.raises(InputError, match="keep"):
            training.keep_training_clips(feats, bad)


def test_realism_filter_applies_to_the_offline_dataset_only(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    feats = _feats()
    real = data.DatasetInfo("real", Path("train"), Path("test"), "real")
    assert training.realism_filter(real, feats) is None   # the reference was trained on those clips
    synthetic = data.DatasetInfo("synthetic", Path("train"), Path("test"), "synthetic")
    monkeypatch.setattr(config, "REALISM_FILTER", False)
    assert training.realism_filter(synthetic, feats) is None
    monkeypatch.setattr(config, "REALISM_FILTER", True)
    monkeypatch.setattr(training.mlperf, "available", lambda: False)
    assert training.realism_filter(synthetic, feats) is None
    assert "NOT realism-filtered" in capsys.readouterr().out   # loud, not silent
    judge = model.DSCNN().eval()
    monkeypatch.setattr(training.mlperf, "available", lambda: True)
    monkeypatch.setattr(training, "reference_model", lambda: judge)
    monkeypatch.setattr(training, "clean_train_features", lambda info: feats.train_views[0])
    keep = training.realism_filter(synthetic, feats)
    assert torch.equal(keep, training.recognised_by(judge, feats.train_views[0], feats.train_y))


def test_course_prior_corrects_synthetic_models_only(monkeypatch: pytest.MonkeyPatch) -> None:
    feats, net = _feats(), model.DSCNN().eval()
    fixed = training.course_prior(net, feats)
    assert torch.equal(fixed.fc6.bias, model.prior_corrected(net, feats.train_y).fc6.bias)
    assert training.course_prior(net, training.FeatureSets("real", *list(vars(feats).values())[1:])) is net
    monkeypatch.setattr(config, "PRIOR_CORRECTION", False)
    assert training.course_prior(net, feats) is net


def test_the_stand_in_float_model_takes_notebook_03s_last_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KWS_OUTPUT", str(tmp_path))
    monkeypatch.setattr(training, "SHORT_EPOCHS", 1)
    seen = []
    monkeypatch.setattr(training, "course_prior", lambda net, feats: seen.append(feats) or net)
    feats = _feats(60)
    training.float_model(feats)
    assert seen == [feats]


def test_prior_adjusted_loss_trains_the_corrected_model_as_the_uncorrected_one() -> None:
    # The identity behind notebook 04's fix: same loss value and same gradients as plain CE before correction.
    train_y = torch.cat([torch.arange(12), torch.full((40,), config.UNKNOWN_INDEX)])
    torch.manual_seed(0)
    net, x, y = model.DSCNN().eval(), torch.randn(16, *config.INPUT_SHAPE), torch.arange(16) % 12
    corrected = model.prior_corrected(net, train_y)
    ratio = model.prior_log_ratio(train_y, len(config.LABELS))
    adjusted = training.PriorAdjustedLoss(ratio)(corrected(x), y)
    plain = torch.nn.functional.cross_entropy(net(x), y)
    torch.testing.assert_close(adjusted, plain, rtol=0, atol=1e-5)
    adjusted.backward()
    plain.backward()
    torch.testing.assert_close(corrected.pointwise5.weight.grad, net.pointwise5.weight.grad, rtol=1e-4, atol=1e-7)
    assert not torch.isclose(torch.nn.functional.cross_entropy(corrected(x), y), plain)


def test_course_loss_adjusts_where_the_course_corrects_the_prior(monkeypatch: pytest.MonkeyPatch) -> None:
    feats = _feats()
    feats.train_y[:20] = config.UNKNOWN_INDEX   # an uneven mix, as the offline training split has
    loss = training.course_loss(feats)
    assert isinstance(loss, training.PriorAdjustedLoss)
    torch.testing.assert_close(loss.log_ratio, model.prior_log_ratio(feats.train_y, len(config.LABELS)))
    real = training.FeatureSets("real", *list(vars(feats).values())[1:])
    assert type(training.course_loss(real)) is torch.nn.CrossEntropyLoss
    monkeypatch.setattr(config, "PRIOR_CORRECTION", False)
    assert type(training.course_loss(feats)) is torch.nn.CrossEntropyLoss


def test_keywords_called_unknown_counts_keyword_clips_only() -> None:
    u, s = config.UNKNOWN_INDEX, config.SILENCE_INDEX
    labels = torch.tensor([0, 1, 2, 3, u, s])
    preds = torch.tensor([u, 1, u, 3, u, u])   # the unknown and silence clips do not count
    assert training.keywords_called_unknown(preds, labels) == 0.5
