import numpy as np
import pytest

from bookcode import nets, notebook


def test_conv4_embedding_and_head_shapes():
    model = nets.conv4()
    assert model.output_shape == (None, 64)
    assert len([l for l in model.layers]) == 5  # 4 blocks + flatten
    out = model(np.zeros((3, 28, 28, 1), np.float32))
    assert out.shape == (3, 64)
    head = nets.conv4(input_shape=(84, 84, 3), filters=32, num_classes=5)
    assert head.output_shape == (None, 5)
    assert head.count_params() > 0


def test_profile_switch(monkeypatch):
    monkeypatch.delenv(notebook.PROFILE_VAR, raising=False)
    assert notebook.profile() == "quick"
    assert notebook.by_profile(quick=1, full=2) == 1
    monkeypatch.setenv(notebook.PROFILE_VAR, "full")
    assert notebook.by_profile(quick=1, full=2) == 2
    monkeypatch.setenv(notebook.PROFILE_VAR, "huge")
    with pytest.raises(ValueError, match="choose one of"):
        notebook.profile()


def test_setup_seeds_everything(monkeypatch):
    monkeypatch.delenv(notebook.PROFILE_VAR, raising=False)
    import keras

    assert notebook.setup(seed=3) == "quick"
    a = (np.random.rand(), keras.random.uniform((2,)).numpy())
    notebook.setup(seed=3)
    b = (np.random.rand(), keras.random.uniform((2,)).numpy())
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])
