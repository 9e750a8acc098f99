import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

from bookcode import plotting
from bookcode.episodes import Episode


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def episode(ways=3, shots=2, queries=5, size=8):
    rng = np.random.default_rng(0)
    return Episode(
        support_x=rng.uniform(size=(ways * shots, size, size, 1)).astype(np.float32),
        support_y=np.repeat(np.arange(ways), shots),
        query_x=rng.uniform(size=(ways * queries, size, size, 1)).astype(np.float32),
        query_y=np.repeat(np.arange(ways), queries),
        classes=np.arange(ways),
    )


def test_show_episode_is_one_image_with_a_row_per_class():
    e = episode()
    fig = plotting.show_episode(e, queries_per_class=4, title="an episode")
    (ax,) = fig.axes
    (image,) = ax.get_images()
    assert image.get_array().shape == (3 * 8 + 2 * 1, 6 * 9 + 1)  # 3 rows, 2 shots + 4 queries
    assert [t.get_text() for t in ax.get_yticklabels()] == ["class 0", "class 1", "class 2"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["support", "queries"]
    assert ax.get_title() == "an episode"
    assert not any(line.get_visible() for line in ax.get_xgridlines() + ax.get_ygridlines())
    # The first support image of class 1 sits at the start of the second row.
    np.testing.assert_allclose(image.get_array()[9:17, 0:8], e.support_x[2, ..., 0])


def test_show_episode_from_arrays_into_given_axes_and_bad_input():
    e = episode(ways=2, shots=1, queries=1)
    fig, ax = plt.subplots()
    assert plotting.show_episode(*e.inputs(), e.query_y, ax=ax, class_names=["a", "b"]) is fig
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
    with pytest.raises(ValueError, match="must be images"):
        plotting.show_episode(np.zeros((2, 8)), e.support_y, e.query_x, e.query_y)
    with pytest.raises(ValueError, match="integer labels"):
        plotting.show_episode(e.support_x, e.support_y[:1], e.query_x, e.query_y)
    with pytest.raises(TypeError, match="needs query_x"):
        plotting.show_episode(e.support_x, e.support_y)
    with pytest.raises(TypeError, match="takes an Episode"):
        plotting.show_episode("not an episode")


def test_learning_curves_split_losses_from_accuracies():
    class History:  # what keras.callbacks.History offers
        def __init__(self):
            self.history = {"loss": [1.0, 0.5, 0.2], "accuracy": [0.3, 0.6, 0.9]}
            self.params = {"steps": 50}

    fig = plotting.learning_curves(History(), title="training")
    left, right = fig.axes
    (loss,) = left.get_lines()
    np.testing.assert_array_equal(loss.get_xdata(), [50, 100, 150])
    np.testing.assert_array_equal(loss.get_ydata(), [1.0, 0.5, 0.2])
    assert right.get_lines()[0].get_label() == "accuracy"
    assert left.get_xlabel() == "training step"
    fig, ax = plt.subplots()
    plotting.learning_curves({"a": [1, 2], "b": [3, 4]}, x=[10, 20], xlabel="episodes", ax=ax)
    assert len(ax.get_lines()) == 2 and ax.get_xlabel() == "episodes"
    with pytest.raises(ValueError, match="different lengths"):
        plotting.learning_curves({"a": [1, 2], "b": [3]})
    with pytest.raises(ValueError, match="x has 3 points"):
        plotting.learning_curves({"a": [1, 2]}, x=[1, 2, 3])
    with pytest.raises(TypeError, match="History or a non-empty dict"):
        plotting.learning_curves([1, 2])


def test_adaptation_curve_mean_and_band():
    per_task = np.array([[1.0, 0.5, 0.25], [3.0, 1.5, 0.75]])
    fig = plotting.adaptation_curve({"MAML": per_task, "baseline": [2, 2, 2]}, ylabel="MSE")
    (ax,) = fig.axes
    maml, _ = ax.get_lines()
    np.testing.assert_allclose(maml.get_ydata(), [2.0, 1.0, 0.5])
    np.testing.assert_array_equal(maml.get_xdata(), [0, 1, 2])
    assert maml.get_label() == "MAML" and ax.get_ylabel() == "MSE"
    assert len(ax.collections) == 1  # a confidence band only for the curve over tasks
    with pytest.raises(ValueError, match="steps \\+ 1"):
        plotting.adaptation_curve(np.zeros((2, 2, 2)))


def test_embeddings_2d_projects_with_pca():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 10)
    points = rng.normal(size=(30, 16)) + 5 * np.eye(16)[labels]
    prototypes = np.stack([points[labels == k].mean(0) for k in range(3)])
    fig = plotting.embeddings_2d(points, labels, prototypes)
    (ax,) = fig.axes
    assert len(ax.collections) == 4  # three classes and the prototypes
    stars = ax.collections[-1].get_offsets()
    dots = [ax.collections[k].get_offsets().mean(0) for k in range(3)]
    np.testing.assert_allclose(stars, np.array(dots), atol=1e-9)  # a linear map keeps means
    fig = plotting.embeddings_2d(points[:, :2], labels)
    np.testing.assert_allclose(fig.axes[0].collections[0].get_offsets(), points[:10, :2])
    with pytest.raises(ValueError, match="labels must have shape"):
        plotting.embeddings_2d(points, labels[:5])
    with pytest.raises(ValueError, match="prototypes must be"):
        plotting.embeddings_2d(points, labels, prototypes[:, :3])


