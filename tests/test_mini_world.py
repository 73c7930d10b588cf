"""The real mini world: build the default zoo once and check what the course claims about it.

This is the slow test of the suite (a cold zoo build is several minutes on two CPU cores; a
built zoo in ``data/cache/mini`` is reused). It checks the claims the README makes about the
table ``make course`` prints. (The static merges do not yet separate as in the papers, so no
ordering among averaging, task arithmetic, TIES and PCB is claimed.)
"""

from __future__ import annotations

import pytest

from course_lib import evalcache, leaderboard
from course_lib import experiments as ex
from course_lib.models.zoo import load_zoo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zoo():
    return load_zoo("mini", progress=False)


@pytest.fixture(scope="module")
def results(zoo):
    with evalcache.using("on"):  # what it evaluates, the notebooks (run later by nbval) reuse
        res = ex.run_all(zoo, progress=False)
    # saved as `python -m course_lib course` saves it: notebook 07 (run later by nbval) reuses it
    leaderboard.save(leaderboard.vision_record(res, zoo))
    return res


def test_the_saved_record_is_what_the_leaderboard_reuses(results, zoo):
    fp = leaderboard.fingerprint("vision", "mini")
    record = leaderboard.load(leaderboard.results_path("vision", "mini"), fp)
    assert record is not None, "the record was not saved, or its fingerprint does not match"
    assert record.absolute == results.absolute and record.chosen == results.chosen
    assert leaderboard.track_results("vision", "mini") == record  # reused, not recomputed
    assert zoo.world == leaderboard.world_id("vision", "mini")  # the zoo is the course's
    assert record.stored["experts"] == 8.0 and 1.0 < record.stored["Twin-Merging"] < 8.0


def test_experts_are_much_better_than_zero_shot(results):
    zs, experts = ex.mean(results.absolute["zero-shot"]), ex.mean(results.experts)
    assert experts >= zs + 25, f"experts {experts:.1f} vs zero-shot {zs:.1f}"


def test_twin_merging_routes_inputs_to_their_experts(results):
    twin = ex.mean(results.absolute["Twin-Merging"])
    static = {
        k: ex.mean(results.absolute[k]) for k in ("task arithmetic", "TIES-Merging", "PCB-Merging")
    }
    assert twin > max(static.values()) + 20, (twin, static)
    assert results.twin.router_accuracy > 80
    assert 0 < results.twin.compression < 0.5  # rank ratio 0.1 really stores less


def test_every_row_is_a_real_accuracy(results, zoo):
    for method, accs in results.absolute.items():
        assert list(accs) == zoo.task_names, method
        assert all(0 <= a <= 100 for a in accs.values()), method
