"""Statistics that make SOLACE's known failure visible: textureless, low-variance, identical images.

Training on too many timesteps, or sampling without CFG, lets the policy steer its latents to regimes
where injected noise is trivially easy to recover (SOLACE §4, "observed causes of training collapse"):
images turn blank or textureless, and a group's images become alike. Each statistic below drops
towards zero as that happens. They are cheap (no model call) and model-agnostic, so they are compared
with their own value at the start of training rather than with fixed thresholds, except for the
blank-image share of decoded images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["BLANK_IMAGE_STD", "group_diversity", "image_std", "latent_statistics", "pooled"]

BLANK_IMAGE_STD = 0.02
"""An image whose pixel standard deviation (0–1 units, mean over RGB) is below this is counted as blank
(about 5 grey levels of 255)."""


def latent_statistics(latents: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample spread and texture of final latents.

    Args:
        latents: `(B, C, h, w)` final (clean) latents, in the model's latent units.

    Returns:
        ``{"std": (B,), "texture": (B,)}`` in float32: ``std`` is the spatial standard deviation of each
        channel, averaged over channels; ``texture`` is the mean absolute difference between vertically
        and horizontally neighbouring latent pixels (total variation per pixel), averaged over channels.
    """
    if latents.dim() != 4:
        raise ValueError(f"latents must have shape (B, C, h, w), got {tuple(latents.shape)}.")
    x = latents.detach().float()
    std = x.flatten(2).std(dim=-1, unbiased=False).mean(dim=1)
    vertical = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean(dim=(1, 2, 3))
    horizontal = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean(dim=(1, 2, 3))
    return {"std": std, "texture": (vertical + horizontal) / 2}


def pooled(latents: torch.Tensor, size: int = 8) -> torch.Tensor:
    """`(B, C, h, w)` → `(B, C·s·s)` float32 latents average-pooled to at most ``size``×``size``, small
    enough to gather across processes for :func:`group_diversity`."""
    x = latents.detach().float()
    if x.shape[-1] > size or x.shape[-2] > size:
        x = F.adaptive_avg_pool2d(x, (min(size, x.shape[-2]), min(size, x.shape[-1])))
    return x.flatten(1)


def group_diversity(features: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """How different the samples of one prompt are.

    Args:
        features: `(N, D)` per-sample features (e.g. :func:`pooled` latents).
        group_ids: `(N,)` integer group of each sample; groups need at least two samples.

    Returns:
        Scalar: the standard deviation across each group's samples, averaged over the `D` features and
        then over groups (latent units). Zero when every group's samples are identical.
    """
    if features.dim() != 2 or group_ids.shape != features.shape[:1]:
        raise ValueError(
            f"features must be (N, D) and group_ids (N,), got {tuple(features.shape)} and {tuple(group_ids.shape)}."
        )
    _, inverse = torch.unique(group_ids, return_inverse=True)
    spreads = [
        features[inverse == g].std(dim=0, unbiased=False).mean() for g in range(int(inverse.max()) + 1)
    ]
    return torch.stack(spreads).mean()


def image_std(images: torch.Tensor) -> torch.Tensor:
    """Per-image pixel standard deviation.

    Args:
        images: `(B, 3, H, W)` in [0, 1].

    Returns:
        `(B,)` float32: the spatial standard deviation of each channel, averaged over channels (0–1 units).
        Compare with :data:`BLANK_IMAGE_STD`.
    """
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}.")
    return images.detach().float().flatten(2).std(dim=-1, unbiased=False).mean(dim=1)
