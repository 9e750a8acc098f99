"""The figures the chapters draw: an episode, pairs or rows of images,
learning curves, any set of curves, adaptation curves, embeddings in 2-D,
heat maps (attention, memory weights, Gram matrices, spectrograms), ROC
curves, histograms and robot trajectories.

Every function takes an optional matplotlib ``ax`` to draw into (else it makes
a new figure) and returns the Figure. Arrays may be NumPy arrays or tensors.
"""

from __future__ import annotations

import numpy as np


def show_episode(
    episode_or_support_x,
    support_y=None,
    query_x=None,
    query_y=None,
    *,
    queries_per_class: int = 4,
    class_names=None,
    title: str | None = None,
    cmap: str = "gray_r",
    ax=None,
):
    """An episode as one grid of images: a row per class, its support
    examples then up to ``queries_per_class`` of its queries.

    Pass an :class:`~bookcode.episodes.Episode`, or ``support_x`` (n, H, W[, C]),
    ``support_y`` (n,), ``query_x`` (m, H, W[, C]), ``query_y`` (m,) with
    labels ``0..ways-1``. ``class_names`` label the rows.
    """
    if support_y is None:
        e = episode_or_support_x
        try:
            support_x, support_y, query_x, query_y = e.support_x, e.support_y, e.query_x, e.query_y
        except AttributeError:
            raise TypeError(
                "show_episode takes an Episode, or support_x, support_y, query_x, query_y"
            ) from None
    else:
        support_x = episode_or_support_x
        if query_x is None or query_y is None:
            raise TypeError("show_episode needs query_x and query_y with support_x, support_y")
    support_x, query_x = _images(support_x, "support_x"), _images(query_x, "query_x")
    support_y, query_y = (
        _labels(support_y, support_x, "support_y"),
        _labels(query_y, query_x, "query_y"),
    )
    if support_x.shape[1:] != query_x.shape[1:]:
        raise ValueError(
            f"support images {support_x.shape[1:]} and queries {query_x.shape[1:]} differ"
        )
    ways = int(max(support_y.max(), query_y.max())) + 1
    shots = max(int(np.sum(support_y == c)) for c in range(ways))
    queries = min(queries_per_class, max(int(np.sum(query_y == c)) for c in range(ways)))
    h, w = support_x.shape[1:3]
    pad = max(1, h // 10)
    columns = shots + queries
    grid = np.full(
        (ways * (h + pad) - pad, columns * (w + pad) + pad, *support_x.shape[3:]), np.nan
    )
    if support_x.ndim == 4:  # colour: a white gap instead of a masked one
        grid[:] = 1.0
    for c in range(ways):
        placed = [(j, img) for j, img in enumerate(support_x[support_y == c])]
        placed += [(shots + j, img) for j, img in enumerate(query_x[query_y == c][:queries])]
        for j, img in placed:
            x0 = j * (w + pad) + (2 * pad if j >= shots else 0)  # a wider gap before queries
            grid[c * (h + pad) : c * (h + pad) + h, x0 : x0 + w] = img
    fig, ax = _figure(ax, (0.8 + 0.6 * columns, 0.4 + 0.6 * ways))
    ax.imshow(grid, cmap=cmap, interpolation="nearest")
    ax.grid(False)
    names = class_names if class_names is not None else [f"class {c}" for c in range(ways)]
    if len(names) != ways:
        raise ValueError(f"{len(names)} class_names for {ways} classes")
    ax.set_yticks([c * (h + pad) + h / 2 for c in range(ways)], [str(n) for n in names])
    centres = [shots * (w + pad) / 2, shots * (w + pad) + 2 * pad + queries * (w + pad) / 2]
    ax.set_xticks(centres[: 1 + (queries > 0)], ["support", "queries"][: 1 + (queries > 0)])
    _frameless(ax, title)
    return fig


def _frameless(ax, title):
    """An image grid's axes: no tick marks, no frame, the title if any."""
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title)


