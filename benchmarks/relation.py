"""Relation and matching network benchmarks (chapter 4).

Training throughput, episodes per second: 5-way 1-shot episodes with 15
queries per class, 28x28 Omniglot, ``fit()`` on ``EpisodeSampler.tf_dataset()``,
float32:

- ``RelationNetwork()`` (Sung et al. 2018; Conv-4 without pooling in blocks
  3-4, 5x5x64 feature maps, relation module of two conv blocks and FC 8-1);
- ``MatchingNetwork()`` (Conv-4, cosine attention) and
  ``MatchingNetwork(fce=True)`` (full context embeddings, 5 processing steps).

If a Python with PyTorch is given (``--torch-python``, default
``/work/torchvenv/bin/python`` when it exists), a plain PyTorch relation
network of the same size (the structure of the paper's public code: every
(query, class) pair concatenated and passed through the relation module, Adam
1e-3, MSE against one-hot) is measured in the same run, on random 28x28
inputs, in a subprocess between our measurements.

Usage::

    BOOKCODE_DATA=/path/to/data python benchmarks/relation.py [--episodes 200]

Prints a Markdown section for ``benchmarks/RESULTS.md``; the load average is
printed with it (the machine is often shared).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as bookcode.notebook.setup() (x86-64)

import keras

from bookcode.datasets import omniglot
from bookcode.episodes import EpisodeSampler
from bookcode.metric import MatchingNetwork, RelationNetwork

WAYS, SHOTS, QUERIES = 5, 1, 15

TORCH_RELATION_NETWORK = r"""
import json, sys, time
import torch
from torch import nn

torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[2]))
ways, shots, queries, episodes, warmup = 5, 1, 15, int(sys.argv[1]), 20


def block(cin, pad, pool):
    layers = [nn.Conv2d(cin, 64, 3, padding=pad), nn.BatchNorm2d(64, momentum=0.1), nn.ReLU()]
    return nn.Sequential(*(layers + [nn.MaxPool2d(2)] * pool))


encoder = nn.Sequential(block(1, 0, True), block(64, 0, True), block(64, 1, False), block(64, 1, False))
relation = nn.Sequential(
    block(128, 1, True), block(64, 1, True), nn.Flatten(), nn.Linear(64, 8), nn.ReLU(),
    nn.Linear(8, 1), nn.Sigmoid(),
)
optimizer = torch.optim.Adam(list(encoder.parameters()) + list(relation.parameters()), 1e-3)
support = torch.rand(ways * shots, 1, 28, 28)
query = torch.rand(ways * queries, 1, 28, 28)
labels = torch.arange(ways).repeat_interleave(queries)


def step():
    features = encoder(torch.cat([support, query]))
    classes = features[: ways * shots].view(ways, shots, 64, 5, 5).sum(1)
    q = features[ways * shots :]
    pairs = torch.cat(
        [classes.unsqueeze(0).expand(len(q), -1, -1, -1, -1),
         q.unsqueeze(1).expand(-1, ways, -1, -1, -1)], dim=2,
    ).reshape(-1, 128, 5, 5)
    scores = relation(pairs).view(-1, ways)
    loss = ((scores - nn.functional.one_hot(labels, ways).float()) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


for _ in range(warmup):
    step()
wall, cpu = time.perf_counter(), time.process_time()
for _ in range(episodes):
    step()
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
print(json.dumps({"rate": episodes / wall, "cpu": cpu / episodes, "torch": torch.__version__}))
"""


def load_average() -> str:
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def throughput(model, train, episodes: int, warmup: int = 20) -> tuple[float, float]:
    """Training episodes per second (wall) and CPU seconds per episode."""
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    dataset = EpisodeSampler(train, WAYS, SHOTS, QUERIES, seed=0).tf_dataset()
    model.fit(dataset, steps_per_epoch=warmup, epochs=1, verbose=0)
    wall, cpu = time.perf_counter(), time.process_time()
    model.fit(dataset, steps_per_epoch=episodes, epochs=1, verbose=0)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return episodes / wall, cpu / episodes


def torch_throughput(python: str, episodes: int) -> tuple[float, float, str] | None:
    """The PyTorch relation network's episodes/s and CPU s per episode, or None."""
    if not python or not os.path.exists(python):
        return None
    out = subprocess.run(
        [python, "-c", TORCH_RELATION_NETWORK, str(episodes), str(os.cpu_count())],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["rate"], result["cpu"], result["torch"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=200)
    default_torch = "/work/torchvenv/bin/python"
    parser.add_argument(
        "--torch-python", default=default_torch if os.path.exists(default_torch) else ""
    )
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy("float32")
    train = omniglot("train")
    print(f"load average before: {load_average()} ({os.cpu_count()} CPUs)", file=sys.stderr)
    rows = []
    learners = [
        ("`RelationNetwork()`", RelationNetwork),
        ("PyTorch relation network (plain, pairs concatenated)", None),
        ("`MatchingNetwork()`", MatchingNetwork),
        ("`MatchingNetwork(fce=True)`", lambda: MatchingNetwork(fce=True)),
    ]
    for label, make in learners:
        if make is None:
            measured = torch_throughput(args.torch_python, args.episodes)
            if measured is None:
                continue
            rate, cpu, version = measured
            label = f"{label}, torch {version}"
        else:
            rate, cpu = throughput(make(), train, args.episodes)
        rows.append((label, rate, cpu))
        print(f"{label}: {rate:.1f} episodes/s, {1000 * cpu:.0f} ms CPU", file=sys.stderr)
    lines = [
        (
            f"Training throughput, {WAYS}-way {SHOTS}-shot, {QUERIES} queries per class, 28x28, "
            f"float32, TF_ENABLE_ONEDNN_OPTS={os.environ['TF_ENABLE_ONEDNN_OPTS']}, "
            f"{args.episodes} episodes after 20 of warm-up (ours: `fit()` on "
            "`EpisodeSampler.tf_dataset()` of Omniglot; PyTorch: random inputs):"
        ),
        "",
        "| learner | episodes/s (wall) | CPU ms per episode |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {rate:.1f} | {1000 * cpu:.0f} |" for label, rate, cpu in rows]
    torch_rows = [r for r in rows if r[0].startswith("PyTorch")]
    if torch_rows:
        ratio = rows[0][1] / torch_rows[0][1]
        lines += ["", f"RelationNetwork / PyTorch relation network: {ratio:.2f}x (episodes/s)."]
    else:
        lines += ["", "PyTorch was not available: the comparison is not measured in this run."]
    lines += ["", f"Load average after the run (1/5/15 min): {load_average()}."]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
