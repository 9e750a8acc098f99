import json
import sys
import warnings

import numpy as np
import pytest

from bookcode import nets, notebook
from bookcode.evaluation import EvaluationResult


@pytest.fixture
def restore_tensorflow_state():
    """setup() changes process-wide TensorFlow state; put it back for other tests."""
    import keras
    from tensorflow.python.framework import config

    was_deterministic = config.is_op_determinism_enabled()
    policy = keras.mixed_precision.global_policy().name
    yield
    keras.mixed_precision.set_global_policy(policy)
    if not was_deterministic and config.is_op_determinism_enabled():
        config.disable_op_determinism()


def test_profile_switch(monkeypatch):
    monkeypatch.delenv(notebook.PROFILE_VAR, raising=False)
    assert notebook.profile() == "quick"
    assert notebook.by_profile(quick=1, full=2) == 1
    monkeypatch.setenv(notebook.PROFILE_VAR, "full")
    assert notebook.by_profile(quick=1, full=2) == 2
    monkeypatch.setenv(notebook.PROFILE_VAR, "huge")
    with pytest.raises(ValueError, match="choose one of"):
        notebook.profile()


def test_setup_seeds_prints_one_line_and_is_deterministic(
    monkeypatch, capsys, restore_tensorflow_state
):
    import keras
    from tensorflow.python.framework import config

    for var in (notebook.PROFILE_VAR, notebook.SEED_VAR, notebook.DETERMINISTIC_VAR):
        monkeypatch.delenv(var, raising=False)
    assert notebook.setup(seed=3) == "quick"
    a = (np.random.rand(), keras.random.uniform((2,)).numpy())
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert "seed 3" in out and "precision " in out and ("CPU" in out or "GPU" in out)
    assert config.is_op_determinism_enabled()
    notebook.setup(seed=3)
    b = (np.random.rand(), keras.random.uniform((2,)).numpy())
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])


def test_setup_environment_overrides(monkeypatch, capsys, restore_tensorflow_state):
    import keras
    from tensorflow.python.framework import config

    monkeypatch.setenv(notebook.SEED_VAR, "7")
    monkeypatch.setenv(notebook.DETERMINISTIC_VAR, "0")
    monkeypatch.setenv(notebook.PRECISION_VAR, "bfloat16")
    notebook.setup(seed=3)
    out = capsys.readouterr().out
    assert "seed 7" in out and "precision mixed_bfloat16" in out and "determinism off" in out
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    assert not config.is_op_determinism_enabled()
    first = np.random.rand()
    np.random.seed(7)
    assert np.random.rand() == first


def test_setup_computes_in_float32_unless_asked(monkeypatch, capsys, restore_tensorflow_state):
    import keras

    monkeypatch.delenv(notebook.PRECISION_VAR, raising=False)
    monkeypatch.setattr(nets, "fast_precision", lambda: "mixed_bfloat16")  # a bfloat16 CPU
    notebook.setup(seed=3)
    out = capsys.readouterr().out
    assert "precision float32" in out and "BOOKCODE_PRECISION=bfloat16 trains faster" in out
    assert keras.mixed_precision.global_policy().name == "float32"
    monkeypatch.setattr(nets, "fast_precision", lambda: "float32")  # a CPU without it
    notebook.setup(seed=3)
    assert "trains faster" not in capsys.readouterr().out


def test_seeded_follows_the_seed_variable(monkeypatch, capsys, restore_tensorflow_state):
    monkeypatch.delenv(notebook.SEED_VAR, raising=False)
    notebook.setup(seed=3)
    assert [notebook.seeded(n) for n in (0, 2, 2024)] == [0, 2, 2024]  # a normal run
    monkeypatch.setenv(notebook.SEED_VAR, "7")
    notebook.setup(seed=3)
    assert [notebook.seeded(n) for n in (0, 2, 2024)] == [4, 6, 2028]  # every seed moves by 4
    monkeypatch.setenv(notebook.SEED_VAR, "0")
    notebook.setup(seed=3)
    assert notebook.seeded(1) == 2**31 - 2  # still a valid seed
    monkeypatch.setenv(notebook.SEED_VAR, "3")
    notebook.setup(seed=3)
    assert notebook.seeded(5) == 5  # the notebook's own seed: unchanged
    with pytest.raises(ValueError, match="non-negative integer"):
        notebook.seeded(-1)
    capsys.readouterr()


