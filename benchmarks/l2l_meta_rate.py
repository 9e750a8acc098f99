"""Chapter 1: choose the learning rate of the LSTM optimiser's meta-training on
validation data only.

The LSTM optimiser of Andrychowicz et al. (2016) is meta-trained on small MLPs
for Omniglot *training* characters (chapter 1's recipe); each candidate
meta-learning rate is scored on MLP tasks built from the Omniglot
*validation* characters: the median over tasks of the next-minibatch loss
after 100 steps (mean of the last 5). The spoken-digit network of the chapter,
its unseen test problem, plays no part.

Usage: ``BOOKCODE_DATA=... python benchmarks/l2l_meta_rate.py [--seeds 1 2]``
"""

from __future__ import annotations

import argparse

import bookcode.notebook

bookcode.notebook.setup(seed=1)

import keras
import numpy as np
import tensorflow as tf

from bookcode import learned_optimizers as lo
from bookcode.datasets import omniglot
from bookcode.episodes import ClassDataset

UNROLL, TRUNCATIONS, STEPS, TASKS_PER_STEP, CHARACTERS_PER_LABEL = 20, 5, 40, 2, 3


def pooled(dataset):
    """Omniglot 28 x 28 -> 8 x 8 = 64 mean-pooled pixels (chapter 1's features)."""
    x = dataset.x[:, 2:26, 2:26, 0].reshape(-1, 8, 3, 8, 3).mean((2, 4)).reshape(-1, 64)
    return ClassDataset(x.astype(np.float32), dataset.y, dataset.class_names)


def final_loss(losses):
    return float(np.median(np.asarray(losses)[-5:].mean(0)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rates", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2])
    args = parser.parse_args()
    train, val = pooled(omniglot("train")), pooled(omniglot("val"))
    horizon = UNROLL * TRUNCATIONS
    val_tasks = lo.mlp_tasks(val, 30, horizon, classes_per_label=CHARACTERS_PER_LABEL, seed=99)
    adam = {
        lr: final_loss(lo.optimize_mlps_with(keras.optimizers.Adam(lr), val_tasks))
        for lr in (0.03, 0.1, 0.3)
    }
    print("validation MLP tasks, Adam by learning rate:", {k: round(v, 3) for k, v in adam.items()})
    print("| meta-learning rate | " + " | ".join(f"seed {s}" for s in args.seeds) + " |")
    print("|---|" + "---|" * len(args.seeds))
    for rate in args.rates:
        scores = []
        for seed in args.seeds:
            tasks = lo.mlp_tasks(
                train,
                TASKS_PER_STEP * STEPS,
                horizon,
                classes_per_label=CHARACTERS_PER_LABEL,
                seed=seed,
            )
            keras.utils.set_random_seed(seed)
            optimizer = lo.LSTMOptimizer(unroll=UNROLL, truncations=TRUNCATIONS)
            schedule = keras.optimizers.schedules.CosineDecay(rate, STEPS * TRUNCATIONS)
            optimizer.compile(optimizer=keras.optimizers.Adam(schedule))
            data = tf.data.Dataset.from_tensor_slices(tasks).batch(TASKS_PER_STEP)
            optimizer.fit(data, epochs=1, steps_per_epoch=STEPS, verbose=0)
            scores.append(final_loss(optimizer.optimize_mlps(val_tasks)))
        print(f"| {rate:g} | " + " | ".join(f"{s:.3f}" for s in scores) + " |", flush=True)


if __name__ == "__main__":
    main()