def test_heatmap_shows_the_matrix_without_grid():
    weights = np.arange(12.0).reshape(3, 4)
    fig = plotting.heatmap(weights, xlabel="memory slot", ylabel="time step")
    ax, _colorbar = fig.axes
    np.testing.assert_array_equal(ax.get_images()[0].get_array(), weights)
    assert ax.get_xlabel() == "memory slot"
    assert not any(line.get_visible() for line in ax.get_xgridlines())
    with pytest.raises(ValueError, match="2-D array"):
        plotting.heatmap(np.zeros(3))


def test_trajectories_draw_a_path_a_start_and_a_goal_each():
    paths = np.cumsum(np.full((2, 5, 2), 0.1), axis=1)
    fig = plotting.trajectories(paths, [[0.4, 0.4], [0.5, 0.5]], labels=["a", "b"])
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert len(lines) == 1 + 2 * 3  # the square, then path, start, goal per path
    np.testing.assert_allclose(lines[1].get_xydata(), paths[0])
    np.testing.assert_allclose(lines[3].get_xydata(), [[0.4, 0.4]])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    shared = plotting.trajectories(paths, [0.4, 0.4], square=None).axes[0].get_lines()
    assert len(shared) == 2 * 2 + 1 and shared[-1].get_color() == "black"  # one goal, drawn once
    with pytest.raises(ValueError, match="3 goals for 2 paths"):
        plotting.trajectories(paths, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="paths must be"):
        plotting.trajectories(np.zeros((2, 5, 3)))


def test_show_pairs_puts_left_above_right_and_labels_columns():
    rng = np.random.default_rng(0)
    left, right = rng.uniform(size=(3, 10, 8, 1)), rng.uniform(size=(3, 10, 8, 1))
    fig = plotting.show_pairs(left, right, [1, 0, 1], title="pairs")
    (ax,) = fig.axes
    grid = ax.get_images()[0].get_array()
    assert grid.shape == (2 * 10 + 1, 3 * 9 - 1)
    np.testing.assert_allclose(grid[:10, 9:17], left[1, ..., 0])  # pair 1, top row
    np.testing.assert_allclose(grid[11:, 18:26], right[2, ..., 0])  # pair 2, bottom row
    assert [t.get_text() for t in ax.get_xticklabels()] == ["same", "different", "same"]
    assert ax.get_title() == "pairs"
    with pytest.raises(ValueError, match="same shape"):
        plotting.show_pairs(left, right[:2])
    with pytest.raises(ValueError, match="2 labels for 3 pairs"):
        plotting.show_pairs(left, right, [1, 0])


def test_roc_curves_draw_each_curve_and_the_diagonal():
    fig = plotting.roc_curves({"model": ([0, 0.1, 1], [0, 0.8, 1]), "pixels": ([0, 1], [0, 1])})
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["model", "pixels", "guessing"]
    np.testing.assert_allclose(lines[0].get_ydata(), [0, 0.8, 1])
    assert ax.get_xlabel() == "false positive rate" and ax.get_ylabel() == "true positive rate"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["model", "pixels", "guessing"]
    with pytest.raises(ValueError, match="2 false and 3 true"):
        plotting.roc_curves({"bad": ([0, 1], [0, 0.5, 1])})
    with pytest.raises(TypeError):
        plotting.roc_curves({})