def test_setup_hides_no_warning_but_the_known_harmless_one(restore_tensorflow_state, capsys):
    notebook.setup()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        notebook.setup()  # re-adds its targeted filter in front
        warnings.warn("Gradients do not exist for variables", UserWarning)
        warnings.warn("`shuffle=True` was passed, but will be ignored", UserWarning)
    assert [str(w.message) for w in caught] == ["Gradients do not exist for variables"]


def test_import_notices_filter_keeps_real_problems():
    text = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1.5 42 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
E0000 00:00:1.6 42 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)
W0000 dso_loader.cc:64] Could not load dynamic library 'libcudnn.so.9'
"""
    assert notebook._unexpected_import_lines(text) == [text.splitlines()[-1]]
    # With a driver present, a failed cuInit is a real problem and is shown.
    assert len(notebook._unexpected_import_lines(text.splitlines()[2])) == 1


def test_check_passes_fails_and_records(monkeypatch, tmp_path):
    path = tmp_path / "checks.jsonl"
    monkeypatch.setenv(notebook.CHECKS_VAR, str(path))
    assert notebook.check("accuracy", np.float32(0.5), at_least=0.5) == 0.5
    result = EvaluationResult(0.9, 0.01, np.array([0.9]))
    assert notebook.check("5-way accuracy", result, at_least=0.8, at_most=1) == 0.9
    with pytest.raises(AssertionError, match=r"mse = 0\.3 is above the allowed 0\.1"):
        notebook.check("mse", 0.3, at_most=0.1)
    with pytest.raises(AssertionError, match="ratio = nan is NaN"):
        notebook.check("ratio", float("nan"), at_least=3)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["name"], r["passed"]) for r in records] == [
        ("accuracy", True),
        ("5-way accuracy", True),
        ("mse", False),
        ("ratio", False),
    ]
    assert [r["value"] for r in records[:3]] == [0.5, 0.9, 0.3]
    assert records[2]["at_most"] == 0.1 and records[2]["at_least"] is None
    with pytest.raises(ValueError, match="needs at_least= or at_most="):
        notebook.check("accuracy", 0.5)


def test_check_without_checks_file_writes_nothing(monkeypatch, tmp_path):
    monkeypatch.delenv(notebook.CHECKS_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    notebook.check("x", 1, at_least=0)
    assert list(tmp_path.iterdir()) == []


def load_multirun():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "multirun.py"
    spec = importlib.util.spec_from_file_location("multirun", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["multirun"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_multirun_tabulates_checks_of_every_run(tmp_path, capsys):
    import nbformat

    multirun = load_multirun()
    code = """\
import os
from bookcode.notebook import check

seed = int(os.environ["BOOKCODE_SEED"])
check("bfloat16", os.environ.get("BOOKCODE_PRECISION") == "bfloat16", at_least=0)
check("seed squared", seed**2, at_most=2)
"""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    path = tmp_path / "tiny.ipynb"
    nbformat.write(nb, path)
    before = path.read_bytes()
    status = multirun.main(
        [
            str(path),
            "--runs",
            "seed=1,precision=bfloat16",
            "seed=2",
            "--keep",
            str(tmp_path / "out"),
        ]
    )
    out = capsys.readouterr().out
    assert status == 1  # the second run fails its check
    assert "| quantity | seed=1,precision=bfloat16 | seed=2 |" in out
    assert "| bfloat16 | 1 | 0 |" in out
    assert "| seed squared | 1 | 4! |" in out
    assert "| status | ok | FAILED |" in out
    assert "seed squared = 4 is above the allowed 2" in out
    assert path.read_bytes() == before
    assert len(list((tmp_path / "out").glob("*.ipynb"))) == 2
    with pytest.raises(ValueError, match="bad run setting"):
        multirun.parse_run("seed=1,colour=red")


def test_setup_rejects_a_bad_seed_variable(monkeypatch):
    monkeypatch.setenv(notebook.SEED_VAR, "one")
    with pytest.raises(ValueError, match="BOOKCODE_SEED='one'"):
        notebook.setup()
