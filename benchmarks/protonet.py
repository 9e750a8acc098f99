"""Prototypical network benchmarks (chapter 3).

1. Training throughput: episodes per second for 5-way 5-shot episodes with 15
   queries per class, Conv-4 on 28x28 Omniglot, fed by
   ``EpisodeSampler.tf_dataset()`` through ``fit()``. Compared with the plain
   PyTorch implementation measured on this machine (14.5 episodes/s, ANCHORS.md).
   The first row is the model a reader gets with defaults,
   ``PrototypicalNetwork()`` (with a package that has no default embedding,
   e.g. the baseline, ``PrototypicalNetwork(nets.conv4())``).
2. Time to reach 95% 5-way 1-shot accuracy on 100 fixed validation episodes,
   training as chapter 3 does (60-way 1-shot, 5 queries, Adam 1e-3).
3. ``--train-seconds 120``: train ``PrototypicalNetwork()`` (defaults) on
   20-way 5-shot Omniglot-train episodes (5 queries per class) with Adam
   (``--learning-rate``, default 1e-3; ``--decay-over-budget``: the rate falls
   linearly to 0 over the seconds) for that many seconds of wall time, then
   report 5-way 1-shot accuracy on 600 fixed episodes (15 queries per class)
   of Omniglot-test, or of ``--split val`` for choices.
4. ``--train-episodes 250,500,750``: the same training, measured in episodes
   instead of seconds (independent of the machine's load): accuracy and CPU
   seconds after each number of episodes, one training run
   (``--decay-episodes N``: the rate falls linearly to 0 over N episodes).

``--onednn on|off`` sets ``TF_ENABLE_ONEDNN_OPTS`` before TensorFlow is
imported (default: TensorFlow's own choice, which turns oneDNN on only on
CPUs with AVX512-VNNI, AVX512-BF16, AVX-VNNI or AMX; on an AVX2-only CPU it
is off and the convolutions and batch norm take TensorFlow's Eigen kernels,
2-3x slower here). The output says which was used.

Usage::

    BOOKCODE_DATA=/path/to/data python benchmarks/protonet.py [--skip-time-to-accuracy]
    BOOKCODE_DATA=/path/to/data python benchmarks/protonet.py --train-seconds 120 [--onednn on] \
        [--learning-rate 4e-3 --decay-over-budget] [--seed 1]
    BOOKCODE_DATA=/path/to/data python benchmarks/protonet.py --train-episodes 250,500 \
        --split val [--learning-rate 4e-3 --decay-episodes 1000] [--onednn on]

Prints a Markdown section; paste it under ``## Prototypical networks`` in
``benchmarks/RESULTS.md``. The machine is often shared: the load average is
printed with the results.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _onednn_option():
    """``--onednn on|off|default``, read before TensorFlow is imported (the
    variable is read once, at import)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--onednn", choices=("default", "on", "off"), default="default")
    choice = parser.parse_known_args()[0].onednn
    if choice != "default":
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1" if choice == "on" else "0"
    return choice


_onednn_option()

import keras  # after the oneDNN choice

from bookcode import nets
from bookcode.datasets import omniglot
from bookcode.episodes import EpisodeSampler
from bookcode.evaluation import evaluate
from bookcode.metric import PrototypicalNetwork

PYTORCH_EPISODES_PER_SECOND = 14.5


def load_average() -> str:
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def onednn() -> str:
    """Whether TensorFlow runs its oneDNN kernels in this process, and why."""
    state = "on" if nets.onednn_enabled() else "off"
    forced = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    return (
        f"oneDNN {state} ({f'TF_ENABLE_ONEDNN_OPTS={forced}' if forced else 'TensorFlow default'})"
    )


def make_model(fast: bool | None, learning_rate: float = 1e-3) -> PrototypicalNetwork:
    """``fast=None``: the defaults; else Conv-4 with or without fused batch norm."""
    if fast is None:
        try:
            model = PrototypicalNetwork()
        except TypeError:  # a package without a default embedding
            model = PrototypicalNetwork(nets.conv4())
    else:
        embedding = nets.conv4(fused_batch_norm=fast, batch_norm_momentum=0.9)
        model = PrototypicalNetwork(embedding)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate))
    return model


def timed_fit(model, dataset, steps: int) -> tuple[float, float]:
    """``steps`` training episodes through ``fit()``: (wall s, CPU s)."""
    wall, cpu = time.perf_counter(), time.process_time()
    model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0)
    return time.perf_counter() - wall, time.process_time() - cpu


