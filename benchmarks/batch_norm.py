"""Cost of batch normalisation in Conv-4: forward + backward of 80 images.

CPU milliseconds (user + sys) per pass of a Conv-4-64 on random 28x28 inputs,
for each batch-norm implementation, in float32 or mixed_bfloat16. Each
variant runs in its own process (the dtype policy is global).

    python benchmarks/batch_norm.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

VARIANTS = ("none", "fused", "keras", "exact")


def run_one(variant: str, precision: str, repeats: int) -> float:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf
    from keras import layers

    from bookcode import nets

    keras.mixed_precision.set_global_policy(precision)
    norm = {
        "none": None,
        "fused": nets.FusedBatchNormalization,
        "keras": layers.BatchNormalization,
        "exact": nets.BatchNormalization,
    }[variant]
    model = keras.Sequential([keras.Input((28, 28, 1))])
    for _ in range(4):
        model.add(layers.Conv2D(64, 3, padding="same"))
        if norm is not None:
            model.add(norm())
        model.add(layers.ReLU())
        model.add(layers.MaxPooling2D(2))
    model.add(layers.Flatten())
    model.add(layers.Dense(5))
    x = tf.random.uniform((80, 28, 28, 1))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(tf.cast(model(x, training=True), tf.float32)))
        return tape.gradient(loss, model.trainable_variables)

    step(x)
    began = time.process_time()
    for _ in range(repeats):
        step(x)
    return 1000 * (time.process_time() - began) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(f"{run_one(*args.child, args.repeats):.0f}")
        return
    print(f"load average {os.getloadavg()[0]:.1f}")
    print("| batch norm | float32 CPU ms | mixed_bfloat16 CPU ms |\n|---|---|---|")
    for variant in VARIANTS:
        cells = []
        for precision in ("float32", "mixed_bfloat16"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", variant, precision,
                 "--repeats", str(args.repeats)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            cells.append(out.stdout.strip().splitlines()[-1])
        print(f"| {variant} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
