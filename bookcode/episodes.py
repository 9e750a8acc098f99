"""Examples grouped by class, and N-way K-shot episodes drawn from them.

An episode (Vinyals et al. 2016, "Matching Networks for One Shot Learning")
is a small classification problem: ``ways`` classes drawn from a dataset,
``shots`` labelled support examples per class and ``queries`` query examples
per class to classify. Labels are remapped to ``0 .. ways-1`` in every episode,
so a learner can never memorise a class by its global index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ClassDataset:
    """Examples ``x`` with integer class labels ``y`` and a name per class.

    ``metadata`` holds extra per-example arrays (for example speaker and take
    of a spoken digit) that :meth:`where` can filter on.
    """

    x: np.ndarray
    y: np.ndarray
    class_names: list[str]
    metadata: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        self.y = np.asarray(self.y, dtype=np.int64)
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} examples but y has {len(self.y)} labels")
        if len(self.y) and (self.y.min() < 0 or self.y.max() >= len(self.class_names)):
            raise ValueError(f"labels must lie in 0..{len(self.class_names) - 1}")
        order = np.argsort(self.y, kind="stable")
        counts = np.bincount(self.y, minlength=len(self.class_names))
        self._indices = np.split(order, np.cumsum(counts)[:-1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def example_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def examples_per_class(self) -> np.ndarray:
        """Number of examples of each class, shape (num_classes,)."""
        return np.array([len(i) for i in self._indices])

    def indices_of(self, label: int) -> np.ndarray:
        """Positions in ``x`` of the examples of class ``label``."""
        return self._indices[label]

    def where(self, mask) -> ClassDataset:
        """The examples where ``mask`` is true; classes left empty are dropped
        and the remaining ones renumbered ``0..``."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.y.shape:
            raise ValueError(f"mask must have shape {self.y.shape}, got {mask.shape}")
        kept = np.unique(self.y[mask])
        remap = np.full(self.num_classes, -1)
        remap[kept] = np.arange(len(kept))
        return ClassDataset(
            x=self.x[mask],
            y=remap[self.y[mask]],
            class_names=[self.class_names[i] for i in kept],
            metadata={k: v[mask] for k, v in self.metadata.items()},
        )

    def classes(self, labels) -> ClassDataset:
        """The sub-dataset of the given class labels (renumbered in that order)."""
        labels = np.asarray(labels)
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if len(bad):
            raise ValueError(f"unknown class labels {bad.tolist()}; there are {self.num_classes}")
        picked = np.concatenate([self._indices[c] for c in labels])
        remap = np.full(self.num_classes, -1)
        remap[labels] = np.arange(len(labels))
        return ClassDataset(
            x=self.x[picked],
            y=remap[self.y[picked]],
            class_names=[self.class_names[i] for i in labels],
            metadata={k: v[picked] for k, v in self.metadata.items()},
        )

    def __repr__(self):
        counts = self.examples_per_class()
        lo, hi = (counts.min(), counts.max()) if len(counts) else (0, 0)
        per = f"{lo}" if lo == hi else f"{lo}-{hi}"
        return (
            f"ClassDataset({self.num_classes} classes x {per} examples, "
            f"example shape {self.example_shape}, dtype {self.x.dtype})"
        )


@dataclass
class Episode:
    """One few-shot task. Labels are in ``0..ways-1``.

    Shapes: ``support_x`` (ways*shots, ...), ``support_y`` (ways*shots,),
    ``query_x`` (ways*queries, ...), ``query_y`` (ways*queries,). A meta-batch
    of episodes has one more leading axis on every array. ``unlabeled_x``
    holds the unlabelled examples of semi-supervised episodes (Ren et al.
    2018), and ``unlabeled_y`` their true labels (``-1`` for distractors),
    kept for analysis only.
    """

    support_x: np.ndarray
    support_y: np.ndarray
    query_x: np.ndarray
    query_y: np.ndarray
    classes: np.ndarray
    unlabeled_x: np.ndarray | None = None
    unlabeled_y: np.ndarray | None = None

    @property
    def ways(self) -> int:
        return int(self.classes.shape[-1])

    def inputs(self):
        """``(support_x, support_y, query_x)``: the arguments of ``predict_episode``."""
        return self.support_x, self.support_y, self.query_x

    def extras(self) -> dict[str, np.ndarray]:
        """Optional further inputs, by name: ``{"unlabeled_x": ...}`` for
        semi-supervised episodes, else ``{}``. ``evaluate`` passes them as keyword
        arguments of ``predict_episode`` to learners that take them."""
        return {} if self.unlabeled_x is None else {"unlabeled_x": self.unlabeled_x}


