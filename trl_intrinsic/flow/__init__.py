"""Flow-matching sampling as a stochastic policy: SDE steps, pipeline adapters and rollouts."""

from trl_intrinsic.flow.sde import SDEStepOutput, sde_step_with_logprob

__all__ = ["SDEStepOutput", "sde_step_with_logprob"]
