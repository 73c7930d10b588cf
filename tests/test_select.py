"""The exact streaming order statistic behind global TIES and PCB."""

import pytest
import torch

from course_lib.merging._select import kth_largest_count, kth_smallest_rows


def _data(seed=0, rows=3):
    g = torch.Generator().manual_seed(seed)
    return {f"k{i}": torch.randn(rows, 500 * (i + 1), generator=g) for i in range(6)}


@pytest.mark.parametrize("sample_size", [3, 50, 100_000])
def test_matches_a_full_sort_even_with_a_bad_sample(sample_size):
    data = _data()
    keys = list(data)
    full = torch.cat([data[k] for k in keys], dim=1).sort(dim=1).values
    d = full.shape[1]
    ranks = [0, 1, d // 3, d // 2, d - 2, d - 1]
    got = kth_smallest_rows(
        keys,
        [data[k].shape[1] for k in keys],
        lambda k, where: data[k][:, where],
        [ranks] * 3,
        sample_size=sample_size,
        direct_limit=0,
    )
    assert torch.equal(got, full[:, ranks])


def test_rank_out_of_range_is_an_error():
    data = _data()
    with pytest.raises(ValueError, match="ranks must lie"):
        kth_smallest_rows(
            list(data), [data[k].shape[1] for k in data], lambda k, i: data[k], [[10**9]] * 3
        )


@pytest.mark.parametrize(
    ("numel", "fraction", "count"), [(10, 0.2, 2), (10, 1.0, 10), (3, 0.1, 1), (7, 0.5, 3)]
)
def test_kept_count(numel, fraction, count):
    assert kth_largest_count(numel, fraction) == count
