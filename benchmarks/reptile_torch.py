"""Plain PyTorch Reptile, the peer of ``benchmarks/maml.py``'s ``reptile-5x5``
workload: Conv-4 (64 filters, batch norm, max-pool), random 28x28 inputs,
5-way 10-shot tasks, meta-batch 5, 5 inner Adam steps (beta_1 = 0, fresh
state per task) on minibatches of 10, theta <- theta + eps (mean(phi) - theta).

PyTorch is not a project dependency: run it from a separate environment
with a CPU build of torch (a CUDA build run on a CPU measured about 100x
slower per step; on this project's machines ``torch==2.13.0`` is a CPU build),

    python3 -m venv /work/torchvenv && /work/torchvenv/bin/pip install torch==2.13.0
    /work/torchvenv/bin/python benchmarks/reptile_torch.py [--iterations 6]

and compare its tasks per second with ``benchmarks/maml.py --workloads
reptile-5x5`` measured in the same session.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main():
    import torch
    from torch import nn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--filters", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    f = args.filters

    def block(cin):
        return [nn.Conv2d(cin, f, 3, padding=1), nn.BatchNorm2d(f), nn.ReLU(), nn.MaxPool2d(2)]

    model = nn.Sequential(*block(1), *block(f), *block(f), *block(f), nn.Flatten(), nn.Linear(f, 5))
    ways, shots, batch, steps, inner_batch = 5, 10, 5, 5, 10
    x = torch.rand(batch, ways * shots, 1, 28, 28)
    y = torch.arange(ways).repeat_interleave(shots).repeat(batch, 1)
    loss_fn = nn.CrossEntropyLoss()

    def meta_step(eps=1.0):
        theta = [p.detach().clone() for p in model.parameters()]
        new = [torch.zeros_like(t) for t in theta]
        for task in range(batch):
            with torch.no_grad():
                for p, t in zip(model.parameters(), theta):
                    p.copy_(t)
            inner = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.0, 0.999))
            order = torch.randperm(ways * shots)
            for s in range(steps):
                idx = order[s * inner_batch : (s + 1) * inner_batch]
                inner.zero_grad()
                loss_fn(model(x[task, idx]), y[task, idx]).backward()
                inner.step()
            with torch.no_grad():
                for n, p in zip(new, model.parameters()):
                    n += p / batch
        with torch.no_grad():
            for p, t, n in zip(model.parameters(), theta, new):
                p.copy_(t + eps * (n - t))

    meta_step()  # warm-up
    load = os.getloadavg()[0]
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(args.iterations):
        meta_step()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    print(
        json.dumps(
            {
                "workload": "reptile-5x5 (plain PyTorch)",
                "tasks_per_s_wall": round(args.iterations * batch / wall, 1),
                "tasks_per_cpu_s": round(args.iterations * batch / cpu, 1),
                "load_avg": round(load, 1),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
