"""Flow-matching sampling as a stochastic policy: SDE steps, pipeline adapters and rollouts."""

from trl_intrinsic.flow.sde import SDEStepOutput, sde_step_with_logprob

__all__ = [
    "FlowPipelineAdapter",
    "PromptEmbeddings",
    "Rollout",
    "SDEStepOutput",
    "get_flow_adapter",
    "register_flow_adapter",
    "sample_trajectories",
    "sde_step_with_logprob",
    "sde_window",
    "train_step_indices",
]

_LAZY = {
    "FlowPipelineAdapter": "trl_intrinsic.flow.pipelines",
    "PromptEmbeddings": "trl_intrinsic.flow.pipelines",
    "get_flow_adapter": "trl_intrinsic.flow.pipelines",
    "register_flow_adapter": "trl_intrinsic.flow.pipelines",
    "Rollout": "trl_intrinsic.flow.rollout",
    "sample_trajectories": "trl_intrinsic.flow.rollout",
    "sde_window": "trl_intrinsic.flow.rollout",
    "train_step_indices": "trl_intrinsic.flow.rollout",
}


def __getattr__(name: str):
    # Adapters import diffusers; keep `from trl_intrinsic.flow import sde_step_with_logprob` light.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trl_intrinsic.flow' has no attribute {name!r}")
