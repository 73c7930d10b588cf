"""Interference statistics on hand-made task vectors, and the figures' axes (never pixels)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from course_lib import viz  # noqa: E402
from course_lib.analysis import cosine_matrix, layer_of, mass_curve, sign_conflicts  # noqa: E402
from course_lib.state import TaskVector  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_cosine_matrix_matches_the_pairwise_cosine():
    g = torch.Generator().manual_seed(0)
    vs = [
        TaskVector({"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)})
        for _ in range(3)
    ]
    m = cosine_matrix(vs)
    assert m.shape == (3, 3)
    torch.testing.assert_close(m.diagonal(), torch.ones(3))
    for i in range(3):
        for j in range(3):
            assert abs(float(m[i, j]) - vs[i].cosine(vs[j])) < 1e-5


def test_mass_curve_by_hand():
    tv = TaskVector({"w": torch.tensor([3.0, -4.0, 0.0, 1.0]), "b": torch.tensor([0.0] * 6)})
    # squares 16, 9, 1 of a total 26; the top 10% of 10 entries is 1 entry
    assert mass_curve(tv, [0.1, 0.2, 1.0]) == pytest.approx([16 / 26, 25 / 26, 1.0])
    # 0.27 of 10 entries is 2 (floor, as TIES's trim counts), not round(2.7) = 3
    assert mass_curve(tv, [0.27]) == pytest.approx([25 / 26])
    with pytest.raises(ValueError, match="fractions"):
        mass_curve(tv, [0.0])


def test_mass_curve_passes_the_exercise_checker_it_is_compared_with():
    """Notebook 02 asks learners to compare their top_mass_share with this curve."""
    from course_lib import checks

    assert checks.check_top_mass_share(lambda tau, f: mass_curve(TaskVector({"w": tau}), [f])[0])


def test_sign_conflicts_by_hand_and_after_trimming():
    pre = {"layers.0.w": torch.zeros(4), "embeddings.x": torch.zeros(2), "step": torch.tensor([1])}
    fts = [
        {"layers.0.w": torch.tensor([1.0, 1.0, -0.1, 0.0]), "embeddings.x": torch.tensor([1.0, 1.0]), "step": torch.tensor([1])},
        {"layers.0.w": torch.tensor([-3.0, 2.0, 0.5, 0.0]), "embeddings.x": torch.tensor([1.0, -1.0]), "step": torch.tensor([1])},
    ]  # fmt: skip
    raw = sign_conflicts(pre, fts)
    assert raw == {"layer 0": 2 / 4, "embeddings": 1 / 2}
    # trimmed to the top half per task and tensor: -0.1 vs 0.5 goes, the large 1 vs -3 stays
    assert sign_conflicts(pre, fts, density=0.5)["layer 0"] == 1 / 4
    assert layer_of("vision_model.encoder.layers.11.mlp.fc1.weight") == "layer 11"
    assert layer_of("visual_projection.weight") == "head"


def test_figures_have_the_expected_axes():
    table = {"zero-shot": {"a": 10.0, "b": 20.0}, "experts": {"a": 90.0, "b": 80.0}}
    ax = viz.accuracy_bars(table, title="T").axes[0]
    assert ax.get_title() == "T" and len(ax.patches) == 2 * 3  # 2 methods x (2 tasks + mean)
    hm = viz.method_heatmap(table).axes[0]
    assert [t.get_text() for t in hm.get_yticklabels()] == ["zero-shot", "experts"]
    lc = viz.lambda_curves({"TA": {0.1: 30.0, 0.3: 35.0}}, {"zero-shot": 25.0}).axes[0]
    assert len(lc.get_lines()) == 2 and lc.get_xlabel().startswith("scaling")
    assert len(viz.cosine_heatmap(torch.eye(3), ["a", "b", "c"]).axes[0].texts) == 9
    xi = torch.tensor([[0.0, 0.5], [0.25, 1.5]])
    dh = viz.disentanglement_heatmap(xi, [0.0, 1.0], ["digits", "fashion"]).axes[0]
    assert [t.get_text() for t in dh.texts] == ["0.00", "0.50", "0.25", "1.50"]
    assert dh.get_ylabel() == "α for digits" and dh.get_xlabel() == "α for fashion"
    assert [t.get_text() for t in dh.get_xticklabels()] == ["0", "1"]
    ph = viz.pair_heatmap(torch.full((2, 2), 1.5), ["a", "b"], "xi", vmax=2.0).axes[0]
    assert ph.get_title() == "xi" and ph.collections[0].get_clim() == (0.0, 2.0)
    assert len(viz.confusion(torch.eye(2) * 5, ["a", "b"]).axes[0].texts) == 4
    mc = viz.mass_curves([0.1, 1.0], {"a": [0.5, 1.0]}).axes[0]
    assert len(mc.get_lines()) == 2  # the curve and the diagonal
    cb = viz.conflict_bars({"raw": {"layer 0": 0.9}, "trimmed": {"layer 0": 0.3}}).axes[0]
    assert len(cb.patches) == 2
    steps = viz.tensor_steps({"tau": torch.ones(2, 3), "sign": torch.ones(3)})
    assert [a.get_title() for a in steps.axes] == ["tau", "sign"]
    rc = viz.rank_curve([0.1, 0.5], [60.0, 80.0], [0.2, 1.0], expert=90.0)
    assert len(rc.axes) == 2  # accuracy and storage share the x axis
    h = viz.histogram({"kept": [1.0, 2.0], "dropped": [0.1]}, "t", "x").axes[0]
    assert h.get_yscale() == "log"
    hist = {"loss": [2.0, 1.0, 0.5], "val_step": [2, 3], "val_accuracy": [40.0, 80.0]}
    loss_ax, val_ax = viz.training_curves({"a": hist, "b": hist}).axes
    assert len(loss_ax.get_lines()) == 2 and loss_ax.get_yscale() == "log"
    assert list(val_ax.get_lines()[0].get_ydata()) == [40.0, 80.0]
    grid = viz.image_grid(torch.rand(3, 4, 4, 3), ["x", "y", "z"], ncols=2)
    assert sum(1 for a in grid.axes if a.get_title()) == 3
