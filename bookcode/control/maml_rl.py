"""MAML for reinforcement learning (Finn, Abbeel & Levine 2017, sections 3.2
and 5.3) on the point-navigation family, on :mod:`bookcode.meta`'s inner loop.

For a meta-batch of goals, in one compiled graph: sample ``N`` trajectories
per goal from the policy ``theta`` (no gradient through sampling), take
``inner_steps`` REINFORCE steps ``theta' = theta - alpha grad L(theta)`` per
goal (:func:`bookcode.meta.adapt`, all goals at once with one set of fast
weights per goal), sample ``N`` new trajectories per goal from ``theta'`` and
minimise the REINFORCE surrogate of those at ``theta'``, differentiated
through the inner step (second order unless ``first_order=True``). The
outer step is a plain policy-gradient step with Adam (the paper uses TRPO).
As in the paper's code, the meta-gradient ignores how the post-update
sampling distribution depends on ``theta`` through the pre-update samples.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from .. import distribute
from ..meta.learners import GradientMetaLearner, _check_steps
from ..meta.objectives import REGRESSION
from .environment import HORIZON, MAX_ACTION
from .policy import batched_forward, dense_layers
from .policy_gradient import advantages, gaussian_log_prob, reinforce_surrogate
from .rollouts import episode_returns, sample_trajectories


class _NotForRL:
    """A base-class method that has no meaning for MAML-RL: reading it raises
    ``AttributeError`` with the reason (so ``hasattr`` is false too)."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        raise AttributeError(
            f"MAMLRL has no {self.name}(): a reinforcement-learning task has no labelled "
            "support set; the policy adapts from trajectories it samples itself. Use "
            "adapt_to_goals(goals, steps) (returns after each step, adapted policies) or "
            "predict_actions(goals, positions, steps)."
        )


class AdaptedPolicies:
    """Policies adapted to a batch of goals by :meth:`MAMLRL.adapt_to_goals`.

    ``returns`` (goals, steps + 1): the mean return of the ``N`` sampled
    trajectories before and after each adaptation step (each step uses the
    trajectories whose return is recorded before it); ``trajectories``
    (steps + 1, goals, N, horizon + 1, 2): their positions; ``weights``: the
    fast weights (one set per goal); :meth:`actions`: mean actions."""

    def __init__(self, learner, goals, weights, returns, trajectories):
        self.learner, self.goals, self.weights = learner, goals, weights
        self.returns, self.trajectories = returns, trajectories

    def actions(self, positions):
        """Mean actions of each goal's adapted policy at ``positions``
        (goals, ..., 2)."""
        x = tf.convert_to_tensor(positions, tf.float32)
        if x.shape.rank < 2 or x.shape[0] != len(self.goals) or x.shape[-1] != 2:
            raise ValueError(f"positions must be ({len(self.goals)}, ..., 2), got {x.shape}")
        fn = self.learner._compiled("policy_mean", self.learner.policy_mean)
        return fn(self.weights, x).numpy()


