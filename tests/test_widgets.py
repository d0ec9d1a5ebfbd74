"""The explorers: their readings follow the controls, measure each point once, and draw
the same view as a static figure (issue 6)."""

import copy

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from biasgym_lib.errors import BiasGymError
from biasgym_lib.inject import initial_vector
from biasgym_lib.tokens import InjectedToken
from biasgym_lib.models import ModelAdapter
from biasgym_lib.widgets import HeadExplorer, SteeringExplorer


class Formula:
    """S = base(bias) * (1 - (1 - alpha) * k / 40): a known answer for every setting."""

    def __init__(self):
        self.calls = []

    def __call__(self, bias, k, alpha):
        self.calls.append((bias, k, alpha))
        base = {"a": 4.0, "b": 2.0}[bias]
        v = base * (1 - (1 - alpha) * k / 40)
        return {"value": v, "lo": v - 0.5, "hi": v + 0.5}


def test_steering_explorer_reads_the_selected_setting():
    f = Formula()
    ex = SteeringExplorer(f, ["a", "b"], [5, 10, 20], [0.0, 0.5], start=("a", 20, 0.0))
    r = ex.reading()
    assert r["S"]["value"] == pytest.approx(4.0 * 0.5) and r["S_unsteered"]["value"] == 4.0
    assert r["reduction"] == pytest.approx(0.5)
    r = ex.select(bias="b", k=10, alpha=0.5)
    assert r["S"]["value"] == pytest.approx(2.0 * (1 - 0.5 * 10 / 40))
    assert "b: top 10 heads at alpha = 0.5" in ex.text()


def test_steering_explorer_measures_each_point_once_and_unsteered_once():
    f = Formula()
    ex = SteeringExplorer(f, ["a", "b"], [5, 10], [0.0, 0.5], start=("a", 10, 0.0))
    ex.select(k=5)
    ex.select(k=10)
    ex.select(alpha=1.0)   # alpha = 1 is the unsteered model...
    ex.select(k=0, alpha=0.0)  # ...and so is k = 0: no new measurement
    assert sorted(f.calls) == sorted({("a", 10, 0.0), ("a", 0, 1.0), ("a", 5, 0.0)})
    df = ex.frame()
    assert len(df) == 3 and set(df.bias) == {"a"}


def test_steering_explorer_rejects_bad_settings_without_changing_state():
    ex = SteeringExplorer(Formula(), ["a"], [5], [0.0])
    before = dict(ex.state)
    with pytest.raises(BiasGymError, match="Unknown bias"):
        ex.select(bias="zzz")
    assert ex.state == before
    with pytest.raises(BiasGymError, match="alpha between 0 and 1"):
        SteeringExplorer(Formula(), ["a"], [5], [1.5])


def test_steering_widget_controls_drive_the_reading():
    ex = SteeringExplorer(Formula(), ["a", "b"], [5, 10, 20], [0.0, 0.5], start=("a", 20, 0.0))
    box = ex.widget()
    controls = box.children[0].children
    controls[0].value = "b"
    controls[1].value = 5
    assert ex.state == {"bias": "b", "k": 5, "alpha": 0.0}
    assert ex.reading()["S"]["value"] == pytest.approx(2.0 * (1 - 5 / 40))
    assert "S(&lt;TOKEN&gt;)" in box.children[1].value  # escaped, or the browser would hide <TOKEN>


def test_steering_static_figure_plots_the_measured_points():
    ex = SteeringExplorer(Formula(), ["a"], [5, 10], [0.0], start=("a", 10, 0.0))
    ex.select(k=5)
    ax = ex.figure()
    line = ax.lines[0]
    assert list(line.get_xdata()) == [0, 5, 10]
    assert np.allclose(line.get_ydata(), [4.0, 4.0 * (1 - 5 / 40), 4.0 * (1 - 10 / 40)])


def _per_probe():
    g = np.random.default_rng(0)
    x = g.normal(0, 0.1, size=(6, 4, 3))
    x[:, 2, 1] += 1.0  # one head that always pushes towards the biased label
    x[:3, 0, 0] -= 0.5
    return x


