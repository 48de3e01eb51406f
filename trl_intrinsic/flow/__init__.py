"""Flow-matching sampling as a stochastic policy: SDE steps, pipeline adapters, rollouts, weights, and the
maths of DiffusionNFT (:mod:`trl_intrinsic.flow.nft`).

``from trl_intrinsic.flow import sde_step_with_logprob`` stays light: the adapters (which import diffusers)
load on first use.
"""

from trl_intrinsic._lazy import lazy_exports
from trl_intrinsic.flow.sde import SDEStepOutput, sde_step_with_logprob

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

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
