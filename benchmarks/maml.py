"""Speed and memory of meta-training steps: MAML, Meta-SGD, Reptile (bookcode.meta).

Workloads (random 28x28 inputs, Conv-4 with 64 filters, batch norm and
max-pool, 5-way 1-shot, 15 queries per class), as in ANCHORS.md:

  so-32x1   second order, meta-batch 32, 1 inner step
  so-8x5    second order, meta-batch 8, 5 inner steps
  fo-32x1   first order, meta-batch 32, 1 inner step
  fo-8x5    first order, meta-batch 8, 5 inner steps (a graph loop since the
            bookcode.meta package; unrolled before)
  metasgd-so-32x1, metasgd-fo-32x1
            Meta-SGD (learned per-weight rates), as so-32x1 / fo-32x1: its
            meta-step should cost at most 1.1x MAML's
  reptile-5x5
            Reptile, meta-batch 5, 5-way 10-shot tasks, 5 inner Adam steps
            (beta_1 = 0) on minibatches of 10; the same size as
            benchmarks/reptile_torch.py, the plain PyTorch peer

Each workload runs in its own process (so peak memory is its own). We report
tasks per second of wall time, tasks per second of CPU time (user + sys, a
measure that is less sensitive to other jobs on a shared machine), the load
average at the start, and the peak resident memory of the process.

    BOOKCODE_DATA=... .venv/bin/python benchmarks/maml.py [--iterations 6] [--parallel-tasks 4]
        [--task-batching auto|map|batched]

``--task-batching`` is the learners' option (MAML, Meta-SGD, Reptile): the
meta-batch's tasks mapped one by one (``map``) or run as one batched
computation (``batched``, bookcode.meta.batched).

When a Meta-SGD workload runs with its MAML twin (``metasgd-so-32x1`` and
``so-32x1``, ...), the last lines give Meta-SGD's CPU time per meta-step over
MAML's (issue 16's target: at most 1.1x).

Before/after a change: run it with PYTHONPATH=/path/to/old/checkout first, then
without (the "code" field says which bookcode was measured).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

WORKLOADS = {
    "so-32x1": {"first_order": False, "batch": 32, "steps": 1},
    "so-8x5": {"first_order": False, "batch": 8, "steps": 5},
    "fo-32x1": {"first_order": True, "batch": 32, "steps": 1},
    "fo-8x5": {"first_order": True, "batch": 8, "steps": 5},
    "metasgd-so-32x1": {"first_order": False, "batch": 32, "steps": 1, "learner": "metasgd"},
    "metasgd-fo-32x1": {"first_order": True, "batch": 32, "steps": 1, "learner": "metasgd"},
    "reptile-5x5": {"first_order": True, "batch": 5, "steps": 5, "learner": "reptile"},
}


def run_one(
    name: str, iterations: int, parallel_tasks: int, filters: int, fast: bool, task_batching: str
) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    import bookcode
    from bookcode import meta
    from bookcode.nets import conv4

    cfg = WORKLOADS[name]
    # --fast: bfloat16 convolutions (AMX), and for first order only TensorFlow's
    # fused batch norm (its second derivatives are wrong; bookcode.meta refuses it)
    fused = fast and cfg["first_order"]
    if fast:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    keras.utils.set_random_seed(0)
    ways, shots, queries, b = 5, 1, 15, cfg["batch"]
    network = conv4(filters=filters, num_classes=ways, fused_batch_norm=fused)
    learner = cfg.get("learner", "maml")
    if learner == "reptile":
        shots, queries = 10, 1
        maml = meta.Reptile(
            network, inner_lr=1e-3, inner_steps=cfg["steps"], inner_batch=10,
            parallel_tasks=parallel_tasks, task_batching=task_batching,
        )  # fmt: skip
        maml.compile(meta.Reptile.annealed_sgd(1.0, 0.0, 100000))
    else:
        cls = meta.MetaSGD if learner == "metasgd" else meta.MAML
        options = {} if learner == "metasgd" else {"inner_lr": 0.4}
        maml = cls(
            network,
            inner_steps=cfg["steps"],
            first_order=cfg["first_order"],
            parallel_tasks=parallel_tasks,
            task_batching=task_batching,
            **options,
        )
        maml.compile(keras.optimizers.Adam(1e-3))
    rng = np.random.default_rng(0)
    x = (
        rng.uniform(size=(b, ways * shots, 28, 28, 1)).astype("float32"),
        np.tile(np.repeat(np.arange(ways), shots), (b, 1)).astype("int32"),
        rng.uniform(size=(b, ways * queries, 28, 28, 1)).astype("float32"),
    )
    y = np.tile(np.repeat(np.arange(ways), queries), (b, 1)).astype("int32")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    maml.train_on_batch(x, y)  # trace and first step
    trace = time.perf_counter() - t0
    load = os.getloadavg()[0]
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(iterations):
        maml.train_on_batch(x, y)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {
        "workload": name,
        "tasks_per_s_wall": round(iterations * b / wall, 1),
        "tasks_per_cpu_s": round(iterations * b / cpu, 1),
        "s_per_iteration": round(wall / iterations, 2),
        "first_call_s": round(trace, 1),
        "load_avg": round(load, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "rss_before_mb": round(rss_before / 1024),
        "parallel_tasks": parallel_tasks,
        "fast": fast,
        "task_batching": "batched" if maml._batches_tasks() else "map",
        "cpu_s_per_iteration": round(cpu / iterations, 4),
        "code": os.path.dirname(os.path.dirname(bookcode.__file__)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--parallel-tasks", type=int, default=4)
    parser.add_argument("--filters", type=int, default=64)
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    parser.add_argument(
        "--fast", action="store_true", help="fused batch norm and mixed_bfloat16 (CPUs with AMX)"
    )
    parser.add_argument("--task-batching", choices=["auto", "map", "batched"], default="auto")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(
            json.dumps(
                run_one(
                    args.child,
                    args.iterations,
                    args.parallel_tasks,
                    args.filters,
                    args.fast,
                    args.task_batching,
                )
            )
        )
        return
    print(f"cores: {os.cpu_count()}  load average: {os.getloadavg()[0]:.1f}")
    measured = {}
    for name in args.workloads:
        out = subprocess.run(
            [sys.executable, __file__, "--child", name, "--iterations", str(args.iterations),
             "--parallel-tasks", str(args.parallel_tasks), "--filters", str(args.filters),
             "--task-batching", args.task_batching]
            + ["--fast"] * args.fast,
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        line = out.stdout.strip().splitlines()[-1]
        measured[name] = json.loads(line)
        print(line, flush=True)
    for name, result in measured.items():
        twin = measured.get(name.removeprefix("metasgd-"))
        if name.startswith("metasgd-") and twin is not None:
            ratio = result["cpu_s_per_iteration"] / twin["cpu_s_per_iteration"]
            print(f"{name} / {twin['workload']}: {ratio:.2f}x the CPU time per meta-step "
                  "(target: at most 1.1x)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
