"""bookcode.progress: one live line during fit(), one summary line after it."""

import io
import os
import textwrap

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest

from bookcode.progress import LiveProgress, _duration


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _tiny_fit(callback, steps=6, epochs=2):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"])
    x = np.random.default_rng(0).random((steps * 4, 3)).astype("float32")
    y = (x[:, 0] > 0.5).astype("int32")
    model.fit(x, y, batch_size=4, epochs=epochs, verbose=0, callbacks=[callback])


def test_durations_read_naturally():
    assert _duration(4.4) == "4 s"
    assert _duration(125) == "2 min 05 s"
    assert _duration(3 * 3600 + 7 * 60) == "3 h 07 min"


def test_progress_line_counts_steps_and_estimates_time_left():
    progress = LiveProgress(unit="episode", keys=["loss"])
    progress._total = 100
    line = progress.progress_line(25, {"loss": 0.51234, "accuracy": 0.9}, 10.0)
    assert line == "episode 25/100 · loss 0.5123 · 10 s, about 30 s left"
    assert progress.summary_line(1, {"loss": 0.5}, 3.0) == "1 episode in 3 s · loss 0.5"
    assert progress.summary_line(2, {}, 3.0) == "2 episodes in 3 s"


def test_arrays_in_logs_are_left_out():
    progress = LiveProgress()
    assert progress._logs_text({"loss": 1.0, "weights": np.ones(3)}) == "loss 1"


def test_not_a_terminal_gets_only_the_summary():
    out = io.StringIO()
    progress = LiveProgress(stream=out, every=0)
    _tiny_fit(progress)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert lines[0] == progress.summary
    assert lines[0].startswith("12 steps in ") and "loss " in lines[0] and "accuracy " in lines[0]


def test_terminal_line_is_redrawn_in_place():
    out = _Terminal()
    _tiny_fit(LiveProgress(stream=out, every=0))
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert text.count("\r") == 1 + 12 + 1  # start, each step, summary
    assert "step 6/12" in text


@pytest.mark.parametrize("bad", [{"unit": ""}, {"every": -1}])
def test_bad_arguments_are_refused(bad):
    with pytest.raises(ValueError):
        LiveProgress(**bad)


def test_jupyter_keeps_one_output_holding_the_summary(tmp_path):
    """Executed by a real kernel (as nbconvert and nbval do): the stored cell
    has exactly one output, the final summary, however many redraws there were."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    code = textwrap.dedent(
        """
        import os
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        import keras, numpy as np
        from bookcode.progress import LiveProgress
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile("sgd", "sparse_categorical_crossentropy")
        x = np.zeros((40, 3), "float32"); y = np.zeros(40, "int32")
        progress = LiveProgress(unit="batch", every=0)
        _ = model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[progress])
        """
    )
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", cwd=str(tmp_path))
    client.execute()
    outputs = [o for o in nb.cells[0].outputs if o.output_type != "stream" or o.name != "stderr"]
    assert len(outputs) == 1, outputs
    (output,) = outputs
    assert output.output_type == "display_data"
    text = output.data["text/plain"]
    assert text.startswith("10 batches in ") and "loss " in text, text
    assert "left" not in text
