"""bookcode.control: the point-navigation family, REINFORCE with a baseline,
MAML for reinforcement learning and one-shot meta-imitation."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest
import tensorflow as tf

from bookcode import control, meta

# -- environment ---------------------------------------------------------------


def test_step_clips_actions_and_rewards_minus_the_distance():
    env = control.PointNavigation([[0.3, -0.4], [0.0, 0.0]], horizon=2)
    np.testing.assert_array_equal(env.reset(), np.zeros((2, 2)))
    positions, rewards, done = env.step([[0.5, -0.05], [0.0, 0.02]])
    np.testing.assert_allclose(positions, [[0.1, -0.05], [0.0, 0.02]], atol=1e-7)
    np.testing.assert_allclose(rewards, [-np.hypot(0.2, 0.35), -0.02], rtol=1e-6)
    assert not done
    _, _, done = env.step(np.zeros((2, 2)))
    assert done
    with pytest.raises(ValueError, match="ended after 2 steps"):
        env.step(np.zeros((2, 2)))


def test_bad_actions_goals_and_order_give_clear_errors():
    env = control.PointNavigation(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="reset"):
        env.step(np.zeros((3, 2)))
    env.reset()
    with pytest.raises(ValueError, match=r"shape \(3, 2\)"):
        env.step(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match=r"goals must have shape \(n, 2\)"):
        control.PointNavigation(np.zeros(3))
    with pytest.raises(ValueError, match="starts"):
        control.PointNavigation(np.zeros((3, 2)), starts=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="horizon"):
        control.PointNavigation(np.zeros((3, 2)), horizon=0)
    with pytest.raises(ValueError, match="count"):
        control.sample_goals(0)


def test_goals_are_seeded_and_in_the_square():
    a, b = control.sample_goals(50, seed=3), control.sample_goals(50, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, control.sample_goals(50, seed=4))
    assert a.dtype == np.float32 and a.shape == (50, 2)
    assert a.min() >= -0.5 and a.max() <= 0.5


def test_batched_episodes_equal_looped_ones():
    rng = np.random.default_rng(0)
    goals, starts = control.sample_goals(5, seed=1), control.sample_goals(5, seed=2)
    actions = rng.normal(0, 0.1, (7, 5, 2)).astype(np.float32)
    batched = control.PointNavigation(goals, horizon=7, starts=starts)
    batched.reset()
    together = [batched.step(a)[:2] for a in actions]
    for i in range(5):
        single = control.PointNavigation(goals[i : i + 1], horizon=7, starts=starts[i : i + 1])
        single.reset()
        for t in range(7):
            p, r, _ = single.step(actions[t, i : i + 1])
            np.testing.assert_array_equal(p[0], together[t][0][i])
            np.testing.assert_array_equal(r[0], together[t][1][i])


def test_tensorflow_rollout_equals_the_numpy_environment():
    goals, starts = control.sample_goals(4, seed=5), control.sample_goals(4, seed=6)
    model = control.mlp_policy((8,), seed=0)
    weights = control.MAMLRL.tile([v.value for v in model.trainable_variables], 4)

    def numpy_policy(p):
        return control.batched_forward(model, weights, p[:, None, :]).numpy()[:, 0]

    positions, actions, rewards = control.run_policy(numpy_policy, goals, starts, horizon=12)
    paths = control.sample_trajectories(
        lambda s: control.batched_forward(model, weights, s), None, goals, 1, [0, 0], 12, starts
    )
    np.testing.assert_allclose(paths["observations"][:, 0], positions[:, :-1], atol=1e-6)
    np.testing.assert_allclose(paths["actions"][:, 0], actions, atol=1e-6)
    np.testing.assert_allclose(paths["rewards"][:, 0], rewards, atol=1e-6)


def test_sampled_actions_have_the_policy_spread_and_are_seeded():
    goals = np.zeros((2, 2), np.float32)
    log_std = np.log([[0.05, 0.2], [0.05, 0.2]]).astype(np.float32)

    def zero(s):
        return tf.zeros_like(s)

    a = control.sample_trajectories(zero, log_std, goals, 500, [1, 2], horizon=4)
    b = control.sample_trajectories(zero, log_std, goals, 500, [1, 2], horizon=4)
    np.testing.assert_array_equal(a["actions"], b["actions"])
    std = a["actions"].numpy().reshape(-1, 2).std(axis=0)
    np.testing.assert_allclose(std, [0.05, 0.2], rtol=0.05)


# -- REINFORCE with a baseline ---------------------------------------------------


def test_rewards_to_go_and_leave_one_out_baseline_by_hand():
    r = np.array([[1.0, 2.0, 3.0]], np.float32)
    np.testing.assert_allclose(
        control.rewards_to_go(r, 0.5), [[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3]]
    )
    returns = np.array([[1.0, 4.0], [3.0, 0.0], [5.0, 2.0]], np.float32)  # 3 trajectories, T=2
    np.testing.assert_allclose(
        control.leave_one_out_baseline(returns), [[4.0, 1.0], [3.0, 3.0], [2.0, 2.0]]
    )
    with pytest.raises(ValueError, match="at least 2"):
        control.leave_one_out_baseline(np.ones((1, 3), np.float32))


def test_surrogate_gradient_is_the_reinforce_estimate_by_hand():
    rng = np.random.default_rng(0)
    mean = tf.Variable(rng.normal(size=(1, 6, 3, 2)).astype(np.float32))
    log_std = np.log([0.5, 2.0]).astype(np.float32)
    actions = rng.normal(size=(1, 6, 3, 2)).astype(np.float32)
    adv = rng.normal(size=(1, 6, 3)).astype(np.float32)
    with tf.GradientTape() as tape:
        loss = control.reinforce_surrogate(control.gaussian_log_prob(actions, mean, log_std), adv)
    grad = tape.gradient(loss, mean).numpy()
    # d log N(a; mu, s) / d mu = (a - mu) / s^2
    by_hand = -(actions - mean.numpy()) / np.exp(2 * log_std) * adv[..., None] / 18
    np.testing.assert_allclose(grad, by_hand, rtol=1e-5, atol=1e-7)
    logp = control.gaussian_log_prob(actions, mean, log_std).numpy()
    ref = np.sum(
        -0.5 * ((actions - mean.numpy()) / np.exp(log_std)) ** 2
        - log_std - 0.5 * np.log(2 * np.pi), axis=-1,
    )  # fmt: skip
    np.testing.assert_allclose(logp, ref, rtol=1e-5)


def test_policy_gradient_estimate_matches_the_known_gradient():
    # one-step task: a ~ N(theta, 1), r = -(a - g)^2, so E[r] = -(theta - g)^2 - 1
    # and dE[r]/dtheta = -2 (theta - g)
    theta, goal, n = 0.3, -0.2, 200_000
    rng = np.random.default_rng(1)
    actions = (theta + rng.normal(size=(1, n, 1, 1))).astype(np.float32)
    rewards = -((actions[..., 0] - goal) ** 2)
    mean = tf.Variable(tf.fill((1, n, 1, 1), theta))
    adv = control.advantages(rewards, discount=1.0, normalize=False)
    with tf.GradientTape() as tape:
        loss = control.reinforce_surrogate(control.gaussian_log_prob(actions, mean, 0.0), adv)
    estimate = -float(tf.reduce_sum(tape.gradient(loss, mean)))  # the mean's gradient
    assert estimate == pytest.approx(-2 * (theta - goal), abs=0.03)


# -- MAML for reinforcement learning ------------------------------------------------


def tiny_learner(**kwargs):
    settings = {"inner_lr": 0.2, "num_trajectories": 4, "horizon": 10, "init_log_std": -1.0}
    return control.MAMLRL(control.mlp_policy((6,), activation="tanh", seed=0),
                          **{**settings, **kwargs})  # fmt: skip


def test_meta_gradient_is_second_order_through_the_policy_gradient_step():
    learner = tiny_learner()
    goals = tf.constant(control.sample_goals(3, seed=0))
    weights = [tf.convert_to_tensor(v) for v in learner.meta_variables]
    fold = tf.random.experimental.stateless_fold_in
    seed = tf.constant([4, 5])
    first = learner.sample(learner.tile(weights, 3), goals, fold(seed, 0))

    def adapted(w):
        tiled = learner.tile(w, 3)
        with tf.GradientTape() as tape:
            tape.watch(tiled)
            inner = tf.reduce_sum(learner.surrogate(tiled, first))
        grads = tape.gradient(inner, tiled)
        return [t - 0.2 * g for t, g in zip(tiled, grads)]

    after = learner.sample(adapted(weights), goals, fold(seed, 1_000_003))

    def outer(w):
        return tf.reduce_mean(learner.surrogate(adapted(w), after))

    with tf.GradientTape() as tape:
        tape.watch(weights)
        results = learner.meta_objective(weights, goals, seed)
    package = tape.gradient(results["loss"], weights)
    with tf.GradientTape() as tape:
        tape.watch(weights)
        by_hand_loss = outer(weights)
    by_hand = tape.gradient(by_hand_loss, weights)
    assert float(results["loss"]) == pytest.approx(float(by_hand_loss), rel=1e-5)
    for a, b in zip(package, by_hand):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)
    # finite differences on the log-std and one kernel entry (float64 would be
    # nicer; float32 central differences with a large step suffice here)
    for index, position in ((len(weights) - 1, (0,)), (0, (0, 1))):
        eps = 1e-2
        delta = np.zeros(weights[index].shape, np.float32)
        delta[position] = eps
        plus = [w + (delta if i == index else 0) for i, w in enumerate(weights)]
        minus = [w - (delta if i == index else 0) for i, w in enumerate(weights)]
        numeric = (float(outer(plus)) - float(outer(minus))) / (2 * eps)
        assert float(package[index][position]) == pytest.approx(numeric, rel=0.05, abs=1e-4)
    # first order drops the second-order term: a different gradient
    learner.first_order = True
    with tf.GradientTape() as tape:
        tape.watch(weights)
        loss = learner.meta_objective(weights, goals, seed)["loss"]
    first_order = tape.gradient(loss, weights)
    assert not np.allclose(first_order[0].numpy(), package[0].numpy(), rtol=1e-3)


def test_adapt_to_goals_takes_policy_gradient_steps_on_its_samples():
    learner = tiny_learner()
    goals = control.sample_goals(2, seed=1)
    adapted = learner.adapt_to_goals(goals, steps=2, seed=3)
    assert adapted.returns.shape == (2, 3)
    assert adapted.trajectories.shape == (3, 2, 4, 11, 2)
    np.testing.assert_allclose(adapted.trajectories[:, :, :, 0], 0.0)  # all start at the origin
    again = learner.adapt_to_goals(goals, steps=2, seed=3)
    np.testing.assert_array_equal(adapted.returns, again.returns)
    # the return recorded before step 0 is that of the step-0 samples
    weights = [tf.convert_to_tensor(v) for v in learner.meta_variables]
    seed = tf.constant([3, learner.sampling_seed + 1])
    fold = tf.random.experimental.stateless_fold_in
    first = learner.sample(learner.tile(weights, 2), tf.constant(goals), fold(seed, 0))
    np.testing.assert_allclose(
        adapted.returns[:, 0], first["rewards"].numpy().sum(-1).mean(-1), rtol=1e-6
    )
    assert adapted.actions(np.zeros((2, 5, 2), np.float32)).shape == (2, 5, 2)
    with pytest.raises(ValueError, match="positions"):
        adapted.actions(np.zeros((3, 2), np.float32))


def test_fit_logs_returns_and_zero_inner_steps_is_plain_policy_gradient():
    for steps in (1, 0):
        learner = tiny_learner(inner_steps=steps)
        learner.compile(keras.optimizers.Adam(1e-2))
        history = learner.fit(control.goal_dataset(3, seed=0), steps_per_epoch=3, verbose=0)
        assert set(history.history) == {"loss", "return_before", "return_after"}
        assert all(np.isfinite(v[-1]) for v in history.history.values())
    assert history.history["return_before"] == history.history["return_after"]


def test_rl_learner_rejects_bad_settings_and_has_no_support_set_api():
    with pytest.raises(ValueError, match="Dense"):
        control.MAMLRL(keras.Sequential([keras.Input((2,)), keras.layers.Dropout(0.1)]))
    with pytest.raises(ValueError, match="num_trajectories"):
        tiny_learner(num_trajectories=1)
    with pytest.raises(ValueError, match="goals"):
        tiny_learner().adapt_to_goals(np.zeros(2))
    learner = tiny_learner()
    assert not hasattr(learner, "predict_episode")
    with pytest.raises(AttributeError, match="adapt_to_goals"):
        learner.predict_episode(None, None, None)


def test_rl_learner_round_trip_gives_equal_actions(tmp_path):
    learner = tiny_learner(inner_steps=2, sampling_seed=7)
    learner.compile(keras.optimizers.Adam(1e-3))
    learner.log_std.assign([-0.5, -1.5])
    learner.optimizer.build(learner.meta_variables)  # saved with its slots, as after fit()
    goals, positions = control.sample_goals(3, seed=2), np.zeros((3, 4, 2), np.float32)
    before = learner.predict_actions(goals, positions, steps=1)
    learner.save(tmp_path / "rl.keras")
    loaded = keras.models.load_model(tmp_path / "rl.keras")
    assert type(loaded) is control.MAMLRL and loaded.inner_steps == 2
    np.testing.assert_allclose(loaded.predict_actions(goals, positions, steps=1), before,
                               rtol=1e-5, atol=1e-6)  # fmt: skip


# -- meta-imitation ----------------------------------------------------------------


def test_expert_goes_straight_to_the_goal_and_stops():
    goals, starts = control.sample_goals(20, seed=0), control.sample_goals(20, seed=1)
    positions, actions = control.demonstrations(goals, starts, horizon=16)
    assert positions.shape == actions.shape == (20, 16, 2)
    assert np.all(np.linalg.norm(actions, axis=-1) <= 1 + 1e-6)  # in units of the top speed
    direction = (goals - starts) / np.linalg.norm(goals - starts, axis=-1, keepdims=True)
    first = actions[:, 0] / np.linalg.norm(actions[:, 0], axis=-1, keepdims=True)
    np.testing.assert_allclose(first, direction, atol=1e-5)
    final = positions[:, -1] + 0.1 * actions[:, -1]
    np.testing.assert_allclose(final, goals, atol=1e-5)  # 1.41 / 0.1 < 16 steps


def test_imitation_tasks_share_the_goal_between_support_and_query():
    (sx, sy, qx), qy = control.imitation_tasks(5, seed=0, horizon=16)
    assert sx.shape == sy.shape == qx.shape == qy.shape == (5, 16, 2)
    assert not np.allclose(sx[:, 0], qx[:, 0])  # different starts
    np.testing.assert_allclose(sx[:, -1] + 0.1 * sy[:, -1], qx[:, -1] + 0.1 * qy[:, -1], atol=1e-5)


def test_behaviour_cloning_inner_loss_is_the_action_mse_by_hand():
    model = control.mlp_policy((8,), seed=0)
    maml = meta.MAML(model, inner_lr=0.5, inner_steps=1, kind="regression")
    (sx, sy, qx), _ = control.imitation_tasks(1, seed=0, horizon=6)
    weights = [v.value for v in model.trainable_variables]
    loss = maml.inner_loss(weights, sx[0], sy[0])(weights, 0)
    by_hand = np.mean((model(sx[0]).numpy() - sy[0]) ** 2)
    assert float(loss) == pytest.approx(by_hand, rel=1e-5)
    # one adaptation step from the package equals one hand SGD step
    with tf.GradientTape() as tape:
        tape.watch(weights)
        inner = tf.reduce_mean(tf.square(meta.forward(model, weights, sx[0]) - sy[0]))
    fast = [w - 0.5 * g for w, g in zip(weights, tape.gradient(inner, weights))]
    np.testing.assert_allclose(
        maml.predict_episode(sx[0], sy[0], qx[0], steps=1),
        meta.forward(model, fast, qx[0]).numpy(), rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    # batched forward with stacked adapted weights equals the per-task forward
    stacked = control.adapted_weights(maml, sx, sy, steps=1)
    np.testing.assert_allclose(
        control.batched_forward(model, stacked, qx)[0],
        meta.forward(model, fast, qx[0]).numpy(), rtol=1e-5, atol=1e-6,
    )  # fmt: skip


def test_behaviour_cloning_from_scratch_fits_each_demonstration():
    model = control.mlp_policy((16,), activation="tanh", seed=0)
    (sx, sy, _), _ = control.imitation_tasks(3, seed=0, horizon=8)
    start = control.random_weights(model, 3, seed=0)

    def mse(w):
        return np.mean((control.batched_forward(model, w, sx).numpy() - sy) ** 2, axis=(1, 2))

    trained = control.behaviour_cloning(model, sx, sy, steps=600, learning_rate=1e-2,
                                        initial=start)  # fmt: skip
    assert np.all(mse(trained) < 0.1 * mse(start))
    with pytest.raises(ValueError, match="optimizer"):
        control.behaviour_cloning(model, sx, sy, optimizer="rmsprop")


def test_imitation_rollouts_equal_the_environment_and_scale_actions():
    goals, starts = control.sample_goals(6, seed=0), control.sample_goals(6, seed=1)
    model = control.mlp_policy((4,), seed=0)
    weights = control.random_weights(model, 6, 0)
    paths = control.imitation_rollouts(model, weights, goals, starts, horizon=5)
    assert paths.shape == (6, 6, 2)

    def policy(p):  # outputs are in units of the top speed 0.1
        return 0.1 * control.batched_forward(model, weights, p[:, None]).numpy()[:, 0]

    positions, _, _ = control.run_policy(policy, goals, starts, horizon=5)
    np.testing.assert_allclose(paths, positions, atol=1e-6)
    assert control.success_rate(goals, goals, 0.01) == 1.0
    assert control.success_rate(goals + 0.5, goals, 0.1) == 0.0