def _check_positive(**values):
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class EpisodeSampler:
    """Draws N-way K-shot episodes from a :class:`ClassDataset`.

    Classes are drawn without replacement within an episode, and examples
    without replacement within a class, so support and query never share an
    example. The same ``seed`` gives the same sequence of episodes.

    ``unlabeled`` adds that many unlabelled examples per episode class, and
    ``distractors`` adds that many further classes whose ``unlabeled`` examples
    are unlabelled too (semi-supervised episodes, Ren et al. 2018).

    >>> sampler = EpisodeSampler(dataset, ways=5, shots=1, queries=15, seed=0)
    >>> episode = sampler.sample()
    """

    def __init__(
        self,
        dataset: ClassDataset,
        ways: int,
        shots: int,
        queries: int,
        seed: int | None = None,
        unlabeled: int = 0,
        distractors: int = 0,
    ):
        _check_positive(ways=ways, shots=shots, queries=queries)
        if unlabeled < 0 or distractors < 0:
            raise ValueError("unlabeled and distractors must be zero or positive")
        if distractors and not unlabeled:
            raise ValueError("distractors need unlabeled > 0 (examples per distractor class)")
        needed_classes = ways + distractors
        if needed_classes > dataset.num_classes:
            raise ValueError(
                f"an episode needs {needed_classes} classes (ways={ways}, "
                f"distractors={distractors}) but the dataset has only "
                f"{dataset.num_classes}; lower ways or use a larger split"
            )
        per_class = shots + queries + unlabeled
        counts = dataset.examples_per_class()
        eligible = np.flatnonzero(counts >= per_class)
        if len(eligible) < needed_classes:
            raise ValueError(
                f"each episode class needs shots + queries + unlabeled = {per_class} "
                f"examples, but only {len(eligible)} of {dataset.num_classes} classes have "
                f"that many (the smallest has {counts.min()}); lower shots or queries"
            )
        self.dataset = dataset
        self.ways, self.shots, self.queries = ways, shots, queries
        self.unlabeled, self.distractors = unlabeled, distractors
        self.seed = seed
        self._eligible = eligible
        self._rng = np.random.default_rng(seed)

    def __repr__(self):
        extra = f", unlabeled={self.unlabeled}, distractors={self.distractors}" * bool(
            self.unlabeled
        )
        return (
            f"EpisodeSampler({self.ways}-way {self.shots}-shot, {self.queries} queries "
            f"per class{extra}, {len(self._eligible)} classes)"
        )

    def _draw(self, rng: np.random.Generator) -> Episode:
        ds = self.dataset
        picked = rng.choice(self._eligible, size=self.ways + self.distractors, replace=False)
        classes = picked[: self.ways]
        k, q, u = self.shots, self.queries, self.unlabeled
        # Examples without replacement within each class, all classes at once:
        # random keys, padding positions sorted last, the first k+q+u kept.
        table, counts = self._index_table
        keys = rng.random((len(picked), table.shape[1]))
        keys[np.arange(table.shape[1]) >= counts[picked][:, None]] = np.inf
        chosen = np.take_along_axis(table[picked], np.argsort(keys, axis=1), axis=1)
        ways = self.ways
        episode = Episode(
            support_x=ds.x[chosen[:ways, :k].ravel()],
            support_y=np.repeat(np.arange(ways), k),
            query_x=ds.x[chosen[:ways, k : k + q].ravel()],
            query_y=np.repeat(np.arange(ways), q),
            classes=classes,
        )
        if u:
            episode.unlabeled_x = ds.x[chosen[:, k + q : k + q + u].ravel()]
            labels = np.concatenate([np.arange(ways), np.full(self.distractors, -1)])
            episode.unlabeled_y = np.repeat(labels, u)
        return episode

    @property
    def _index_table(self):
        """(num_classes, max_count) positions of each class's examples, padded, and the counts."""
        if not hasattr(self, "_table"):
            counts = self.dataset.examples_per_class()
            table = np.zeros((len(counts), counts.max()), np.int64)
            for c, count in enumerate(counts):
                table[c, :count] = self.dataset.indices_of(c)
            self._table = table, counts
        return self._table

    def sample(self) -> Episode:
        """The next episode of this sampler's random stream."""
        return self._draw(self._rng)

    def sample_batch(self, batch_size: int) -> Episode:
        """A meta-batch: ``batch_size`` episodes stacked on a new leading axis."""
        _check_positive(batch_size=batch_size)
        return stack([self.sample() for _ in range(batch_size)])

    def fixed(self, num_episodes: int, seed: int = 1234) -> list[Episode]:
        """A reproducible evaluation set: the same ``num_episodes`` episodes for
        the same ``seed``, whatever was sampled before."""
        _check_positive(num_episodes=num_episodes)
        rng = np.random.default_rng(seed)
        return [self._draw(rng) for _ in range(num_episodes)]

    def tf_dataset(self, batch_size: int | None = None, prefetch: int = 2):
        """An endless ``tf.data.Dataset`` for ``model.fit``.

        Elements are ``((support_x, support_y, query_x), query_y)``, with a
        leading meta-batch axis when ``batch_size`` is given. Use it with
        ``steps_per_epoch``. Semi-supervised samplers add the episode's extras
        as a fourth input, ``{"unlabeled_x": ...}`` (see :meth:`Episode.extras`).
        """

        def element():
            e = self.sample() if batch_size is None else self.sample_batch(batch_size)
            inputs = (e.support_x, e.support_y.astype(np.int32), e.query_x)
            if e.extras():
                inputs = inputs + (e.extras(),)
            return inputs, e.query_y.astype(np.int32)

        return endless_dataset(element, prefetch)


