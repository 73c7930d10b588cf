"""The exact streaming order statistic behind global TIES and PCB."""

import pytest
import torch

from course_lib.merging import _select
from course_lib.merging._select import PerThread, kth_largest_count, kth_smallest_rows, stream


def _data(seed=0, rows=3):
    g = torch.Generator().manual_seed(seed)
    return {f"k{i}": torch.randn(rows, 500 * (i + 1), generator=g) for i in range(6)}


def _assert_exact(data, ranks_of, **kwargs):
    """The streaming path (never the direct one) equals a full sort at ranks ``ranks_of(D)``."""
    keys = list(data)
    full = torch.cat([data[k] for k in keys], dim=1).sort(dim=1).values
    ranks = ranks_of(full.shape[1])
    got = kth_smallest_rows(
        keys,
        [data[k].shape[1] for k in keys],
        lambda k, where: data[k][:, where],
        [ranks] * full.shape[0],
        direct_limit=0,
        **kwargs,
    )
    assert torch.equal(got, full[:, ranks])


@pytest.mark.parametrize("sample_size", [3, 50, 100_000])
def test_matches_a_full_sort_even_with_a_bad_sample(sample_size):
    _assert_exact(_data(), lambda d: [0, 1, d // 3, d // 2, d - 2, d - 1], sample_size=sample_size)


@pytest.mark.parametrize("use_scratch", [False, True])
def test_heavy_ties_are_counted_exactly(use_scratch):
    # Five distinct values: most entries equal a bracket end, so the count of values below
    # ``lo`` (from the sign sums) and the ties at ``lo`` (from the candidates) both matter.
    g = torch.Generator().manual_seed(3)
    data = {f"k{i}": torch.randint(0, 5, (4, 700 * (i + 1)), generator=g).float() for i in range(4)}
    scratch = (
        PerThread(lambda: (torch.empty(4, 3000), torch.empty(4, 3000))) if use_scratch else None
    )
    for sample_size in (5, 1000):
        _assert_exact(
            data,
            lambda d: [0, d // 5, d // 2, d - 1 - d // 7, d - 1],
            sample_size=sample_size,
            scratch=scratch,
        )


@pytest.mark.parametrize("first_rank", ["middle", "max"])
def test_visit_reach_marks_every_position_that_can_reach_the_first_rank(first_rank):
    data = _data(seed=4, rows=3)
    keys, numels = list(data), [data[k].shape[1] for k in data]
    d = sum(numels)
    rank = d - 1 if first_rank == "max" else (9 * d) // 10
    seen: dict[str, list[tuple[slice, torch.Tensor]]] = {k: [] for k in keys}

    def visit(key, where, reach):
        seen[key].append((where, reach.clone()))

    got = kth_smallest_rows(
        keys, numels, lambda k, w: data[k][:, w], [[rank]] * 3, direct_limit=0, visit=visit
    )
    for key in keys:
        seen[key].sort(key=lambda item: item[0].start)  # threads visit chunks in any order
        reach = torch.cat([r for _, r in seen[key]])
        assert [w.start for w, _ in seen[key]] == list(range(0, data[key].shape[1], _select.CHUNK))
        assert reach.shape == (data[key].shape[1],)
        at_or_above = (data[key] >= got[:, :1]).any(dim=0)  # may hold a kept value
        assert (reach[at_or_above] >= 0).all()
        assert (reach >= 0).float().mean() < 0.5  # and the bracket is tight: most are ruled out


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


@pytest.mark.parametrize("num_workers", [1, 2, 5])
def test_any_number_of_workers_gives_the_same_bits(monkeypatch, num_workers):
    monkeypatch.setattr(_select, "CHUNK", 128)  # many chunks, so that the threads interleave
    monkeypatch.setattr(_select, "workers", lambda: num_workers)
    _assert_exact(_data(seed=5), lambda d: [0, d // 10, d // 2, d - 1], sample_size=200)


def test_stream_runs_every_job_once_and_restores_the_thread_count():
    seen, threads = [], torch.get_num_threads()
    stream(range(100), seen.append, num_workers=3)
    assert sorted(seen) == list(range(100))
    assert torch.get_num_threads() == threads


def test_stream_raises_the_first_error_and_stops_the_other_threads():
    done, threads = [], torch.get_num_threads()

    def step(job):
        if job == 3:
            raise RuntimeError("chunk 3 is bad")
        done.append(job)

    with pytest.raises(RuntimeError, match="chunk 3 is bad"):
        stream(range(10_000), step, num_workers=2)
    assert len(done) < 9_000  # the other thread stopped early
    assert torch.get_num_threads() == threads


def test_per_thread_gives_each_thread_its_own_value():
    lanes = PerThread(list)
    stream(range(50), lambda job: lanes().append(job), num_workers=3)
    assert sorted(j for lane in lanes.made for j in lane) == list(range(50))
    assert lanes() is lanes()  # the calling thread's own, made once