def throughput(train, fast, episodes: int = 300, warmup: int = 20) -> tuple[float, float]:
    """Training episodes per second (wall) and CPU seconds per episode;
    ``fast=True`` also sets the ``mixed_bfloat16`` policy."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if fast else "float32")
    model = make_model(fast)
    dataset = EpisodeSampler(train, ways=5, shots=5, queries=15, seed=0).tf_dataset()
    model.fit(dataset, steps_per_epoch=warmup, epochs=1, verbose=0)
    wall, cpu = timed_fit(model, dataset, episodes)
    keras.mixed_precision.set_global_policy("float32")
    return episodes / wall, cpu / episodes


def time_to_accuracy(train, val, target=0.95, every=25, limit=2000):
    """Wall and CPU seconds of training (evaluation excluded) until 5-way 1-shot
    validation accuracy reaches ``target``, and the episodes it took."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    keras.utils.set_random_seed(3)
    model = make_model(fast=True)
    dataset = EpisodeSampler(train, ways=60, shots=1, queries=5, seed=0).tf_dataset()
    episodes = EpisodeSampler(val, 5, 1, 15).fixed(100, seed=1)
    wall = cpu = 0.0
    for seen in range(every, limit + 1, every):
        w, c = timed_fit(model, dataset, every)
        wall, cpu = wall + w, cpu + c
        accuracy = evaluate(model, episodes).mean
        if accuracy >= target:
            return wall, cpu, seen, accuracy
    return wall, cpu, None, accuracy


def _train_setup(split="test", learning_rate=1e-3, queries=5, decay_episodes=None, seed=0):
    """The default model, its 20-way 5-shot training episodes and 600 fixed
    5-way 1-shot episodes of ``split`` (``val`` for choices, ``test`` once).
    ``decay_episodes``: Adam's rate falls linearly to 0 over that many episodes.
    ``seed``: the weights' and the training episodes' (the scored episodes are fixed)."""
    keras.utils.set_random_seed(seed)
    train, scored = omniglot("train"), omniglot(split)
    if decay_episodes:
        learning_rate = keras.optimizers.schedules.PolynomialDecay(
            learning_rate, decay_episodes, end_learning_rate=0.0
        )
    model = make_model(None, learning_rate)
    dataset = EpisodeSampler(train, ways=20, shots=5, queries=queries, seed=seed).tf_dataset()
    episodes = EpisodeSampler(scored, ways=5, shots=1, queries=15).fixed(600, seed=2024)
    return model, dataset, episodes


class TimeBudget(keras.callbacks.Callback):
    """Stops ``fit()`` after ``seconds`` of wall time; with ``decay=True`` the
    optimiser's rate falls linearly from its initial value to 0 over that
    time (linear decay to zero over the budget: Li, Yumer & Ramanan 2020,
    "Budgeted Training: Rethinking Deep Neural Network Training Under
    Resource Constraints")."""

    def __init__(self, seconds: float, decay: bool = False):
        super().__init__()
        self.seconds, self.decay, self.episodes = seconds, decay, 0

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()
        self.peak = float(self.model.optimizer.learning_rate.numpy())

    def on_train_batch_begin(self, batch, logs=None):
        if self.decay:
            left = 1.0 - (time.perf_counter() - self.start) / self.seconds
            self.model.optimizer.learning_rate.assign(self.peak * max(left, 0.0))

    def on_train_batch_end(self, batch, logs=None):
        self.episodes += 1
        if time.perf_counter() - self.start >= self.seconds:
            self.model.stop_training = True


def accuracy_after(seconds: float, decay: bool = False, **setup):
    """Train the default model on 20-way 5-shot episodes for ``seconds`` of wall
    time (first trace included; ``decay``: see :class:`TimeBudget`), then
    evaluate 5-way 1-shot (``setup``: the arguments of :func:`_train_setup`)."""
    model, dataset, episodes = _train_setup(**setup)
    before = load_average()
    budget = TimeBudget(seconds, decay)
    wall, cpu = time.perf_counter(), time.process_time()
    model.fit(dataset, steps_per_epoch=10**7, epochs=1, verbose=0, callbacks=[budget])
    wall, cpu, seen = time.perf_counter() - wall, time.process_time() - cpu, budget.episodes
    result = evaluate(model, episodes)
    print(
        f"`PrototypicalNetwork()` trained {wall:.0f} s wall ({cpu:.0f} s CPU, "
        f"{seen / cpu:.2f} episodes per CPU-second), {seen} "
        f"20-way 5-shot episodes ({setup}, decay over the budget: {decay}): "
        f"5-way 1-shot Omniglot accuracy {result} "
        f"({onednn()}; load average {before} before, {load_average()} after, "
        f"{os.cpu_count()} CPUs)"
    )


