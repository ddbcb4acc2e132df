"""Expected calibration error and the reliability diagram's bins."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["calibration"]


def calibration(probabilities: Tensor, labels: Tensor, bins: int = 15) -> dict[str, Any]:
    """ECE (Guo et al. 2017: equal-width confidence bins, weighted by count) and its bins.

    Args:
        probabilities: (N, K) class probabilities.
        labels: (N,) true classes.
        bins: number of equal-width confidence bins over [0, 1].

    Returns:
        ``{"ece": float, "bins": [{"lower", "upper", "count", "confidence", "accuracy"}]}``;
        empty bins have ``None`` confidence and accuracy.
    """
    if probabilities.dim() != 2 or probabilities.shape[0] != labels.shape[0]:
        raise ValueError(
            f"need (N, K) probabilities and (N,) labels, got {tuple(probabilities.shape)} and "
            f"{tuple(labels.shape)}."
        )
    confidence, prediction = probabilities.float().max(dim=1)
    correct = (prediction == labels).float()
    edges = torch.linspace(0.0, 1.0, bins + 1)
    # Bin k holds confidences in (edge_k, edge_k+1]; a confidence of exactly 0 joins bin 0.
    index = (torch.bucketize(confidence, edges[1:-1], right=False)).clamp(0, bins - 1)
    table = []
    ece = 0.0
    total = max(1, len(labels))
    for k in range(bins):
        members = index == k
        count = int(members.sum())
        mean_confidence = float(confidence[members].mean()) if count else None
        accuracy = float(correct[members].mean()) if count else None
        if count:
            ece += count / total * abs(accuracy - mean_confidence)  # type: ignore[operator]
        table.append(
            {
                "lower": float(edges[k]),
                "upper": float(edges[k + 1]),
                "count": count,
                "confidence": mean_confidence,
                "accuracy": accuracy,
            }
        )
    return {"ece": ece, "bins": table}
