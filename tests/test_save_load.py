"""Every Keras model and layer in bookcode saves and loads.

The classes are found, not listed: every ``keras.Model`` or ``keras.layers.Layer``
subclass defined in a ``bookcode`` module must be registered for serialisation,
and every learner (a model with ``predict_episode``) must have a small factory
below, so a new learner without one fails here until it is given one. The round
trip ``model.save`` / ``keras.models.load_model`` must give the same logits on
the same episode.
"""

import importlib
import inspect
import os
import pkgutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest

import bookcode
from bookcode import nets

WAYS, SHOTS, QUERIES = 3, 2, 2


def _bookcode_classes():
    found = {}
    for info in pkgutil.walk_packages(bookcode.__path__, "bookcode."):
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and issubclass(obj, keras.layers.Layer)
                and obj.__module__.startswith("bookcode")
            ):
                found[obj.__qualname__] = obj
    return found


CLASSES = _bookcode_classes()
LEARNERS = {name: c for name, c in CLASSES.items() if hasattr(c, "predict_episode")}
BASES = {"FewShotClassifier", "GradientMetaLearner"}  # subclassed, not used as they are


def _conv(**kwargs):
    return nets.conv4(input_shape=(28, 28, 1), filters=4, **kwargs)


def _dense_embedding():
    return keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(6)])


def _factories():
    """One small instance of every learner, by class name (built lazily)."""
    from bookcode import learned_optimizers as lo
    from bookcode import meta, metric

    def siamese_concatenated():
        return metric.SiameseNetwork(
            metric.concatenate_embeddings(_dense_embedding(), _dense_embedding())
        )

    def caml_model():
        return keras.Sequential(
            [keras.Input((28 * 28 + 4,)), keras.layers.Dense(8, activation="relu"),
             keras.layers.Dense(WAYS)]
        )  # fmt: skip

    return {
        "PrototypicalNetwork": lambda: metric.PrototypicalNetwork(_conv()),
        "GaussianPrototypicalNetwork": lambda: metric.GaussianPrototypicalNetwork(_conv()),
        "SemiSupervisedPrototypicalNetwork": lambda: metric.SemiSupervisedPrototypicalNetwork(
            _conv(), masked=True
        ),
        "SiameseNetwork": siamese_concatenated,
        "RelationNetwork": lambda: metric.RelationNetwork(
            _conv(pooling_blocks=2, padding=["valid", "valid", "same", "same"], flatten=False)
        ),
        "MatchingNetwork": lambda: metric.MatchingNetwork(_conv(), fce=True, processing_steps=2),
        "MAML": lambda: meta.MAML(_conv(num_classes=WAYS), inner_lr=0.1, inner_steps=2),
        "ADML": lambda: meta.ADML(_conv(num_classes=WAYS), epsilon=0.05, inner_steps=1),
        "CAML": None,  # flat inputs: built in the test
        "FineTuning": lambda: meta.FineTuning(_conv(num_classes=WAYS), steps=3),
        "MetaSGD": lambda: meta.MetaSGD(_conv(num_classes=WAYS), rate_seed=0),
        "TAML": lambda: meta.TAML(
            _conv(num_classes=WAYS),
            variant="atkinson",
            weight=0.5,
            measure_options={"epsilon": 1.0},
        ),
        "Reptile": lambda: meta.Reptile(
            _conv(num_classes=WAYS), inner_steps=2, inner_batch=4, transductive=False
        ),
        "MetaLSTMLearner": lambda: lo.MetaLSTMLearner(
            _conv(num_classes=WAYS), steps=2, hidden_size=4
        ),
        "_caml_model": caml_model,
        "ConceptSpaceLearner": lambda: meta.ConceptSpaceLearner(
            keras.Sequential([keras.Input((4,)), keras.layers.Dense(WAYS)]),
            _conv(),
            external_classes=6,
            inner_steps=2,
        ),
    }


def _episode(seed=0, flat=False):
    rng = np.random.default_rng(seed)
    shape = (28 * 28,) if flat else (28, 28, 1)
    support_x = rng.random((WAYS * SHOTS,) + shape, dtype=np.float32)
    query_x = rng.random((WAYS * QUERIES,) + shape, dtype=np.float32)
    support_y = np.repeat(np.arange(WAYS), SHOTS).astype(np.int32)
    return support_x, support_y, query_x


def test_learners_are_found():
    for name in ("PrototypicalNetwork", "SiameseNetwork", "MAML", "MetaLSTMLearner"):
        assert name in LEARNERS, sorted(LEARNERS)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_every_model_and_layer_is_registered(name):
    cls = CLASSES[name]
    registered = keras.saving.get_registered_name(cls)
    assert registered.startswith("bookcode>"), (
        f"{name} is not registered: decorate it with "
        "@keras.saving.register_keras_serializable(package='bookcode')"
    )


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_learner_round_trip_gives_equal_predictions(name, tmp_path):
    factories = _factories()
    cls = LEARNERS[name]
    if name in BASES:
        pytest.skip("a base class: its subclasses are tested")
    assert name in factories, f"add a factory for the new learner {name} to this test"
    if name == "CAML":
        from bookcode import meta

        learner, episode = meta.CAML(factories["_caml_model"](), context_dim=4), _episode(flat=True)
    else:
        learner, episode = factories[name](), _episode()
    before = learner.predict_episode(*episode)
    assert before.shape == (WAYS * QUERIES, WAYS)
    path = tmp_path / f"{name}.keras"
    learner.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is cls
    np.testing.assert_allclose(loaded.predict_episode(*episode), before, rtol=1e-5, atol=1e-5)


def _memory_cells():
    """The recurrent cells of bookcode.memory (layers, not learners), small."""
    from bookcode import memory

    return {
        "NTMCell": lambda: memory.NTMCell(6, 3, memory_slots=5, memory_width=4, read_heads=2),
        "MANNCell": lambda: memory.MANNCell(6, 3, memory_slots=5, memory_width=4, read_heads=2),
    }


@pytest.mark.parametrize("name", ["NTMCell", "MANNCell"])
def test_memory_cell_round_trip_in_a_keras_model(name, tmp_path):
    model = keras.Sequential(
        [keras.Input((4, 5)), keras.layers.RNN(_memory_cells()[name](), return_sequences=True)]
    )
    x = np.random.default_rng(0).random((2, 4, 5), dtype=np.float32)
    before = keras.ops.convert_to_numpy(model(x))
    model.save(tmp_path / f"{name}.keras")
    loaded = keras.models.load_model(tmp_path / f"{name}.keras")
    assert type(loaded.layers[0].cell).__name__ == name
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)), before, rtol=1e-5, atol=1e-6)