def learning_curves(
    history, *, x=None, xlabel: str | None = None, title: str | None = None, logy=False, ax=None
):
    """Training curves from a Keras ``History`` or a dict ``name -> values``.

    Series whose name contains ``loss`` or ``mse`` go on the left axes, the
    others (accuracies ...) on the right; with ``ax`` all share it. ``x`` is
    the position of each point (default: epochs, or training steps when the
    History knows its steps per epoch).
    """
    series = getattr(history, "history", history)
    if not isinstance(series, dict) or not series:
        raise TypeError("learning_curves takes a keras History or a non-empty dict of series")
    series = {name: _vector(values, name) for name, values in series.items()}
    lengths = {len(v) for v in series.values()}
    if len(lengths) != 1:
        raise ValueError(f"series of different lengths: { {k: len(v) for k, v in series.items()} }")
    (n,) = lengths
    steps = getattr(history, "params", {}).get("steps") if hasattr(history, "history") else None
    if x is None:
        x = np.arange(1, n + 1) * (steps or 1)
        xlabel = xlabel or ("training step" if steps else "epoch")
    x = _vector(x, "x")
    if len(x) != n:
        raise ValueError(f"x has {len(x)} points, the series {n}")
    losses = {k: v for k, v in series.items() if "loss" in k or "mse" in k}
    others = {k: v for k, v in series.items() if k not in losses}
    groups = [g for g in (losses, others) if g]
    if ax is not None:
        fig, axes = ax.figure, [ax] * len(groups)
    else:
        fig, axes = _figure(None, (4.5 * len(groups), 3.2), ncols=len(groups))
        axes = np.atleast_1d(axes)
    for a, group in zip(axes, groups):
        for name, values in group.items():
            a.plot(x, values, label=name)
        a.set(xlabel=xlabel or "", yscale="log" if logy and group is losses else "linear")
        a.grid(True, alpha=0.3)
        a.legend()
    if title:
        (fig.suptitle if ax is None else axes[0].set_title)(title)
    if ax is None:
        fig.tight_layout()
    return fig


def curves(
    series,
    *,
    xlabel: str = "step",
    ylabel: str | None = None,
    logy=False,
    hlines=None,
    vlines=None,
    styles=None,
    band=(10, 90),
    title: str | None = None,
    ax=None,
):
    """Curves of any lengths from a dict ``name -> values`` (drawn at x = 0,
    1, 2 ...) or ``name -> (x, values)``.

    A 2-D ``values`` (runs, points) is drawn as its mean with the ``band``
    percentiles shaded. ``hlines`` and ``vlines`` are dotted reference lines,
    dicts ``name -> position``; ``styles`` maps a name to extra
    ``Axes.plot`` keywords (``fmt`` for a format string such as ``"k^"``).
    Integer x values get integer ticks.
    """
    from matplotlib.ticker import MaxNLocator

    if not isinstance(series, dict) or not series:
        raise TypeError("curves takes a non-empty dict name -> values or (x, values)")
    unknown = set(styles or {}) - set(series)
    if unknown:
        raise ValueError(f"styles for curves that are not drawn: {sorted(unknown)}")
    fig, ax = _figure(ax, (5, 3.2))
    integer_x = True
    for name, curve in series.items():
        x, values = curve if isinstance(curve, tuple) else (None, curve)
        values = np.asarray(values, dtype=np.float64)
        if values.ndim not in (1, 2) or values.shape[-1] == 0:
            raise ValueError(
                f"curve {name!r} must be (points,) or (runs, points), got {values.shape}"
            )
        x = np.arange(values.shape[-1]) if x is None else _vector(x, f"{name} x")
        if len(x) != values.shape[-1]:
            raise ValueError(f"curve {name!r}: {len(x)} x values for {values.shape[-1]} points")
        integer_x &= bool(np.all(x == np.round(x)))
        style = dict((styles or {}).get(name, {}))
        fmt = style.pop("fmt", "-")
        mean = values if values.ndim == 1 else values.mean(axis=0)
        (line,) = ax.plot(x, mean, fmt, label=name, **style)
        if values.ndim == 2:
            low, high = np.percentile(values, band, axis=0)
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
    for name, y in (hlines or {}).items():
        ax.axhline(float(y), color="gray", ls=":", lw=1, label=name)
    for name, x in (vlines or {}).items():
        ax.axvline(float(x), color="gray", ls="--", lw=1, label=name)
    ax.set(xlabel=xlabel or "", ylabel=ylabel or "", yscale="log" if logy else "linear")
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if len(series) + len(hlines or {}) + len(vlines or {}) > 1:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return fig