def accuracy_curve(counts: list[int], chunk: int = 25, **setup):
    """The training of :func:`accuracy_after`, measured in episodes: accuracy
    after each count (one run; evaluation time excluded)."""
    model, dataset, episodes = _train_setup(**setup)
    print(f"{setup}; {onednn()}; load average before: {load_average()} ({os.cpu_count()} CPUs)")
    split = setup.get("split", "test")
    print(
        f"| episodes | training wall s | training CPU s | CPU s per episode | 5-way 1-shot {split} |"
    )
    print("|---|---|---|---|---|")
    wall, cpu, seen = 0.0, 0.0, 0
    for count in sorted(counts):
        while seen < count:
            steps = min(chunk, count - seen)
            w, c = timed_fit(model, dataset, steps)
            wall, cpu = wall + w, cpu + c
            seen += steps
        result = evaluate(model, episodes)
        print(f"| {seen} | {wall:.0f} | {cpu:.0f} | {cpu / seen:.3f} | {result} |", flush=True)
    print(f"load average after: {load_average()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--skip-time-to-accuracy", action="store_true")
    parser.add_argument("--train-seconds", type=float, default=None)
    parser.add_argument("--train-episodes", default=None, help="e.g. 250,500,750")
    parser.add_argument(
        "--split",
        choices=("val", "test"),
        default="test",
        help="episodes scored by --train-seconds/--train-episodes (choices: val)",
    )
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="Adam's rate")
    parser.add_argument("--queries", type=int, default=5, help="per class, training episodes")
    parser.add_argument("--seed", type=int, default=0, help="training seed (--train-*)")
    parser.add_argument(
        "--decay-over-budget",
        action="store_true",
        help="with --train-seconds: Adam's rate falls linearly to 0 over them",
    )
    parser.add_argument(
        "--decay-episodes",
        type=int,
        default=None,
        help="Adam's rate falls linearly to 0 over this many episodes",
    )
    parser.add_argument("--onednn", choices=("default", "on", "off"), default="default",
                        help="TF_ENABLE_ONEDNN_OPTS for this run (default: TensorFlow's choice)")  # fmt: skip
    args = parser.parse_args()
    # not bookcode.notebook.setup(): its op determinism would make the
    # comparison with other versions of the package depend on their setup()
    keras.utils.set_random_seed(0)
    names = ("split", "learning_rate", "queries", "decay_episodes", "seed")
    setup = {name: getattr(args, name) for name in names}
    if args.train_seconds:
        accuracy_after(args.train_seconds, args.decay_over_budget, **setup)
        return
    if args.train_episodes:
        accuracy_curve([int(n) for n in args.train_episodes.split(",")], **setup)
        return
    train, val = omniglot("train"), omniglot("val")

    print(f"{onednn()}; load average before: {load_average()} ({os.cpu_count()} CPUs)")
    rows = []
    for fast, label in [(None, "defaults: `PrototypicalNetwork()`"),
                        (False, "Keras BatchNormalization, float32"),
                        (True, "fused batch norm, mixed bfloat16")]:  # fmt: skip
        rate, cpu = throughput(train, fast, args.episodes)
        rows.append((label, rate, cpu))
        print(f"{label}: {rate:.1f} episodes/s, {1000 * cpu:.0f} ms CPU per episode", flush=True)
    print(f"load average after throughput: {load_average()}")
    lines = [
        (
            "Training throughput, 5-way 5-shot, 15 queries per class, Conv-4, 28x28 Omniglot, "
            f"`fit()` on `EpisodeSampler.tf_dataset()`, {args.episodes} episodes:"
        ),
        "",
        "| configuration | episodes/s (wall) | CPU ms per episode | vs PyTorch 14.5/s |",
        "|---|---|---|---|",
    ]
    for label, rate, cpu in rows:
        lines.append(
            f"| {label} | {rate:.1f} | {1000 * cpu:.0f} | {rate / PYTORCH_EPISODES_PER_SECOND:.2f}x |"
        )
    if not args.skip_time_to_accuracy:
        wall, cpu, seen, accuracy = time_to_accuracy(train, val)
        reached = f"after {seen} episodes" if seen else f"not reached (best {accuracy:.3f})"
        lines += [
            "",
            (
                "Time to reach 95% 5-way 1-shot accuracy on 100 fixed validation episodes "
                "(60-way 1-shot training, 5 queries, Adam 1e-3, fused batch norm, mixed "
                f"bfloat16, checked every 25 episodes): {reached}, {wall:.0f} s wall, "
                f"{cpu:.0f} s CPU (training only)."
            ),
        ]
    load = f"Load average during the run (1/5/15 min): {load_average()} on {os.cpu_count()} CPUs."
    lines += ["", load]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
