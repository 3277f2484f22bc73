"""The DS-CNN: reference checkpoint, input checks, and the statistics notebook 02 teaches."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kws_utils import config, data, model
from kws_utils.errors import InputError, InputTypeError

REFERENCE = config.mlperf_dir() / "kws_dscnn_pb2pth_checkpoint.pth"
needs_mlperf = pytest.mark.skipif(not (config.mlperf_dir() / "kws01").is_dir() or not REFERENCE.is_file(),
                                  reason="MLPerf artifacts (../shared/mlperf) not present")


@needs_mlperf
def test_reference_checkpoint_loads_strictly_and_scores_90_percent() -> None:
    net = model.reference_model()
    x, y, _ = data.load_kws01()
    with torch.no_grad():
        accuracy = (net(x).argmax(1) == y).float().mean().item()
    assert accuracy >= 0.90


def test_output_shape_and_parameter_count() -> None:
    net = model.DSCNN().eval()
    assert net(torch.zeros(3, *config.INPUT_SHAPE)).shape == (3, len(config.LABELS))
    assert sum(p.numel() for p in net.parameters()) == 23_756


def test_named_layer_groups_are_the_layers_they_say() -> None:
    layers = dict(model.DSCNN().named_modules())
    assert [layers[n].groups for n in model.DEPTHWISE_LAYERS] == [64] * 4   # one filter per channel
    assert sorted(n for n, m in layers.items() if isinstance(m, torch.nn.Conv2d) and m.groups > 1) \
        == sorted(model.DEPTHWISE_LAYERS)
    assert [type(layers[n]) for n in model.EDGE_LAYERS] == [torch.nn.Conv2d, torch.nn.Linear]   # first, last


@pytest.mark.parametrize("shape", [(2, 49, 10), (2, 1, 10, 49), (2, 2, 49, 10), (49, 10)])
def test_wrong_input_shape_names_the_expected_one(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"\(N, 1, 49, 10\)"):
        model.DSCNN()(torch.zeros(shape))


def test_checkpoint_key_mismatch_names_the_keys(tmp_path: Path) -> None:
    state = model.DSCNN().state_dict()
    state.pop("fc6.bias")
    state["head.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(KeyError, match=r"fc6\.bias.*head\.weight"):
        model.load_checkpoint(model.DSCNN(), path)


def test_missing_checkpoint_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="notebook 03"):
        model.load_checkpoint(model.DSCNN(), tmp_path / "none.pth")


def test_layer_stats_match_hand_counts() -> None:
    net = model.DSCNN()
    stats = {s.name: s for s in model.layer_stats(net)}
    assert stats["conv1"].out_shape == (64, 25, 5)
    assert stats["conv1"].macs == 25 * 5 * 64 * 10 * 4
    assert stats["depthwise2"].macs == 25 * 5 * 64 * 9
    assert stats["pointwise5"].macs == 25 * 5 * 64 * 64
    assert stats["fc6"].macs == 64 * 12
    assert sum(s.params for s in stats.values()) == sum(p.numel() for p in net.parameters())
    assert net.training  # measuring must not leave the model in eval mode


def test_receptive_field_and_separable_saving() -> None:
    assert model.receptive_field(model.DSCNN()) == (26, 20)
    cmp = model.separable_vs_plain()
    assert cmp["separable"]["params"] == 64 * 9 + 64 + 64 * 64 + 64
    assert 7 < cmp["plain"]["macs"] / cmp["separable"]["macs"] < 9


def test_prior_correction_removes_the_training_mix_from_the_bias() -> None:
    net = model.DSCNN().eval()
    before = net.fc6.bias.detach().clone()
    train_y = torch.tensor([11] * 6 + list(range(11)))           # unknown: 6 of 17 clips
    fixed = model.prior_corrected(net, train_y)
    x = torch.randn(3, *config.INPUT_SHAPE)
    shift = fixed(x) - net(x)
    prior = torch.bincount(train_y, minlength=12).double() / len(train_y)
    torch.testing.assert_close(shift, -torch.log(prior * 12).float().expand(3, -1), rtol=0, atol=1e-5)
    assert shift[0, 11] < 0 < shift[0, 0]            # the over-represented class loses, the rare ones gain
    assert torch.equal(net.fc6.bias, before)          # a copy: the trained model is left as it was


def test_a_balanced_training_split_needs_no_correction() -> None:
    net = model.DSCNN().eval()
    fixed = model.prior_corrected(net, torch.arange(12).repeat(5))
    torch.testing.assert_close(fixed.fc6.bias, net.fc6.bias, rtol=0, atol=1e-7)


@pytest.mark.parametrize("train_y,match", [(torch.arange(11), "no clip of class \\[11\\]"),
                                           (torch.arange(12).float(), "train_y must"),
                                           (torch.tensor([0, 12]), "train_y must"),
                                           ("labels", "train_y must")])
def test_bad_prior_labels_are_refused_by_name(train_y: object, match: str) -> None:
    with pytest.raises(InputError, match=match):
        model.prior_corrected(model.DSCNN(), train_y)


def test_prior_correction_needs_a_dscnn() -> None:
    with pytest.raises(InputTypeError, match="fc6"):
        model.prior_corrected(torch.nn.Linear(3, 12), torch.arange(12))
