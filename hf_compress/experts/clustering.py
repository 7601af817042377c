"""Seeded k-means on unit embeddings: the experts' clusters and their centroids (the router's keys).

Spherical k-means (assign by cosine similarity, centroids re-normalised), k-means++ initialisation from a
``torch.Generator``, several restarts keeping the lowest inertia: the same inputs and seed give the same
clusters on every run. Written here in a few lines of torch rather than taken from scikit-learn, which is
not a dependency of hf_compress.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..utils import check_int, check_seed


__all__ = ["Clustering", "assign", "kmeans"]


@dataclass(frozen=True)
class Clustering:
    """Unit centroids ``[k, dim]``, each row's cluster ``[n]`` and the inertia (sum of ``1 - cos``)."""

    centroids: torch.Tensor
    labels: torch.Tensor
    inertia: float

    def sizes(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.centroids)).tolist()


def assign(embeddings: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the most cosine-similar centroid for each row (ties: the lower index).

    Example:
        >>> assign(torch.tensor([[1.0, 0.1], [0.0, 1.0]]), torch.eye(2)).tolist()
        [0, 1]
    """
    return (embeddings @ centroids.T).argmax(dim=1)


def kmeans(embeddings: torch.Tensor, k: int, *, seed: int = 0, restarts: int = 4, iterations: int = 100) -> Clustering:
    """Cluster unit-norm ``embeddings`` ``[n, dim]`` into ``k`` non-empty clusters.

    Raises:
        ValueError: ``k`` exceeds the number of rows, or the rows hold fewer than ``k`` distinct points
            (a cluster would be empty).

    Example:
        >>> points = nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
        >>> kmeans(points, 2).sizes()
        [2, 2]
    """
    check_int("k", k, minimum=1)
    check_seed("seed", seed, numpy=True)
    x = embeddings.float()
    n = len(x)
    if k > n:
        raise ValueError(f"Cannot make {k} clusters from {n} examples; use num_experts <= {n} or add data.")
    generator = torch.Generator().manual_seed(seed)
    best: Clustering | None = None
    for _ in range(restarts):
        centroids = _kmeans_plus_plus(x, k, generator)
        labels = assign(x, centroids)
        for _ in range(iterations):
            sums = torch.zeros_like(centroids).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=k)
            # An emptied cluster is re-seeded at the row worst served by its centroid.
            for empty in torch.nonzero(counts == 0).flatten().tolist():
                worst = int((x * centroids[labels]).sum(1).argmin())
                sums[empty], counts[empty] = x[worst], 1
                labels[worst] = empty
            centroids = nn.functional.normalize(sums, dim=1)
            new_labels = assign(x, centroids)
            if torch.equal(new_labels, labels):
                break
            labels = new_labels
        inertia = float((1 - (x * centroids[labels]).sum(1)).sum())
        if best is None or inertia < best.inertia - 1e-9:
            best = Clustering(centroids, labels, inertia)
    empty = [i for i, size in enumerate(best.sizes()) if size == 0]
    if empty:
        raise ValueError(f"k-means left cluster(s) {empty} empty: the data holds fewer than {k} distinct "
                         "examples in the embedding space; use fewer experts or more varied data.")
    return best


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    first = int(torch.randint(len(x), (1,), generator=generator))
    chosen = [first]
    distance = (1 - x @ x[first]).clamp(min=0)
    for _ in range(1, k):
        total = float(distance.sum())
        if total <= 0:  # every row coincides with a chosen centre: fewer distinct points than k
            raise ValueError(f"k-means cannot place {k} centres: the data holds fewer than {k} distinct examples "
                             "in the embedding space; use fewer experts or more varied data.")
        index = int(torch.multinomial(distance / total, 1, generator=generator))
        chosen.append(index)
        distance = torch.minimum(distance, (1 - x @ x[index]).clamp(min=0))
    return x[chosen].clone()
