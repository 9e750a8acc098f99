"""Meta-learning for control (chapters 6 and 9): a vectorised 2-D
point-navigation task family, MAML for reinforcement learning and one-shot
meta-imitation learning.

- :class:`PointNavigation`, :func:`sample_goals`, :func:`straight_line_expert`,
  :func:`run_policy`: the point robot of Finn, Abbeel & Levine 2017 (section
  5.3), in NumPy; :func:`transition` and :func:`sample_trajectories`, the same
  dynamics compiled in TensorFlow, many episodes as one batch.
- :func:`mlp_policy`, :func:`batched_forward`: the policy, run with one set of
  weights per task at once.
- :func:`rewards_to_go`, :func:`leave_one_out_baseline`, :func:`advantages`,
  :func:`gaussian_log_prob`, :func:`reinforce_surrogate`: REINFORCE with a
  baseline (Williams 1992).
- :class:`MAMLRL` (Finn et al. 2017), trained on :func:`goal_dataset`; with
  ``inner_steps=0`` the policy pretrained on all goals.
- :func:`demonstrations`, :func:`imitation_tasks`, :func:`imitation_dataset`,
  :func:`behaviour_cloning`, :func:`imitation_rollouts`: one-shot
  meta-imitation (Finn, Yu, Zhang, Abbeel & Levine 2017, "One-Shot Visual
  Imitation Learning via Meta-Learning") with :class:`bookcode.meta.MAML` on a
  behaviour-cloning loss, and behaviour cloning from scratch.
"""

from .environment import (
    GOAL_HIGH,
    GOAL_LOW,
    HORIZON,
    MAX_ACTION,
    PointNavigation,
    run_policy,
    sample_goals,
    step_positions,
    straight_line_expert,
    transition,
)
from .imitation import (
    DEMO_HORIZON,
    adapted_weights,
    behaviour_cloning,
    demonstrations,
    imitation_dataset,
    imitation_rollouts,
    imitation_tasks,
    random_weights,
    stack_weights,
    success_rate,
)
from .maml_rl import MAMLRL, AdaptedPolicies, goal_dataset
from .policy import batched_forward, dense_layers, mlp_policy
from .policy_gradient import (
    advantages,
    gaussian_log_prob,
    leave_one_out_baseline,
    reinforce_surrogate,
    rewards_to_go,
)
from .rollouts import episode_returns, sample_trajectories

__all__ = [
    "DEMO_HORIZON",
    "GOAL_HIGH",
    "GOAL_LOW",
    "HORIZON",
    "MAMLRL",
    "MAX_ACTION",
    "AdaptedPolicies",
    "PointNavigation",
    "adapted_weights",
    "advantages",
    "batched_forward",
    "behaviour_cloning",
    "demonstrations",
    "dense_layers",
    "episode_returns",
    "gaussian_log_prob",
    "goal_dataset",
    "imitation_dataset",
    "imitation_rollouts",
    "imitation_tasks",
    "leave_one_out_baseline",
    "mlp_policy",
    "random_weights",
    "reinforce_surrogate",
    "rewards_to_go",
    "run_policy",
    "sample_goals",
    "sample_trajectories",
    "stack_weights",
    "step_positions",
    "straight_line_expert",
    "success_rate",
    "transition",
]