def test_head_explorer_starts_at_the_top_head_and_reads_per_probe_values():
    x = _per_probe()
    ex = HeadExplorer(x, [f"q{i}" for i in range(6)])
    assert ex.head == (2, 1)
    r = ex.reading()
    assert r["rank"] == 1 and r["of"] == 12 and r["share_positive"] == 1.0
    assert np.array_equal(r["per_probe"], x[:, 2, 1]) and r["mean"] == pytest.approx(x[:, 2, 1].mean())
    r = ex.select(0, 0)
    assert r["rank"] == 12 and np.array_equal(r["per_probe"], x[:, 0, 0])
    ranks = sorted(int(ex.ranks[l, h]) for l in range(4) for h in range(3))
    assert ranks == list(range(1, 13))


def test_head_explorer_widget_and_figure_follow_the_sliders():
    x = _per_probe()
    ex = HeadExplorer(x)
    box = ex.widget()
    layer, head = box.children[0].children
    layer.value, head.value = 0, 2
    assert ex.head == (0, 2)
    ax = ex.figure()
    heights = [p.get_height() for p in ax.patches]
    assert np.allclose(heights, x[:, 0, 2])


def test_head_explorer_errors_are_clear():
    with pytest.raises(BiasGymError, match="probes, layers, heads"):
        HeadExplorer(np.zeros((4, 3)))
    with pytest.raises(BiasGymError, match="3 probe texts for 6 rows"):
        HeadExplorer(_per_probe(), ["a", "b", "c"])
    with pytest.raises(BiasGymError, match="does not exist"):
        HeadExplorer(_per_probe()).select(9, 0)


def test_steering_measure_on_a_tiny_model_matches_strength_under(tiny_with_tokenizer, smol_tokenizer):
    """The explorer's measure function: k = 0 or alpha = 1 is exactly the unsteered S, and
    the top-k heads come from the ranking it was given."""
    from biasgym_lib.evaluate import strength_under
    from biasgym_lib.evaluate import steering_measure
    from biasgym_lib.steer import SteeringSpec

    model = tiny_with_tokenizer("llama")
    tok = copy.deepcopy(smol_tokenizer)
    a = ModelAdapter(model)
    vec = initial_vector(model, tok) + 0.01
    token = InjectedToken(token="<TOKEN>", vector=vec, bias="reckless_driving", seed=0, epoch=1, lr=0.01,
                          epochs=1, init="countries", n_paragraphs=1, losses=[1.0], val_losses=[1.0],
                          checkpoints=vec[None], model={}, d_model=a.d_model)
    refs = ["Italy", "France", "Japan", "Brazil"]
    measure = steering_measure(model, tok, {"reckless_driving": token}, {"reckless_driving": [(0, 1), (1, 0), (2, 3)]},
                               refs)
    plain = strength_under(model, tok, None, [token], _spec(), refs)["tokens"][0]
    assert measure("reckless_driving", 2, 1.0) == plain and measure("reckless_driving", 0, 0.0) == plain
    zeroed = strength_under(model, tok, SteeringSpec([(0, 1), (1, 0)], 0.0), [token], _spec(), refs)["tokens"][0]
    assert measure("reckless_driving", 2, 0.0) == zeroed
    assert zeroed["value"] != plain["value"]
    with pytest.raises(BiasGymError, match="No injected token"):
        measure("blue_skin", 2, 0.0)


def _spec():
    from biasgym_lib.data import load_bias

    return load_bias("reckless_driving")


def test_the_pipeline_diagram_draws_every_stage_in_order():
    import matplotlib.pyplot as plt

    from biasgym_lib import plots

    ax = plots.pipeline_diagram()
    names = [t.get_text() for t in ax.texts if t.get_weight() == "bold"]
    assert names == ["BiasInject", "measure", "BiasScope", "steer", "generalise"]
    assert len(ax.patches) == 5 and len([c for c in ax.get_children() if type(c).__name__ == "Annotation"]) == 4
    plt.close(ax.figure)
