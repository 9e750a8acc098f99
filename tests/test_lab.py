"""`make lab` starts JupyterLab on the chapters, and every chapter opens.

The test runs the Makefile's own ``lab`` target (``make -o <stamp>``: the
environment is the one running this test, nothing is installed) with the
options a reader would add for a headless start: no browser, a free local
port, a token. It waits for the server, checks through the REST API that
every notebook of ``chapters/`` is listed and opens as a notebook with all its
cells, that the JupyterLab page is served and a Python kernel is offered,
then shuts the server down through the API. Where a headless Chromium is
installed, it also loads a chapter in the browser and checks that the
notebook renders; otherwise that part is skipped, saying so.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted(p.name for p in (ROOT / "chapters").glob("*.ipynb"))
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    def __init__(self, port, token, process):
        self.base, self.token, self.process = f"http://127.0.0.1:{port}", token, process

    def request(self, path, method="GET"):
        request = urllib.request.Request(
            self.base + path, method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
            kind = response.headers.get("Content-Type", "")
        return json.loads(body) if "json" in kind else body.decode()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    home = tmp_path_factory.mktemp("jupyter")
    port, token = _free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        # the reader's own Jupyter settings and runtime files stay out of the test
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
    }
    args = f"--no-browser --ServerApp.ip=127.0.0.1 --port={port} --IdentityProvider.token={token}"
    command = [
        "make", "--no-print-directory", "-s",
        "-o", ".venv/.installed",  # do not (re)install: use this environment
        f"BIN={Path(sys.executable).parent}",
        f"LAB_ARGS={args}",
        "lab",
    ]  # fmt: skip
    log = open(home / "lab.log", "w+")  # noqa: SIM115 (read back below)
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    server = Lab(port, token, process)
    deadline = time.monotonic() + 180
    while True:
        try:
            server.request("/api/status")
            break
        except (urllib.error.URLError, ConnectionError, OSError):
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                process.poll() is None and os.killpg(process.pid, signal.SIGTERM)
                pytest.fail(f"`make lab` did not start a server:\n{log.read()[-3000:]}")
            time.sleep(0.5)
    yield server
    if process.poll() is None:  # the shutdown test did not run or failed
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    log.close()


def test_every_chapter_is_listed(lab):
    listing = lab.request("/api/contents/")
    names = sorted(item["name"] for item in listing["content"] if item["type"] == "notebook")
    assert CHAPTERS, "no notebooks in chapters/"
    assert names == CHAPTERS


@pytest.mark.parametrize("name", CHAPTERS)
def test_every_chapter_opens_as_a_notebook(lab, name):
    model = lab.request(f"/api/contents/{name}?content=1&type=notebook")
    assert model["type"] == "notebook" and model["format"] == "json"
    stored = json.loads((ROOT / "chapters" / name).read_text())
    cells = model["content"]["cells"]
    assert len(cells) == len(stored["cells"])
    assert cells[0]["source"] == "".join(stored["cells"][0]["source"])


def test_the_lab_page_and_a_python_kernel_are_served(lab):
    page = lab.request("/lab")
    assert "JupyterLab" in page
    specs = lab.request("/api/kernelspecs")
    assert specs["default"] in specs["kernelspecs"]
    assert specs["kernelspecs"][specs["default"]]["spec"]["language"] == "python"


def test_a_chapter_renders_in_headless_chromium(lab, tmp_path):
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        pytest.skip(f"no headless Chromium installed (looked for {', '.join(BROWSERS)})")
    name = CHAPTERS[0]
    result = subprocess.run(
        [
            browser, "--headless=new", "--no-sandbox", "--disable-gpu",
            f"--user-data-dir={tmp_path}", "--virtual-time-budget=60000", "--dump-dom",
            f"{lab.base}/lab/tree/{name}?token={lab.token}",
        ],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    dom = result.stdout
    assert "jp-Notebook" in dom, f"no notebook in the rendered page:\n{result.stderr[-2000:]}"
    title = json.loads((ROOT / "chapters" / name).read_text())["cells"][0]["source"][0]
    assert title.strip("# \n")[:20] in dom


def test_shutdown_through_the_api(lab):
    try:
        lab.request("/api/shutdown", method="POST")
    except (urllib.error.URLError, ConnectionError):
        pass  # the server may close the connection as it stops
    assert lab.process.wait(timeout=60) == 0