def test_histograms_share_bins_and_mark_a_threshold():
    fig = plotting.histograms(
        {"same": [0.1, 0.2, 0.2], "different": [0.9, 1.0]},
        bins=[0, 0.5, 1.01],
        xlabel="distance",
        marks={"threshold": 0.5},
    )
    (ax,) = fig.axes
    heights = [p.get_height() for p in ax.patches]
    assert heights == [3, 0, 0, 2]  # two histograms of two bins each
    (line,) = ax.get_lines()
    assert line.get_xdata()[0] == 0.5 and line.get_label() == "threshold"
    assert ax.get_xlabel() == "distance" and ax.get_ylabel() == "count"
    fig = plotting.histograms({"a": [0.0, 1.0]}, bins=4)
    assert len(fig.axes[0].patches) == 4


def test_curves_of_different_lengths_with_bands_and_reference_lines():
    runs = np.array([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
    fig = plotting.curves(
        {"short": [4.0, 2.0], "long": ([10, 20, 30], runs), "points": ([0, 5], [1.0, 1.0])},
        ylabel="loss",
        hlines={"target": 2.5},
        vlines={"switch": 15},
        styles={"points": {"fmt": "k^"}, "long": {"lw": 2.5}},
        logy=True,
    )
    (ax,) = fig.axes
    short, long, points, target, switch = ax.get_lines()
    np.testing.assert_array_equal(short.get_xdata(), [0, 1])
    np.testing.assert_allclose(long.get_ydata(), [2.0, 3.0, 4.0])  # the mean over runs
    assert (
        long.get_linewidth() == 2.5
        and points.get_marker() == "^"
        and points.get_linestyle() == "None"
    )
    assert len(ax.collections) == 1  # one band, for the 2-D curve
    band = ax.collections[0].get_paths()[0].vertices[:, 1]  # between the 10th and 90th percentiles
    assert band.min() == pytest.approx(1.2) and band.max() == pytest.approx(4.8)
    assert target.get_ydata()[0] == 2.5 and switch.get_xdata()[0] == 15
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "loss" and ax.get_xlabel() == "step"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["short", "long", "points", "target", "switch"]
    with pytest.raises(ValueError, match="2 x values for 3 points"):
        plotting.curves({"a": ([1, 2], [1, 2, 3])})
    with pytest.raises(ValueError, match="not drawn"):
        plotting.curves({"a": [1, 2]}, styles={"b": {}})
    with pytest.raises(TypeError):
        plotting.curves([1, 2])


def test_image_rows_place_each_row_and_caption():
    rng = np.random.default_rng(0)
    low, high = rng.uniform(size=(3, 10, 8, 1)), rng.uniform(size=(2, 10, 8))
    fig = plotting.image_rows(
        {"low": low, "high": high}, captions={"high": ["0.5", "0.9"]}, title="t"
    )
    (ax,) = fig.axes
    grid = ax.get_images()[0].get_array()
    pad, top = 1, 3
    assert grid.shape == (2 * (10 + pad + top) - pad, 3 * 9 - 1)
    np.testing.assert_allclose(grid[top : top + 10, 9:17], low[1, ..., 0])
    np.testing.assert_allclose(grid[2 * top + 11 : 2 * top + 21, 9:17], high[1])
    assert np.ma.is_masked(grid[2 * top + 11, 18])  # the short row leaves its last cell empty
    assert [t.get_text() for t in ax.texts] == ["0.5", "0.9"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["low", "high"] and ax.get_title() == "t"
    with pytest.raises(ValueError, match="one shape"):
        plotting.image_rows({"a": low, "b": rng.uniform(size=(2, 5, 5))})
    with pytest.raises(ValueError, match="one string per image"):
        plotting.image_rows({"a": low}, captions={"a": ["x"]})


def test_heatmap_origin_lower_for_spectrograms():
    fig = plotting.heatmap(np.arange(6.0).reshape(2, 3), origin="lower", colorbar=False)
    assert fig.axes[0].get_images()[0].origin == "lower"
    with pytest.raises(ValueError, match="origin"):
        plotting.heatmap(np.ones((2, 2)), origin="left")