def stack(episodes: list[Episode]) -> Episode:
    """Stack episodes of one shape into a meta-batch (new leading axis)."""

    def join(name):
        values = [getattr(e, name) for e in episodes]
        return None if values[0] is None else np.stack(values)

    return Episode(**{name: join(name) for name in Episode.__dataclass_fields__})


class PairSampler:
    """Balanced same/different pairs from a :class:`ClassDataset`.

    Each draw is a 2-way 1-shot episode with one query per class from the
    episode sampler: the first support example paired with the first query
    (same class) and with the second query (different class). So the two
    images of a pair are never the same example, and the pairs are exactly
    half positive. Labels: 1 for same class, 0 for different.
    """

    def __init__(self, dataset: ClassDataset, seed: int | None = None):
        self.episodes = EpisodeSampler(dataset, ways=2, shots=1, queries=1, seed=seed)

    def _pairs(self, episodes):
        left, right, same = [], [], []
        for e in episodes:
            anchor = e.support_x[0]
            left += [anchor, anchor]
            right += [e.query_x[0], e.query_x[1]]
            same += [1, 0]
        return np.stack(left), np.stack(right), np.array(same, dtype=np.float32)

    def sample(self, num_pairs: int):
        """``(left, right, same)``: ``num_pairs`` pairs (even), half of them same-class."""
        if num_pairs < 2 or num_pairs % 2:
            raise ValueError(f"num_pairs must be a positive even number, got {num_pairs}")
        return self._pairs(self.episodes.sample() for _ in range(num_pairs // 2))

    def fixed(self, num_pairs: int, seed: int = 1234):
        """A reproducible set of ``num_pairs`` pairs for evaluation."""
        if num_pairs < 2 or num_pairs % 2:
            raise ValueError(f"num_pairs must be a positive even number, got {num_pairs}")
        return self._pairs(self.episodes.fixed(num_pairs // 2, seed=seed))

    def tf_dataset(self, batch_size: int, prefetch: int = 2):
        """An endless ``tf.data.Dataset`` of ``((left, right), same)`` batches for ``fit``."""

        def element():
            left, right, same = self.sample(batch_size)
            return (left, right), same

        return endless_dataset(element, prefetch)


def endless_dataset(element, prefetch: int = 2):
    """An endless ``tf.data.Dataset`` of ``element()`` results (nested tuples
    and dicts of arrays), the tf.data adapter of every sampler. The signature
    (shapes and dtypes) is read off a first element, drawn now and yielded
    first, so the stream of elements is the sampler's own."""
    import tensorflow as tf

    pending = [element()]
    signature = tf.nest.map_structure(
        lambda a: tf.TensorSpec(np.shape(a), tf.as_dtype(np.asarray(a).dtype)), pending[0]
    )

    def generate():
        while True:
            yield pending.pop() if pending else element()

    return tf.data.Dataset.from_generator(generate, output_signature=signature).prefetch(prefetch)


def shuffle_labels(batch: Episode, fraction: float, rng=None, sets=("support", "query")):
    """Label noise for a meta-batch (an :class:`Episode` with a leading task
    axis, e.g. from :meth:`EpisodeSampler.sample_batch`): the labels of the
    first ``round(fraction * tasks)`` tasks are randomly permuted across their
    examples, in each of ``sets`` separately, so that the label no longer
    depends on the image. (With one shot, permuting the support labels only
    renames the classes; the shuffled queries are what makes the task noise.)

    Returns ``(noisy_batch, corrupted)``: a copy of the batch and a boolean
    mask of shape (tasks,). The corrupted tasks come first; gradient
    combiners treat the tasks of a batch alike, so their place does not
    matter. ``rng`` is a ``numpy.random.Generator`` or a seed.
    """
    tasks = batch.support_y.shape[0] if np.ndim(batch.support_y) == 2 else 0
    if not tasks:
        raise ValueError(
            "shuffle_labels takes a meta-batch with a leading task axis (sample_batch), "
            f"got support_y of shape {np.shape(batch.support_y)}"
        )
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction!r}")
    unknown = set(sets) - {"support", "query"}
    if unknown or not sets:
        raise ValueError(f"sets must name 'support' and/or 'query', got {sets!r}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    corrupted = np.arange(tasks) < round(fraction * tasks)
    noisy = Episode(**{k: getattr(batch, k) for k in Episode.__dataclass_fields__})
    for name in sets:
        labels = getattr(batch, f"{name}_y").copy()
        for i in np.flatnonzero(corrupted):
            labels[i] = rng.permutation(labels[i])
        setattr(noisy, f"{name}_y", labels)
    return noisy, corrupted


@dataclass
class LabelSequence:
    """One episode of Santoro et al. (2016) as a sequence, or a batch of them
    (one more leading axis on every array).

    ``x`` (time, ...): the examples, ``ways`` classes x ``instances`` each,
    shuffled; ``y`` (time,) their labels in ``0..ways-1`` (or (time, 5) digits
    in ``0..4`` with string labels); ``previous`` (time, label_size): the
    previous step's label, one-hot (zeros at the first step), fed with ``x``;
    ``instance`` (time,): which presentation of its class each step is (0 for
    the first); ``classes`` (ways,): dataset classes in label order.
    """

    x: np.ndarray
    y: np.ndarray
    previous: np.ndarray
    instance: np.ndarray
    classes: np.ndarray

    def inputs(self) -> np.ndarray:
        """``concat(flatten(x), previous)`` per step, float32: (..., time, features + label_size)."""
        lead = self.previous.shape[:-1]
        flat = self.x.reshape(lead + (-1,)).astype(np.float32)
        return np.concatenate([flat, self.previous.astype(np.float32)], axis=-1)


def instance_numbers(labels) -> np.ndarray:
    """For every step, how many times its label was seen before (0 for a
    first presentation). ``labels``: (time,) or (batch, time) integers (encode
    string labels as one integer per step first)."""
    labels = np.asarray(labels)
    if labels.ndim not in (1, 2) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be integers of shape (time,) or (batch, time), got {labels.dtype} "
            f"{labels.shape}"
        )
    squeeze = labels.ndim == 1
    labels = np.atleast_2d(labels)
    counts = np.zeros(labels.shape, np.int64)
    for row, sequence in enumerate(labels):
        seen: dict = {}
        for t, label in enumerate(sequence.tolist()):
            counts[row, t] = seen.get(label, 0)
            seen[label] = counts[row, t] + 1
    return counts[0] if squeeze else counts


class SequenceSampler:
    """Episodes as labelled sequences (Santoro et al. 2016, section 4.1).

    Each episode draws ``ways`` classes and ``instances`` examples of each
    (through :class:`EpisodeSampler`: same checks and errors), shuffles the
    ``ways * instances`` examples into one sequence, gives the classes a new
    random labelling, and feeds each step's example with the *previous* step's
    label, so a model must remember an example until its label arrives.

    ``labels="one_hot"`` (default): labels ``0..ways-1``, fed as one-hot
    vectors of size ``ways``. ``labels="string"``: every class gets a random
    string of five characters from an alphabet of five (distinct strings in
    an episode), fed as five concatenated one-hot vectors (size 25) and
    predicted character by character, as in the paper for 15 or more classes.
    """

    STRING_LENGTH, ALPHABET = 5, 5

    def __init__(
        self,
        dataset: ClassDataset,
        ways: int = 5,
        instances: int = 10,
        seed: int | None = None,
        labels: str = "one_hot",
    ):
        _check_positive(ways=ways, instances=instances)
        if labels not in ("one_hot", "string"):
            raise ValueError(f"labels must be 'one_hot' or 'string', got {labels!r}")
        if instances < 2:
            raise ValueError(f"instances must be at least 2, got {instances}")
        # one support and instances - 1 queries per class: the episode sampler
        # checks that the dataset has enough classes and examples
        self.episodes = EpisodeSampler(
            dataset, ways=ways, shots=1, queries=instances - 1, seed=seed
        )
        self.ways, self.instances, self.labels = ways, instances, labels
        self.seed = seed
        self._rng = np.random.default_rng(None if seed is None else seed + 1)

    @property
    def label_size(self) -> int:
        """Size of the fed label vector: ``ways`` one-hot, or 25 for strings."""
        return self.ways if self.labels == "one_hot" else self.STRING_LENGTH * self.ALPHABET

    def __repr__(self):
        return (
            f"SequenceSampler({self.ways} classes x {self.instances} instances, "
            f"{self.labels} labels, {len(self.episodes._eligible)} classes)"
        )

    def _sequence(self, episode: Episode, rng) -> LabelSequence:
        ways, k = self.ways, self.instances
        query = episode.query_x.reshape((ways, k - 1) + episode.query_x.shape[1:])
        x = np.concatenate([episode.support_x[:, None], query], axis=1)
        x = x.reshape((ways * k,) + x.shape[2:])
        relabel = rng.permutation(ways)
        y = relabel[np.repeat(np.arange(ways), k)]
        order = rng.permutation(ways * k)
        x, y = x[order], y[order]
        classes = np.empty(ways, episode.classes.dtype)
        classes[relabel] = episode.classes
        instance = instance_numbers(y)
        if self.labels == "one_hot":
            fed = np.eye(ways, dtype=np.float32)[y]
        else:
            codes = self._strings(rng)  # (ways, 5)
            y = codes[y]
            fed = np.eye(self.ALPHABET, dtype=np.float32)[y].reshape(len(y), -1)
        previous = np.concatenate([np.zeros_like(fed[:1]), fed[:-1]])
        return LabelSequence(x=x, y=y, previous=previous, instance=instance, classes=classes)

    def _strings(self, rng) -> np.ndarray:
        total = self.ALPHABET**self.STRING_LENGTH
        if self.ways > total:
            raise ValueError(f"string labels allow at most {total} classes, got {self.ways}")
        picked = rng.choice(total, size=self.ways, replace=False)
        digits = (picked[:, None] // self.ALPHABET ** np.arange(self.STRING_LENGTH)) % self.ALPHABET
        return digits.astype(np.int64)

    def sample(self) -> LabelSequence:
        """The next sequence of this sampler's random stream."""
        return self._sequence(self.episodes.sample(), self._rng)

    def sample_batch(self, batch_size: int) -> LabelSequence:
        """``batch_size`` sequences stacked on a new leading axis."""
        _check_positive(batch_size=batch_size)
        return _stack_sequences([self.sample() for _ in range(batch_size)])

    def fixed(self, num_sequences: int, seed: int = 1234) -> LabelSequence:
        """A reproducible evaluation batch: the same ``num_sequences`` sequences
        for the same ``seed``, whatever was sampled before."""
        _check_positive(num_sequences=num_sequences)
        rng = np.random.default_rng(seed)
        episodes = self.episodes.fixed(num_sequences, seed=seed)
        return _stack_sequences([self._sequence(e, rng) for e in episodes])

    def tf_dataset(self, batch_size: int, prefetch: int = 2):
        """An endless ``tf.data.Dataset`` of ``(inputs, y)`` batches for
        ``fit``: inputs (batch, time, features + label_size) from
        :meth:`LabelSequence.inputs`, y (batch, time) or (batch, time, 5)."""

        def element():
            batch = self.sample_batch(batch_size)
            return batch.inputs(), batch.y.astype(np.int32)

        return endless_dataset(element, prefetch)


def _stack_sequences(sequences: list[LabelSequence]) -> LabelSequence:
    return LabelSequence(
        **{
            k: np.stack([getattr(s, k) for s in sequences])
            for k in LabelSequence.__dataclass_fields__
        }
    )
