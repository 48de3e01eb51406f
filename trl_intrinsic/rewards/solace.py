"""SOLACE: the model's own noise-recovery accuracy as an intrinsic reward (Kim et al., §4).

For a final latent ``z0`` of prompt ``c`` and each probe sigma ``t`` of the probe set ``T`` (the
sampler's own sigmas in the trained window), ``K`` noise probes ``ε_m`` re-noise the latent along
the rectified-flow path and the model is asked to recover them::

    z_t       = (1 − t)·z0 + t·ε_m
    ε̂         = v_θ(z_t, t, c) + z0                         (flow matching: v = ε − z0)
    MSE_{i,t} = mean_m mean_dims (ε̂ − ε_m)²
    S_{i,t}   = −log(MSE_{i,t} + δ)
    R_i       = Σ_t w(t)·S_{i,t} / Σ_t w(t)

The probes are drawn once per prompt group and shared by every image of the group, so that the
group-relative advantage compares images, not probe draws; with antithetic pairing
(``ε_{m+K/2} = −ε_m``) they have an exact zero mean. ``v_θ`` is the *conditional* velocity (no
classifier-free guidance), of the policy being trained (online) or of the frozen base model.

Where the paper and its authors' released code differ, the paper is the default and the code's
choice is an option:

* weighting: the paper uses ``w(t) = 1``; the code weights by ``t(1 − t)``
  (``timestep_weighting="t(1-t)"``; we still divide by ``Σ_t w(t)`` as in the paper's eq. 14, where
  the code averages the weighted scores);
* normalisation: the paper has none; the code standardises ``S_{·,t}`` across the batch at each
  sigma before weighting (``normalize="per_timestep"``);
* probes: the paper shares the ``K`` probes across a group; the code draws them per image. We
  follow the paper (there is no option for per-image probes: it adds variance to the advantages);
* error: the paper's eq. 12 writes a squared norm (a sum over dims); the code, and we, take the
  mean over dims, which only shifts ``S`` by ``−log(dims)`` when ``δ`` is negligible, and keeps δ
  meaningful whatever the latent size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from trl_intrinsic.seeding import derived_seed

__all__ = ["SolaceReward", "solace_reward"]

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_WEIGHTINGS = ("uniform", "t(1-t)")
_NORMALIZATIONS = (None, "per_timestep")


def _probe_seed(seed: int, step: int, group_id: int) -> int:
    """A 63-bit generator seed that depends only on ``(seed, step, group_id)``, identical on every process."""
    return derived_seed(seed, "solace", step, group_id)


def _global_step(trainer_state: Any) -> int:
    if trainer_state is None:
        return 0
    step = trainer_state.get("global_step", 0) if isinstance(trainer_state, dict) else None
    if step is None:
        step = getattr(trainer_state, "global_step", 0)
    return int(step or 0)


class SolaceReward:
    """The SOLACE self-confidence reward, a flow reward function (see module docstring for the maths).

    Called as ``reward(prompts, images, *, latents, velocity_fn, train_sigmas, ...)`` by
    ``FlowGRPOTrainer``; returns one float per row. It never looks at ``images``
    (``requires_images = False``), so the trainer can skip VAE decoding.

    Args:
        num_probes: ``K``, noise probes per group and sigma (paper: 8). Even when ``antithetic``.
        antithetic: draw ``K/2`` probes and use them with both signs, for an exact zero mean.
        delta: ``δ > 0`` in ``−log(MSE + δ)``; bounds the reward by ``−log δ``.
        timestep_weighting: ``"uniform"`` (paper, ``w = 1``) or ``"t(1-t)"`` (authors' code).
        normalize: ``None`` (paper) or ``"per_timestep"`` (authors' code): standardise ``S_{·,t}``
            across the rows of the call at each sigma, ``(S − mean) / max(std, 1e-6)`` with the
            unbiased std (0 for a single row). The result then depends on which rows share a call,
            i.e. on how groups are split over processes; the default does not.
        online: ``True`` (paper) queries the policy being trained (``velocity_fn``); ``False`` the
            frozen base model (``reference_velocity_fn``), the paper's offline ablation.
        max_batch_size: at most this many rows per velocity call (``None``: all ``K·|T|·B`` rows in
            one call). Bounds memory; the result does not depend on it. The default, 64, measured faster
            on CPU than one call of all rows (1,280 rows of a Flow-GRPO epoch in one call cost 1.5–2× per row
            and 1.5× the memory); raise it on a GPU with memory to spare.
        seed: base seed of the probes. The probes of a group are drawn from a generator seeded by
            ``(seed, trainer_state.global_step, group_id)``, so they agree across processes that
            hold parts of one group, and change from step to step.
    """

    requires_images = False

    def __init__(
        self,
        num_probes: int = 8,
        antithetic: bool = True,
        delta: float = 1e-6,
        timestep_weighting: str = "uniform",
        normalize: str | None = None,
        online: bool = True,
        max_batch_size: int | None = 64,
        seed: int = 0,
    ) -> None:
        if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
            raise ValueError(f"`num_probes` must be a positive int, got {num_probes!r}.")
        if antithetic and num_probes % 2:
            raise ValueError(
                f"`num_probes` must be even with `antithetic=True` (probes come in ± pairs), got "
                f"{num_probes}; use an even number or `antithetic=False`."
            )
        if not (isinstance(delta, (int, float)) and math.isfinite(delta) and delta > 0):
            raise ValueError(f"`delta` must be a finite number > 0, got {delta!r}.")
        if timestep_weighting not in _WEIGHTINGS:
            raise ValueError(
                f"`timestep_weighting` must be one of {_WEIGHTINGS}, got {timestep_weighting!r}."
            )
        if normalize not in _NORMALIZATIONS:
            raise ValueError(f"`normalize` must be one of {_NORMALIZATIONS}, got {normalize!r}.")
        if max_batch_size is not None and (
            isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1
        ):
            raise ValueError(f"`max_batch_size` must be None or a positive int, got {max_batch_size!r}.")
        self.num_probes = num_probes
        self.antithetic = bool(antithetic)
        self.delta = float(delta)
        self.timestep_weighting = timestep_weighting
        self.normalize = normalize
        self.online = bool(online)
        self.max_batch_size = max_batch_size
        self.seed = int(seed)
        self.__name__ = "solace_reward"

    def __repr__(self) -> str:
        return (
            f"SolaceReward(num_probes={self.num_probes}, antithetic={self.antithetic}, delta={self.delta}, "
            f"timestep_weighting={self.timestep_weighting!r}, normalize={self.normalize!r}, "
            f"online={self.online}, max_batch_size={self.max_batch_size}, seed={self.seed})"
        )

    # ------------------------------------------------------------------ probes and sigmas

    def probes(self, group_id: int, latent_shape: Sequence[int], step: int = 0) -> torch.Tensor:
        """The ``(K, *latent_shape)`` fp32 CPU probes of one group at one training step.

        Deterministic in ``(seed, step, group_id)``; with ``antithetic`` rows ``K/2:`` are ``−`` rows ``:K/2``.
        """
        generator = torch.Generator().manual_seed(_probe_seed(self.seed, step, int(group_id)))
        num_drawn = self.num_probes // 2 if self.antithetic else self.num_probes
        eps = torch.randn((num_drawn, *latent_shape), generator=generator, dtype=torch.float32)
        return torch.cat([eps, -eps]) if self.antithetic else eps

    @staticmethod
    def probe_sigmas(train_sigmas: Any) -> torch.Tensor:
        """The probe set ``T``: ``train_sigmas`` as a 1-D fp64 tensor without zeros (``t = 0`` is degenerate)."""
        if train_sigmas is None:
            raise ValueError(
                "SOLACE needs `train_sigmas` (the sigmas of the trained window, the probe set); "
                "call it through FlowGRPOTrainer or pass `train_sigmas=` explicitly."
            )
        sig = torch.as_tensor(train_sigmas, dtype=torch.float64).detach().cpu().reshape(-1)
        if not torch.isfinite(sig).all() or (sig < 0).any() or (sig > 1).any():
            raise ValueError(f"`train_sigmas` must lie in [0, 1], got {sig.tolist()}.")
        sig = sig[sig > 0]
        if sig.numel() == 0:
            raise ValueError("`train_sigmas` has no non-zero sigma: SOLACE cannot probe at t = 0 only.")
        return sig

    def _weights(self, sigmas: torch.Tensor) -> torch.Tensor:
        w = torch.ones_like(sigmas) if self.timestep_weighting == "uniform" else sigmas * (1 - sigmas)
        if w.sum() <= 0:
            raise ValueError(
                f"`timestep_weighting={self.timestep_weighting!r}` gives zero total weight on the probe "
                f"sigmas {sigmas.tolist()}; use `timestep_weighting='uniform'`."
            )
        return w

    # ------------------------------------------------------------------ the reward

    def scores(
        self,
        latents: torch.Tensor,
        velocity_fn: VelocityFn,
        train_sigmas: Any,
        group_ids: Sequence[int] | torch.Tensor | None = None,
        step: int = 0,
    ) -> torch.Tensor:
        """Per-sigma self-confidence ``S`` of shape ``(B, |T|)`` (before normalisation and weighting).

        Args:
            latents: ``(B, *latent_shape)`` final latents ``z0`` in the transformer's space.
            velocity_fn: ``(x_t (N, *latent_shape), sigma (N,), rows (N,)) -> v (N, *latent_shape)``,
                conditional velocity of row ``i`` under the prompt of batch row ``rows[i]``.
            train_sigmas: probe sigmas in ``(0, 1]`` (zeros are dropped).
            group_ids: ``B`` ints, equal = same prompt group (shared probes); ``None``: one group.
            step: training step mixed into the probe seed.
        """
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise TypeError("`latents` must be a floating-point torch.Tensor of shape (B, *latent_shape).")
        if latents.ndim < 2 or latents.shape[0] == 0:
            raise ValueError(f"`latents` must have shape (B ≥ 1, *latent_shape), got {tuple(latents.shape)}.")
        if not torch.isfinite(latents).all():
            raise ValueError("`latents` contains NaN or inf: the rollout diverged; SOLACE cannot score it.")
        if not callable(velocity_fn):
            raise TypeError(
                f"SOLACE needs a callable velocity function (x_t, sigma, rows) -> v, got {type(velocity_fn)}."
            )
        batch, latent_shape = latents.shape[0], tuple(latents.shape[1:])
        sigmas = self.probe_sigmas(train_sigmas)
        group_index, group_list = self._groups(group_ids, batch)

        device = latents.device
        compute_dtype = torch.promote_types(latents.dtype, torch.float32)
        z0 = latents.detach().to(compute_dtype)
        eps = torch.stack([self.probes(g, latent_shape, step) for g in group_list]).to(device, compute_dtype)
        group_index = group_index.to(device)
        sig = sigmas.to(device, compute_dtype)
        k, num_t = self.num_probes, sigmas.numel()
        total = num_t * k * batch
        chunk = self.max_batch_size or total
        sq_err = torch.zeros(num_t * batch, dtype=compute_dtype, device=device)

        with torch.no_grad():
            for start in range(0, total, chunk):
                # Row n ↦ (sigma index, probe index, image index), image fastest.
                n = torch.arange(start, min(start + chunk, total), device=device)
                t_idx, m_idx, rows = n // (k * batch), (n // batch) % k, n % batch
                t = sig[t_idx].view(-1, *([1] * len(latent_shape)))
                eps_n = eps[group_index[rows], m_idx]
                z0_n = z0[rows]
                x_t = (1 - t) * z0_n + t * eps_n
                v = velocity_fn(x_t.to(latents.dtype), sig[t_idx].to(torch.float32), rows)
                if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(x_t.shape):
                    got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v)
                    raise ValueError(
                        f"velocity_fn must return a tensor shaped like x_t {tuple(x_t.shape)}, got {got}."
                    )
                err = (v.to(compute_dtype) + z0_n - eps_n).square().flatten(1).mean(dim=1)
                sq_err.index_add_(0, t_idx * batch + rows, err)

        mse = (sq_err / k).view(num_t, batch).T  # (B, |T|)
        return -torch.log(mse + self.delta)

    def reduce(self, scores: torch.Tensor, train_sigmas: Any) -> torch.Tensor:
        """``(B, |T|)`` scores → ``(B,)`` rewards: optional per-sigma standardisation, then the weighted mean."""
        sigmas = self.probe_sigmas(train_sigmas).to(scores.device, scores.dtype)
        if self.normalize == "per_timestep":
            correction = 1 if scores.shape[0] > 1 else 0
            std = scores.std(dim=0, keepdim=True, correction=correction).clamp_min(1e-6)
            scores = (scores - scores.mean(dim=0, keepdim=True)) / std
        w = self._weights(sigmas)
        return (scores * w).sum(dim=1) / w.sum()

    def __call__(
        self,
        prompts: Sequence[str] | None = None,
        images: Sequence[Any] | None = None,
        *,
        latents: torch.Tensor | None = None,
        velocity_fn: VelocityFn | None = None,
        reference_velocity_fn: VelocityFn | None = None,
        train_sigmas: Any = None,
        group_ids: Sequence[int] | torch.Tensor | None = None,
        trainer_state: Any = None,
        **kwargs: Any,
    ) -> list[float]:
        """Score a batch of rollouts; returns ``B`` floats (higher = noise recovered better)."""
        if latents is None:
            raise ValueError(
                "SOLACE needs `latents` (the final latents z0); call it through FlowGRPOTrainer."
            )
        fn = velocity_fn if self.online else reference_velocity_fn
        if fn is None:
            name = "velocity_fn" if self.online else "reference_velocity_fn"
            raise ValueError(f"SolaceReward(online={self.online}) needs `{name}`.")
        if prompts is not None and len(prompts) != latents.shape[0]:
            raise ValueError(f"Got {len(prompts)} prompts for {latents.shape[0]} latents.")
        step = _global_step(trainer_state)
        scores = self.scores(latents, fn, train_sigmas, group_ids, step)
        return [float(r) for r in self.reduce(scores, train_sigmas).cpu()]

    @staticmethod
    def _groups(group_ids: Any, batch: int) -> tuple[torch.Tensor, list[int]]:
        """Map group ids to ``(index into the list of distinct ids (B,), distinct ids)``."""
        if group_ids is None:
            return torch.zeros(batch, dtype=torch.long), [0]
        ids = torch.as_tensor(group_ids).detach().cpu().reshape(-1)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"`group_ids` must be integers, got dtype {ids.dtype}.")
        if ids.numel() != batch:
            raise ValueError(f"`group_ids` has {ids.numel()} entries for {batch} latents; give one per row.")
        distinct, index = torch.unique(ids, return_inverse=True)
        return index.long(), [int(g) for g in distinct]


solace_reward = SolaceReward()
"""The paper's setting: K = 8 antithetic probes, δ = 1e-6, uniform weights, online, no normalisation."""
