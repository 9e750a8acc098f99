"""How fast Omniglot loads (cold: decoding the PNG files; cached: the .npz
array cache) and how many episodes per second the sampler draws.

Run by hand: BOOKCODE_DATA=../shared/data python benchmarks/data_and_sampling.py
"""

import importlib
import tempfile
import time
from pathlib import Path

from bookcode.datasets import omniglot
from bookcode.episodes import EpisodeSampler

omniglot_module = importlib.import_module("bookcode.datasets.omniglot")


def seconds(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main():
    with tempfile.TemporaryDirectory() as tmp:
        real_cache_dir = omniglot_module.cache_dir
        omniglot_module.cache_dir = lambda: Path(tmp)  # a cold cache, thrown away afterwards
        cold, _ = seconds(lambda: omniglot("train"))
        cached, train = seconds(lambda: omniglot("train"))
        omniglot_module.cache_dir = real_cache_dir
    print(f"Omniglot train split: cold load {cold:.1f} s, cached load {cached:.2f} s")
    for ways, shots, queries in [(5, 1, 15), (5, 5, 15), (20, 5, 15), (60, 5, 5)]:
        sampler = EpisodeSampler(train, ways, shots, queries, seed=0)
        n = 2000
        elapsed, _ = seconds(lambda: [sampler.sample() for _ in range(n)])
        print(f"sampler {ways}-way {shots}-shot {queries} queries: {n / elapsed:,.0f} episodes/s")
    sampler = EpisodeSampler(train, 5, 1, 15, seed=0)
    batches = iter(sampler.tf_dataset(batch_size=32))
    next(batches)
    elapsed, _ = seconds(lambda: [next(batches) for _ in range(50)])
    print(f"tf_dataset meta-batches of 32 (5-way 1-shot): {50 * 32 / elapsed:,.0f} episodes/s")


if __name__ == "__main__":
    main()
