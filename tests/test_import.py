"""``import bookcode`` changes no process-wide setting and no file descriptor."""

import subprocess
import sys

PROBE = """
import os, sys
before = (os.environ.get("TF_CPP_MIN_LOG_LEVEL"), os.fstat(2).st_ino, os.fstat(2).st_dev)
import bookcode
import bookcode.notebook
after = (os.environ.get("TF_CPP_MIN_LOG_LEVEL"), os.fstat(2).st_ino, os.fstat(2).st_dev)
assert before == after, (before, after)
assert "tensorflow" not in sys.modules and "matplotlib" not in sys.modules
os.write(2, b"fd2-still-works\\n")
"""


def run(code):
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    return subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_import_bookcode_leaves_environment_and_stderr_alone():
    result = run(PROBE)
    assert result.returncode == 0, result.stderr
    assert "fd2-still-works" in result.stderr


def test_tensorflow_import_notices_stay_visible_after_import_bookcode():
    def notices(code):
        lines = run(code).stderr.splitlines()
        return [line.split("]")[-1] for line in lines if "]" in line]  # drop timestamps

    plain = notices("import tensorflow as tf; tf.config.list_physical_devices()")
    after = notices("import bookcode, tensorflow as tf; tf.config.list_physical_devices()")
    assert after == plain


def test_setup_drops_only_the_known_import_notices():
    code = "import bookcode.notebook; bookcode.notebook.setup(seed=4)"
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TF_CPP_MIN_LOG_LEVEL": "0"}
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("bookcode: profile quick, seed 4, ")
    assert result.stdout.count("\n") == 1
    for notice in ("cudart_stub", "cpu_feature_guard", "absl::InitializeLog"):
        assert notice not in result.stderr
    assert "oneDNN custom operations" not in result.stderr  # setup()'s own line says it


def test_setup_turns_onednn_on_unless_the_user_chose():
    import platform

    code = (
        "import os, bookcode.notebook; bookcode.notebook.setup();"
        "from bookcode import nets; print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'), nets.onednn_enabled())"
    )
    base = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    outputs = {}
    for choice in (None, "0"):
        env = base if choice is None else {**base, "TF_ENABLE_ONEDNN_OPTS": choice}
        result = subprocess.run(
            [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env
        )
        assert result.returncode == 0, result.stderr
        outputs[choice] = result.stdout.splitlines()
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert outputs[None][0].endswith(", oneDNN on") and outputs[None][1] == "1 True"
    assert outputs["0"][0].endswith(", oneDNN off") and outputs["0"][1] == "0 False"