@keras.saving.register_keras_serializable(package="bookcode")
class MAMLRL(GradientMetaLearner):
    """MAML for reinforcement learning (Finn et al. 2017) on
    :class:`~bookcode.control.PointNavigation` goals.

    ``model`` is the policy mean, a ``keras.Sequential`` of ``Dense`` layers
    from position to action (:func:`~bookcode.control.mlp_policy`); the
    learner adds a state-independent log standard deviation per action
    (``init_log_std``), adapted and meta-trained with the rest. Inner step:
    REINFORCE with a leave-one-out time baseline on ``num_trajectories``
    trajectories per goal, rate ``inner_lr``. Trained with ``fit()`` on a
    dataset of goal batches (B, 2) (:func:`~bookcode.control.goal_dataset`);
    logs the surrogate ``loss`` and the mean return before and after
    adaptation. With ``inner_steps=0`` it is plain policy gradient on the
    mixture of goals: the "pretrained" baseline of the paper.

    A task here has no labelled support set, so ``predict_episode`` (and the
    support-set ``adapt``) do not apply: :meth:`adapt_to_goals` adapts by
    sampling trajectories of each goal and returns the returns after each
    step and the adapted policies; :meth:`predict_actions` gives their mean
    actions at given positions.

    >>> learner = MAMLRL(mlp_policy(), inner_lr=0.1)
    >>> learner.compile(keras.optimizers.Adam(1e-3))
    >>> learner.fit(goal_dataset(batch_size=20, seed=0), steps_per_epoch=100)
    >>> learner.adapt_to_goals(sample_goals(40, seed=1), steps=3).returns.mean(0)
    """

    predict_episode = _NotForRL()
    adapt = _NotForRL()
    adaptation_curve = _NotForRL()

    def __init__(self, model, inner_lr=0.1, inner_steps: int = 1, first_order: bool = False,
                 test_inner_steps: int | None = None, num_trajectories: int = 20,
                 horizon: int = HORIZON, discount: float = 0.99, init_log_std: float = 0.0,
                 normalize_advantages: bool = True, max_action: float = MAX_ACTION,
                 sampling_seed: int = 0, **kwargs):  # fmt: skip
        layers = dense_layers(model)
        kwargs.pop("kind", None)
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps,
                         first_order=first_order, test_inner_steps=test_inner_steps,
                         kind=REGRESSION, **kwargs)  # fmt: skip
        if _check_steps(num_trajectories, "num_trajectories") < 2:
            raise ValueError("num_trajectories must be at least 2 (the baseline leaves one out)")
        if _check_steps(horizon, "horizon") < 1:
            raise ValueError("horizon must be a positive integer")
        if not 0 <= discount <= 1:
            raise ValueError(f"discount must be in [0, 1], got {discount!r}")
        self.num_trajectories, self.horizon = int(num_trajectories), int(horizon)
        self.discount, self.init_log_std = float(discount), float(init_log_std)
        self.normalize_advantages, self.max_action = bool(normalize_advantages), float(max_action)
        self.sampling_seed = int(sampling_seed)
        self.log_std = self.add_weight(
            shape=(layers[-1].units,), initializer=keras.initializers.Constant(init_log_std),
            dtype="float32", name="log_std",
        )  # fmt: skip
        for key in ("return_before", "return_after"):
            self._metric(key)

    # -- the engine's hooks ----------------------------------------------------

    @property
    def meta_variables(self):
        return list(self.model.trainable_variables) + [self.log_std]

    @property
    def fast_weight_names(self):
        return [v.path for v in self.meta_variables]

    @property
    def objective_keys(self):
        return ("loss", "return_before", "return_after")

    # -- policy, sampling, surrogate (fast weights carry a leading goal axis) ----

    def policy_mean(self, fast, positions):
        """Mean action (B, ..., 2) at ``positions`` (B, ..., 2)."""
        return batched_forward(self.model, fast[:-1], positions)

    def sample(self, fast, goals, seed, num_trajectories=None):
        """Trajectories of each goal's policy (see
        :func:`~bookcode.control.sample_trajectories`)."""
        fast = [tf.stop_gradient(f) for f in fast]
        return sample_trajectories(
            lambda s: self.policy_mean(fast, s), fast[-1], goals,
            num_trajectories or self.num_trajectories, seed, self.horizon,
            max_action=self.max_action,
        )  # fmt: skip

    def surrogate(self, fast, trajectories):
        """REINFORCE surrogate of each goal's trajectories at ``fast``: (B,)."""
        mean = self.policy_mean(fast, trajectories["observations"])
        log_std = fast[-1][:, None, None, :]
        log_probs = gaussian_log_prob(trajectories["actions"], mean, log_std)
        adv = advantages(trajectories["rewards"], self.discount, self.normalize_advantages)
        return reinforce_surrogate(log_probs, adv)

    def policy_gradient_loss(self, goals, seed, first=None):
        """``loss_fn(fast, step)`` for :func:`~bookcode.meta.adapt`: the sum
        over goals of the surrogate of trajectories sampled from the current
        fast weights (``first``: the trajectories for step 0, already
        sampled), so the gradient with respect to each goal's fast weights
        is that goal's policy-gradient estimate."""

        def loss_fn(fast, step):
            def sampled():
                return self.sample(
                    fast, goals, tf.random.experimental.stateless_fold_in(seed, step)
                )

            if first is None:
                trajectories = sampled()
            else:
                trajectories = tf.cond(tf.equal(step, 0), lambda: first, sampled)
            return tf.reduce_sum(self.surrogate(fast, trajectories))

        return loss_fn

    @staticmethod
    def tile(weights, count):
        """Each tensor repeated along a new leading axis of size ``count``
        (the gradient of the result sums over it)."""
        return [tf.repeat(w[None], count, axis=0) for w in weights]

    # -- training -------------------------------------------------------------

    def _seed(self):
        step = tf.cast(self.optimizer.iterations, tf.int32)
        return tf.stack([step, tf.constant(self.sampling_seed, tf.int32)])

    def meta_objective(self, weights, goals, seed):
        """The meta-loss of a batch of goals (mean over goals) and the mean
        returns before and after adaptation."""
        tiled = self.tile(weights, tf.shape(goals)[0])
        fold = tf.random.experimental.stateless_fold_in
        if self.inner_steps == 0:
            fast = tiled
        else:
            first = self.sample(tiled, goals, fold(seed, 0))
            loss_fn = self.policy_gradient_loss(goals, seed, first)
            fast, _ = self.adapt_task(tiled, None, None, self.inner_steps, self.first_order,
                                      inner_loss=loss_fn)  # fmt: skip
        after = self.sample(fast, goals, fold(seed, 1_000_003))
        returns_after = tf.reduce_mean(episode_returns(after["rewards"]))
        returns_before = (
            returns_after if self.inner_steps == 0
            else tf.reduce_mean(episode_returns(first["rewards"]))
        )  # fmt: skip
        loss = tf.reduce_mean(self.surrogate(fast, after))
        return {"loss": loss, "return_before": returns_before, "return_after": returns_after}

    def train_step(self, data):
        goals = data[0] if isinstance(data, (tuple, list)) else data
        goals = tf.cast(goals, tf.float32)
        variables = self.meta_variables
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            weights = [tf.convert_to_tensor(v) for v in variables]
            tape.watch(weights)
            results = self.meta_objective(weights, goals, self._seed())
        grads = tape.gradient(results["loss"], weights,
                              unconnected_gradients=tf.UnconnectedGradients.NONE)  # fmt: skip
        grads = self._check_meta_gradients(grads, weights, variables)
        # under tf.distribute each replica holds a slice of the goals (with the same
        # sampling seed): its share of the mean, which the optimiser sums over replicas
        grads = distribute.scale(grads, distribute.replica_share(tf.shape(goals)[0]))
        self.optimizer.apply(grads, variables)
        return self._log(results)

    def test_step(self, data):
        raise ValueError("MAMLRL has no evaluate(): use adapt_to_goals(goals, steps).returns")

    # -- adaptation to new goals ---------------------------------------------------

    def _adapt_graph(self, weights, goals, seed, steps, num_trajectories=None):
        fast = self.tile(weights, tf.shape(goals)[0])
        fold = tf.random.experimental.stateless_fold_in
        returns, paths = [], []
        for k in range(steps + 1):
            trajectories = self.sample(fast, goals, fold(seed, k), num_trajectories)
            returns.append(tf.reduce_mean(episode_returns(trajectories["rewards"]), axis=-1))
            obs = trajectories["observations"]
            actions = tf.clip_by_value(trajectories["actions"][:, :, -1:], -self.max_action,
                                       self.max_action)  # fmt: skip
            paths.append(tf.concat([obs, obs[:, :, -1:] + actions], axis=2))
            if k < steps:

                def loss_fn(f, step, trajectories=trajectories):
                    return tf.reduce_sum(self.surrogate(f, trajectories))

                fast, _ = self.adapt_task(fast, None, None, 1, True, inner_loss=loss_fn)
        return fast, tf.stack(returns, axis=1), tf.stack(paths)

    def adapt_to_goals(self, goals, steps: int | None = None, seed: int = 0,
                       num_trajectories: int | None = None) -> AdaptedPolicies:  # fmt: skip
        """Adapt to each goal (G, 2) with ``steps`` policy-gradient steps
        (default ``test_inner_steps``) of rate ``inner_lr``, each on
        ``num_trajectories`` (default: the learner's) fresh trajectories; an
        :class:`AdaptedPolicies` with the returns before and after each step.
        ``seed`` fixes the sampling."""
        steps = _check_steps(self.test_inner_steps if steps is None else steps, "steps")
        n = self.num_trajectories if num_trajectories is None else num_trajectories
        if _check_steps(n, "num_trajectories") < 2:
            raise ValueError("num_trajectories must be at least 2 (the baseline leaves one out)")
        goals = np.asarray(goals, np.float32)
        if goals.ndim != 2 or goals.shape[1] != 2 or not len(goals):
            raise ValueError(f"goals must have shape (G, 2), got {goals.shape}")
        fn = self._compiled(
            f"adapt_to_goals_{steps}_{n}", lambda w, g, s: self._adapt_graph(w, g, s, steps, n)
        )
        seed = tf.constant([int(seed), self.sampling_seed + 1], tf.int32)
        fast, returns, paths = fn(self._meta_weights(), tf.constant(goals), seed)
        return AdaptedPolicies(self, goals, fast, returns.numpy(), paths.numpy())

    def predict_actions(self, goals, positions, steps: int | None = None, seed: int = 0):
        """Mean actions at ``positions`` (G, ..., 2) of the policies adapted
        to ``goals`` (G, 2) with ``steps`` steps (see :meth:`adapt_to_goals`)."""
        return self.adapt_to_goals(goals, steps, seed).actions(positions)

    def get_config(self):
        config = super().get_config()
        for key in ("kind", "combiner"):
            config.pop(key, None)
        return {
            **config,
            "num_trajectories": self.num_trajectories,
            "horizon": self.horizon,
            "discount": self.discount,
            "init_log_std": self.init_log_std,
            "normalize_advantages": self.normalize_advantages,
            "max_action": self.max_action,
            "sampling_seed": self.sampling_seed,
        }


def goal_dataset(batch_size: int, seed: int = 0, low: float = -0.5, high: float = 0.5):
    """An endless ``tf.data.Dataset`` of goal batches (batch_size, 2), uniform
    in ``[low, high]^2``, seeded: the training data of :class:`MAMLRL`."""
    if _check_steps(batch_size, "batch_size") < 1:
        raise ValueError("batch_size must be positive")
    seed = int(seed)

    def batch(i):
        return tf.random.stateless_uniform(
            (batch_size, 2), tf.stack([tf.constant(seed, tf.int64), i]), low, high
        )

    return tf.data.Dataset.counter().map(batch)
