"""Run one chapter notebook several times with other seeds and precisions and
tabulate every quantity it checks with ``bookcode.notebook.check``.

Usage::

    BOOKCODE_DATA=/path/to/data python benchmarks/multirun.py \\
        chapters/03_prototypical_networks.ipynb \\
        --runs "seed=0,precision=float32" "seed=1,precision=bfloat16" "seed=2"

A run is comma-separated ``key=value`` settings, passed to the notebook as
environment variables: ``seed`` (BOOKCODE_SEED), ``precision``
(BOOKCODE_PRECISION: float32 or bfloat16), ``profile`` (BOOKCODE_PROFILE),
``deterministic`` (BOOKCODE_DETERMINISTIC). Each run executes a copy of the
notebook (nbclient, as ``jupyter nbconvert --execute`` does; working directory:
the notebook's folder) into a temporary folder, or ``--keep DIR``; the committed notebook is
never written. Prints a Markdown table: a row per checked quantity, a column
per run; ``!`` marks a failed check. A run that fails goes on to the next.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

SETTINGS = {
    "seed": "BOOKCODE_SEED",
    "precision": "BOOKCODE_PRECISION",
    "profile": "BOOKCODE_PROFILE",
    "deterministic": "BOOKCODE_DETERMINISTIC",
}


@dataclass
class Run:
    spec: str
    checks: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


def parse_run(spec: str) -> dict[str, str]:
    """``"seed=1,precision=bfloat16"`` -> the environment variables to set."""
    env = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in SETTINGS or not value.strip():
            raise ValueError(
                f"bad run setting {item!r} in {spec!r}; use key=value with keys {list(SETTINGS)}"
            )
        env[SETTINGS[key]] = value.strip()
    return env


def run_notebook(notebook: Path, spec: str, out_dir: Path, timeout: int = 3600) -> Run:
    """Execute a copy of ``notebook`` with the settings of ``spec``; the
    executed copy goes to ``out_dir``."""
    notebook = notebook.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    name = notebook.stem + "-" + "".join(c if c.isalnum() else "_" for c in spec) + ".ipynb"
    output = (out_dir / name).resolve()
    if output == notebook:
        raise ValueError("refusing to overwrite the notebook itself")
    checks = output.with_suffix(".checks.jsonl")
    checks.unlink(missing_ok=True)
    env = {**os.environ, **parse_run(spec), "BOOKCODE_CHECKS": str(checks)}
    nb = nbformat.read(notebook, as_version=4)
    client = NotebookClient(
        nb, timeout=timeout, resources={"metadata": {"path": str(notebook.parent)}}
    )
    run = Run(spec)
    start = time.perf_counter()
    try:
        client.execute(env=env)  # stops at the first cell that raises
    except CellExecutionError as error:
        run.error = f"{error.ename}: {error.evalue}"
    except (RuntimeError, TimeoutError) as error:  # a dead kernel, a cell timeout
        run.error = f"{type(error).__name__}: {error}"
    finally:
        run.seconds = time.perf_counter() - start
        nbformat.write(nb, output)  # the executed copy, up to the failing cell
    if checks.exists():
        run.checks = [json.loads(line) for line in checks.read_text().splitlines() if line]
    return run


def table(runs: list[Run]) -> str:
    """A Markdown table: a row per checked quantity, a column per run."""
    names = list(dict.fromkeys(c["name"] for run in runs for c in run.checks))
    header = ["quantity", *(run.spec or "defaults" for run in runs)]
    rows = [header, ["---"] * len(header)]
    for name in names:
        row = [name]
        for run in runs:
            found = [c for c in run.checks if c["name"] == name]
            row.append(" ".join(_cell(c) for c in found) or "-")
        rows.append(row)
    rows.append(["wall time (s)", *(f"{run.seconds:.0f}" for run in runs)])
    rows.append(["status", *("ok" if run.error is None else "FAILED" for run in runs)])
    text = "\n".join("| " + " | ".join(row) + " |" for row in rows)
    failures = [f"- {run.spec or 'defaults'}: {run.error}" for run in runs if run.error]
    return text + ("\n\n" + "\n".join(failures) if failures else "")


def _cell(check: dict) -> str:
    value = check["value"]
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text if check["passed"] else text + "!"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--runs", nargs="+", default=["seed=0", "seed=1", "seed=2"])
    parser.add_argument("--keep", type=Path, help="folder for the executed copies")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args(argv)
    if not args.notebook.is_file():
        parser.error(f"no notebook at {args.notebook}")
    try:
        for spec in args.runs:
            parse_run(spec)
    except ValueError as error:
        parser.error(str(error))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.keep or Path(tmp)
        for spec in args.runs:
            print(f"running {args.notebook.name} with {spec or 'defaults'} ...", file=sys.stderr)
            runs.append(run_notebook(args.notebook, spec, out_dir, args.timeout))
    print(f"{args.notebook.name}, {len(runs)} runs\n")
    print(table(runs))
    return 0 if all(run.error is None for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
