"""Calibration observers on known distributions (modelpress.quantization.observers)."""
from __future__ import annotations

import pytest
import torch

from modelpress.core.errors import ConfigError, DataError
from modelpress.quantization.observers import OBSERVERS, make_observer
from modelpress.quantization.primitives import QuantSpec

SYM = QuantSpec(bits=8, symmetric=True, signed=True)
ASYM = QuantSpec(bits=8, symmetric=False, signed=False)


def gaussian(n=200_000, seed=0, sigma=1.0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * sigma


def observed(name, spec, *batches, **options):
    obs = make_observer(name, spec, **options)
    for b in batches:
        obs.update(b)
    lo, hi = obs.range()
    return float(lo.reshape(-1)[0]), float(hi.reshape(-1)[0])


@pytest.mark.parametrize("spec", [SYM, ASYM], ids=["sym", "asym"])
def test_percentile_clips_a_planted_outlier_minmax_keeps_it(spec):
    x = gaussian(100_000)
    x[123] = 100.0
    _, hi_pct = observed("percentile", spec, x, percentile=99.99)
    _, hi_mm = observed("minmax", spec, x)
    assert hi_mm == 100.0
    assert 3.0 < hi_pct < 5.0  # the 99.99th percentile of |N(0, 1)| is 3.9


@pytest.mark.parametrize("name", ["mse", "kl"])
@pytest.mark.parametrize("spec", [SYM, ASYM], ids=["sym", "asym"])
def test_mse_and_kl_ranges_on_gaussian_are_between_2_and_5_sigma(name, spec):
    sigma = 0.7
    lo, hi = observed(name, spec, *gaussian(200_000, sigma=sigma).chunk(4))
    assert 2 * sigma < hi < 5 * sigma
    assert -5 * sigma < lo < -2 * sigma


@pytest.mark.parametrize("name", ["mse", "kl", "percentile"])
def test_relu_output_range_starts_at_zero_and_is_not_collapsed_by_the_zero_spike(name):
    x = torch.relu(gaussian(200_000))  # half the values are exactly 0
    lo, hi = observed(name, ASYM, x)
    assert lo == 0.0
    assert 2.0 < hi < 4.6


def test_growing_range_across_batches_matches_one_big_batch():
    small, large = gaussian(100_000, seed=1), gaussian(100_000, seed=2, sigma=4.0)
    _, hi_grown = observed("percentile", SYM, small, large, percentile=99.9)
    _, hi_once = observed("percentile", SYM, torch.cat([small, large]), percentile=99.9)
    assert hi_grown == pytest.approx(hi_once, rel=0.03)
    assert hi_grown > 10  # the second batch's scale, not the first's


def test_moving_minmax_averages_batch_extremes():
    lo, hi = observed("moving_minmax", ASYM, torch.tensor([0.0, 1.0]), torch.tensor([-1.0, 3.0]), momentum=0.5)
    assert (lo, hi) == (-0.5, 2.0)


@pytest.mark.parametrize("name", OBSERVERS)
def test_per_channel_ranges_have_one_row_per_channel(name):
    spec = QuantSpec(bits=8, symmetric=False, signed=False, granularity="channel", axis=1)
    scales = torch.tensor([0.5, 1.0, 2.0, 4.0]).view(1, 4, 1, 1)
    obs = make_observer(name, spec)
    for seed in range(2):
        obs.update(torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(seed)) * scales)
    lo, hi = obs.range()
    assert lo.shape == hi.shape == (4, 1)
    assert torch.all(hi[1:] > hi[:-1]) and torch.all(lo[1:] < lo[:-1])  # ranges follow the channel scales
    scale, zero = obs.qparams()
    assert scale.shape == zero.shape == (4, 1)


@pytest.mark.parametrize("name", OBSERVERS)
def test_empty_nan_and_unfed_observers_raise_data_error(name):
    obs = make_observer(name, SYM)
    with pytest.raises(DataError, match="range\\(\\) before any update"):
        obs.range()
    with pytest.raises(DataError, match="empty"):
        obs.update(torch.empty(0, 3))
    with pytest.raises(DataError, match="NaN"):
        obs.update(torch.tensor([1.0, float("nan")]))


def test_channel_count_change_between_batches_is_a_data_error():
    obs = make_observer("minmax", QuantSpec(granularity="channel", axis=1))
    obs.update(torch.randn(2, 3))
    with pytest.raises(DataError, match="3"):
        obs.update(torch.randn(2, 4))


def test_bad_names_and_options_are_config_errors():
    with pytest.raises(ConfigError, match="unknown observer 'entropy'"):
        make_observer("entropy", SYM)
    with pytest.raises(ConfigError, match="percentile"):
        make_observer("percentile", SYM, percentile=101)
    with pytest.raises(ConfigError, match="momentum"):
        make_observer("moving_minmax", SYM, momentum=1.0)
    with pytest.raises(ConfigError, match="'kl'"):
        make_observer("kl", SYM, percentile=99.0)
    with pytest.raises(ConfigError, match="group"):
        make_observer("minmax", QuantSpec(granularity="group"))


def test_all_zero_tensor_gives_a_usable_range():
    for name in OBSERVERS:
        obs = make_observer(name, ASYM)
        obs.update(torch.zeros(100))
        scale, zero = obs.qparams()
        assert torch.isfinite(scale).all() and float(scale) > 0