def image_rows(rows, captions=None, *, title: str | None = None, cmap: str = "gray_r", ax=None):
    """Rows of images as one grid: a dict ``row name -> images`` (n, H, W[, C]),
    the names on the left; ``captions`` (a dict ``row name -> strings``) are
    written above the images."""
    if not isinstance(rows, dict) or not rows:
        raise TypeError("image_rows takes a non-empty dict row name -> images")
    rows = {name: _images(images, name) for name, images in rows.items()}
    shapes = {images.shape[1:] for images in rows.values()}
    if len(shapes) != 1:
        raise ValueError(f"every row must hold images of one shape, got {sorted(shapes)}")
    for name, texts in (captions or {}).items():
        if name not in rows or len(texts) != len(rows[name]):
            raise ValueError(f"captions {name!r} must name a row and give one string per image")
    (shape,) = shapes
    h, w = shape[:2]
    pad = max(1, h // 10)
    top = 3 * pad if captions else 0  # room for the captions
    columns = max(len(images) for images in rows.values())
    grid = np.full(
        (len(rows) * (h + pad + top) - pad, columns * (w + pad) - pad, *shape[2:]), np.nan
    )
    fig, ax = _figure(ax, (0.8 + 0.9 * columns, 0.4 + 1.1 * len(rows)))
    for r, (name, images) in enumerate(rows.items()):
        y0 = r * (h + pad + top) + top
        for j, image in enumerate(images):
            grid[y0 : y0 + h, j * (w + pad) : j * (w + pad) + w] = image
            if captions and name in captions:
                ax.text(j * (w + pad) + w / 2, y0 - pad, str(captions[name][j]),
                        ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax.imshow(grid, cmap=cmap, interpolation="nearest")
    ax.grid(False)
    ax.set_xticks([])
    ax.set_yticks([r * (h + pad + top) + top + h / 2 for r in range(len(rows))], list(rows))
    _frameless(ax, title)
    return fig


def adaptation_curve(
    values, *, ylabel: str = "query accuracy", title: str | None = None, logy=False, ax=None
):
    """A metric after 0, 1, 2 ... inner steps of adaptation.

    ``values`` is one curve (steps + 1,), or (tasks, steps + 1) drawn as the
    mean with a 95% confidence band, or a dict ``name -> either`` for several
    learners.
    """
    curves = values if isinstance(values, dict) else {None: values}
    if not curves:
        raise ValueError("adaptation_curve needs at least one curve")
    fig, ax = _figure(ax, (5, 3.2))
    for name, curve in curves.items():
        curve = np.asarray(curve, dtype=np.float64)
        if curve.ndim == 1:
            curve = curve[None]
        if curve.ndim != 2 or curve.shape[1] < 1:
            raise ValueError(
                f"a curve has shape (steps + 1,) or (tasks, steps + 1), got {curve.shape}"
            )
        steps, mean = np.arange(curve.shape[1]), curve.mean(axis=0)
        (line,) = ax.plot(steps, mean, marker="o", label=name)
        if len(curve) > 1:
            ci = 1.96 * curve.std(axis=0) / np.sqrt(len(curve))
            ax.fill_between(steps, mean - ci, mean + ci, color=line.get_color(), alpha=0.2)
    ax.set(xlabel="inner gradient steps", ylabel=ylabel, yscale="log" if logy else "linear")
    ax.set_xticks(steps if len(steps) <= 12 else ax.get_xticks())
    ax.grid(True, alpha=0.3)
    if any(name is not None for name in curves):
        ax.legend()
    if title:
        ax.set_title(title)
    return fig


def embeddings_2d(points, labels, prototypes=None, *, title: str | None = None, ax=None):
    """Embedded examples (dots, a colour per class) and optionally their class
    prototypes (stars, row ``k`` for class ``k``); projected to 2-D by PCA on
    ``points`` when they have more than two dimensions."""
    points = np.asarray(points, dtype=np.float64)
    labels = np.asarray(labels)
    if points.ndim != 2 or len(points) < 2:
        raise ValueError(f"points must be (n >= 2, dims), got shape {points.shape}")
    if labels.shape != (len(points),):
        raise ValueError(f"labels must have shape ({len(points)},), got {labels.shape}")
    centre = points.mean(axis=0)
    if points.shape[1] > 2:
        _, _, components = np.linalg.svd(points - centre, full_matrices=False)
        project = lambda v: (v - centre) @ components[:2].T
    else:
        project = lambda v: v
    fig, ax = _figure(ax, (5, 4))
    classes = np.unique(labels)
    xy = project(points)
    for i, k in enumerate(classes):
        ax.scatter(*xy[labels == k].T, s=12, color=f"C{i % 10}", alpha=0.6, label=str(k))
    if prototypes is not None:
        prototypes = np.asarray(prototypes, dtype=np.float64)
        if prototypes.ndim != 2 or prototypes.shape[1] != points.shape[1]:
            raise ValueError(
                f"prototypes must be (classes, {points.shape[1]}), got shape {prototypes.shape}"
            )
        colours = [f"C{i % 10}" for i in range(len(prototypes))]
        ax.scatter(*project(prototypes).T, marker="*", s=250, c=colours, edgecolor="black")
    ax.set_xticks([]), ax.set_yticks([])
    ax.set(
        xlabel="PC 1" if points.shape[1] > 2 else "", ylabel="PC 2" if points.shape[1] > 2 else ""
    )
    if title:
        ax.set_title(title)
    return fig


def heatmap(
    matrix,
    *,
    xlabel: str | None = None,
    ylabel: str | None = None,
    title: str | None = None,
    cmap: str = "viridis",
    colorbar: bool = True,
    origin: str = "upper",
    ax=None,
):
    """A 2-D array as an image with a colour bar: attention or memory
    read/write weights (time x slots), Gram or distance matrices; a
    spectrogram (bands x frames) with ``origin="lower"``."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise ValueError(f"heatmap takes a non-empty 2-D array, got shape {matrix.shape}")
    fig, ax = _figure(ax, (5, 4))
    if origin not in ("upper", "lower"):
        raise ValueError(f'origin must be "upper" or "lower", got {origin!r}')
    image = ax.imshow(matrix, cmap=cmap, aspect="auto", interpolation="nearest", origin=origin)
    ax.grid(False)
    ax.set(xlabel=xlabel or "", ylabel=ylabel or "")
    if colorbar:
        fig.colorbar(image, ax=ax)
    if title:
        ax.set_title(title)
    return fig


def show_pairs(left, right, same=None, *, title: str | None = None, cmap: str = "gray", ax=None):
    """Pairs of images as one grid: a column per pair, ``left`` on the top
    row, ``right`` below; ``same`` (1 same class, 0 different) labels the
    columns "same" / "different"."""
    left, right = _images(left, "left"), _images(right, "right")
    if left.shape != right.shape:
        raise ValueError(f"left {left.shape} and right {right.shape} must have the same shape")
    n, h, w = left.shape[:3]
    pad = max(1, h // 10)
    grid = np.full((2 * h + pad, n * (w + pad) - pad, *left.shape[3:]), np.nan)
    for i in range(n):
        grid[:h, i * (w + pad) : i * (w + pad) + w] = left[i]
        grid[h + pad :, i * (w + pad) : i * (w + pad) + w] = right[i]
    fig, ax = _figure(ax, (0.9 + 1.0 * n, 2.6))
    ax.imshow(grid, cmap=cmap, interpolation="nearest")
    ax.grid(False)
    ax.set_yticks([])
    if same is not None:
        same = np.asarray(same).reshape(-1)
        if len(same) != n:
            raise ValueError(f"same has {len(same)} labels for {n} pairs")
        ax.set_xticks(
            [i * (w + pad) + w / 2 for i in range(n)],
            ["same" if s else "different" for s in same],
            fontsize=8,
        )
    else:
        ax.set_xticks([])
    _frameless(ax, title)
    return fig


def roc_curves(curves, *, title: str | None = None, ax=None):
    """ROC curves from a dict ``name -> (false positive rates, true positive
    rates)``, with the diagonal of a guess; the legend sits lower right."""
    if not isinstance(curves, dict) or not curves:
        raise TypeError("roc_curves takes a non-empty dict name -> (fpr, tpr)")
    fig, ax = _figure(ax, (4.5, 3.6))
    for i, (name, curve) in enumerate(curves.items()):
        try:
            fpr, tpr = curve
        except (TypeError, ValueError):
            raise ValueError(f"curve {name!r} must be a pair (fpr, tpr)") from None
        fpr, tpr = _vector(fpr, f"{name} fpr"), _vector(tpr, f"{name} tpr")
        if len(fpr) != len(tpr):
            raise ValueError(f"curve {name!r}: {len(fpr)} false and {len(tpr)} true positive rates")
        ax.plot(fpr, tpr, "-" if i == 0 else "--", label=name)
    ax.plot([0, 1], [0, 1], ":", color="gray", label="guessing")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    return fig


def histograms(
    groups,
    *,
    bins=30,
    xlabel: str | None = None,
    ylabel: str = "count",
    marks=None,
    title: str | None = None,
    ax=None,
):
    """Overlaid histograms from a dict ``name -> values`` on shared ``bins``,
    and optional vertical lines ``marks`` (a dict ``name -> x``)."""
    if not isinstance(groups, dict) or not groups:
        raise TypeError("histograms takes a non-empty dict name -> values")
    groups = {name: _vector(values, name) for name, values in groups.items()}
    if np.isscalar(bins):
        everything = np.concatenate(list(groups.values()))
        bins = np.linspace(everything.min(), everything.max(), int(bins) + 1)
    fig, ax = _figure(ax, (4.5, 3.2))
    for name, values in groups.items():
        ax.hist(values, bins, alpha=0.6, label=name)
    for name, x in (marks or {}).items():
        ax.axvline(float(x), color="k", ls="--", label=name)
    ax.set(xlabel=xlabel or "", ylabel=ylabel)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return fig


def trajectories(
    paths,
    goals=None,
    *,
    starts: bool = True,
    labels=None,
    square=(-0.5, 0.5),
    title: str | None = None,
    ax=None,
):
    """Paths of a 2-D robot, each a line from its start (a dot) with its goal
    (a cross, same colour; one black cross for a goal shared by all paths),
    in the task square ``square`` (dashed). ``paths``
    is (n, T, 2) or one path (T, 2); ``goals`` (n, 2) or (2,); ``labels`` one
    legend entry per path. For the point-navigation tasks of
    :mod:`bookcode.control` (Finn et al. 2017, figure 5)."""
    paths = np.asarray(paths, dtype=np.float64)
    if paths.ndim == 2:
        paths = paths[None]
    if paths.ndim != 3 or paths.shape[-1] != 2 or 0 in paths.shape:
        raise ValueError(f"paths must be (n, T, 2) or (T, 2), got shape {paths.shape}")
    shared_goal = None
    if goals is not None:
        goals = np.asarray(goals, dtype=np.float64).reshape(-1, 2)
        if len(goals) not in (1, len(paths)):
            raise ValueError(f"{len(goals)} goals for {len(paths)} paths: give 1 or {len(paths)}")
        if len(goals) == 1 and len(paths) > 1:
            shared_goal, goals = goals[0], None
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} paths")
    fig, ax = _figure(ax, (4, 4))
    if square is not None:
        low, high = square
        ax.plot([low, high, high, low, low], [low, low, high, high, low], "k--", lw=0.8, alpha=0.5)
    for i, path in enumerate(paths):
        colour = f"C{i % 10}"
        ax.plot(*path.T, color=colour, lw=1.2, label=None if labels is None else str(labels[i]))
        if starts:
            ax.plot(*path[0], "o", color=colour, ms=4)
        if goals is not None:
            ax.plot(*goals[i], "x", color=colour, ms=9, mew=2)
    if shared_goal is not None:
        ax.plot(*shared_goal, "x", color="black", ms=10, mew=2.5, label="goal")
    ax.set_aspect("equal")
    ax.grid(True, alpha=0.3)
    if labels is not None:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return fig


def _figure(ax, figsize, ncols=1):
    if ax is not None:
        return ax.figure, ax
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=figsize)


def _images(x, name):
    x = np.asarray(x).astype(np.float64)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (3, 4)) or not len(x):
        raise ValueError(
            f"{name} must be images (n, H, W), (n, H, W, 1) or (n, H, W, 3); got {x.shape}"
        )
    return x


def _labels(y, x, name):
    y = np.asarray(y)
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise ValueError(
            f"{name} must be {len(x)} integer labels 0..ways-1, got {y.dtype} {y.shape}"
        )
    return y


def _vector(values, name):
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or not len(values):
        raise ValueError(f"{name} must be a non-empty 1-D series, got shape {values.shape}")
    return values
