"""Candidate trees for one-forward verification of several drafted continuations (Medusa-style buffers).

A tree is a list of *paths*: ``(i_1, …, i_d)`` is the node reached by taking candidate ``i_1`` of the first
drafting position, then candidate ``i_2`` of the second, and so on. Every prefix of a path must itself be
in the tree. The root (the token the target just chose, not yet in its cache) is implicit: node ``n`` sits
at depth ``depths[n]`` after it and attends to the root, its ancestors and itself only.

Example:
    >>> tree = DraftTree([(0,), (1,), (0, 0)])
    >>> tree.num_nodes, tree.depth, tree.depths.tolist()
    (3, 2, [1, 1, 2])
    >>> tree.node_tokens(torch.tensor([[7, 8], [9, 5]])).tolist()   # top-2 tokens of the 2 positions
    [7, 8, 9]
    >>> tree.paths_to_leaves.tolist()                                 # node indices per leaf, -1 padded
    [[1, -1], [0, 2]]
"""

from __future__ import annotations

import heapq
import operator
from collections.abc import Iterable, Sequence

import torch

from ..utils import InvalidArgumentTypeError, check_int


Path = tuple[int, ...]

_PATHS_HELP = "paths must be a list of tuples of candidate ranks (ints >= 0), e.g. [(0,), (1,), (0, 0)]"


def _paths(paths) -> list:
    if isinstance(paths, (str, bytes)) or not isinstance(paths, Iterable):
        raise InvalidArgumentTypeError(f"{_PATHS_HELP}, got {paths!r}.")
    return list(paths)


def _path(path) -> Path:
    if isinstance(path, (str, bytes)) or not isinstance(path, Iterable):
        raise InvalidArgumentTypeError(f"{_PATHS_HELP}, got the path {path!r}.")
    try:
        if any(isinstance(i, bool) for i in path):
            raise TypeError
        return tuple(operator.index(i) for i in path)  # ints, numpy and 0-d tensor integers; not floats
    except TypeError:
        raise InvalidArgumentTypeError(f"{_PATHS_HELP}, got the path {path!r}.") from None


class DraftTree:
    """Static tree buffers: node order, ancestor mask, depths and the root-to-leaf paths.

    Args:
        paths: The nodes, each a tuple of candidate ranks (0 = a position's most likely token). Sorted by
            (depth, ranks) internally, which is the order of the drafted tokens fed to the target.
    """

    def __init__(self, paths: Sequence[Sequence[int]]):
        nodes = sorted({_path(p) for p in _paths(paths)}, key=lambda p: (len(p), p))
        if not nodes:
            raise ValueError("A draft tree needs at least one node, e.g. [(0,)].")
        known = set(nodes)
        for path in nodes:
            if not path or min(path) < 0:
                raise ValueError(f"Tree paths are non-empty tuples of candidate ranks >= 0; got {path}.")
            if len(path) > 1 and path[:-1] not in known:
                raise ValueError(f"Tree node {path} has no parent {path[:-1]} in the tree; add every prefix.")
        self.paths: list[Path] = nodes
        index = {p: n for n, p in enumerate(nodes)}
        # A tree is model-independent and lives on the CPU; users move what they need (e.g. depths.to(device)).
        self.parents = torch.tensor([index[p[:-1]] if len(p) > 1 else -1 for p in nodes], device="cpu")
        self.depths = torch.tensor([len(p) for p in nodes], device="cpu")
        self.ranks = torch.tensor([p[-1] for p in nodes], device="cpu")
        ancestors = torch.eye(len(nodes), dtype=torch.bool, device="cpu")
        for n, path in enumerate(nodes):
            for d in range(1, len(path)):
                ancestors[n, index[path[:d]]] = True
        self.ancestors = ancestors  # (N, N): node n may attend to node m
        leaves = [p for p in nodes if not any(q[: len(p)] == p and len(q) > len(p) for q in nodes)]
        retrieve = torch.full((len(leaves), max(len(p) for p in nodes)), -1, dtype=torch.long, device="cpu")
        for row, leaf in enumerate(leaves):
            retrieve[row, : len(leaf)] = torch.tensor([index[leaf[:d]] for d in range(1, len(leaf) + 1)], device="cpu")
        self.paths_to_leaves = retrieve  # (P, depth)

    # ------------------------------------------------------------------ sizes
    @property
    def num_nodes(self) -> int:
        return len(self.paths)

    @property
    def depth(self) -> int:
        return int(self.depths.max())

    @property
    def max_rank(self) -> int:
        """Largest candidate rank used; a drafter must provide ``max_rank + 1`` candidates per position."""
        return int(self.ranks.max())

    @property
    def top_chain(self) -> torch.LongTensor:
        """Node indices of the top-1 chain ``(0,), (0, 0), …`` as far as the tree holds it: what a chain would draft.

        Example:
            >>> DraftTree([(0,), (1,), (0, 0), (1, 0)]).top_chain.tolist()
            [0, 2]
        """
        index = {path: n for n, path in enumerate(self.paths)}
        nodes = []
        while (0,) * (len(nodes) + 1) in index:
            nodes.append(index[(0,) * (len(nodes) + 1)])
        return torch.tensor(nodes, dtype=torch.long, device="cpu")

    @property
    def is_chain(self) -> bool:
        """One node per depth, each the position's most likely token: drafting it is a plain argmax sequence."""
        return self.num_nodes == self.depth and self.max_rank == 0

    def __repr__(self) -> str:
        return f"DraftTree(num_nodes={self.num_nodes}, depth={self.depth}, leaves={len(self.paths_to_leaves)})"

    def __eq__(self, other) -> bool:
        return isinstance(other, DraftTree) and self.paths == other.paths

    def to_list(self) -> list[list[int]]:
        """JSON-friendly paths; ``DraftTree(tree.to_list()) == tree``."""
        return [list(p) for p in self.paths]

    # ------------------------------------------------------------------ building
    @classmethod
    def chain(cls, depth: int) -> DraftTree:
        """The top-1 guess of each of ``depth`` positions: plain (tree-less) speculative decoding."""
        check_int("depth", depth, minimum=1, hint="A chain drafts depth tokens, one per position.")
        return cls([(0,) * d for d in range(1, depth + 1)])

    @classmethod
    def from_accuracies(cls, accuracies: torch.Tensor, num_nodes: int) -> DraftTree:
        """The ``num_nodes`` tree with the largest expected accepted length, as Medusa builds its trees.

        ``accuracies[d, r]`` is how often candidate ``r`` of position ``d`` is the right token (measured on
        held-out text). Treating positions as independent, a node's chance of being accepted is the product
        of its ranks' accuracies, which only falls along a path, so best-first growth from the root is optimal.

        Example:
            >>> DraftTree.from_accuracies(torch.tensor([[0.6, 0.2], [0.4, 0.1]]), 3).paths
            [(0,), (1,), (0, 0)]
        """
        check_int("num_nodes", num_nodes, minimum=1)
        try:
            accuracies = torch.as_tensor(accuracies, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise InvalidArgumentTypeError(
                f"accuracies must be a (positions, candidates) table of numbers, got {type(accuracies).__name__}."
            ) from None
        if accuracies.ndim != 2 or not accuracies.numel() or not bool(torch.isfinite(accuracies).all()):
            raise ValueError("Pass accuracies as a non-empty (positions, candidates) table of finite numbers.")
        depth, ranks = accuracies.shape
        frontier = [(-float(accuracies[0, r]), (r,)) for r in range(ranks)]
        heapq.heapify(frontier)
        chosen: list[Path] = []
        while frontier and len(chosen) < num_nodes:
            negative_value, path = heapq.heappop(frontier)
            chosen.append(path)
            if len(path) < depth:
                for r in range(ranks):
                    heapq.heappush(frontier, (negative_value * float(accuracies[len(path), r]), path + (r,)))
        return cls(chosen)

    def truncated(self, max_depth: int) -> DraftTree:
        """The nodes at depth ``<= max_depth`` (near ``max_length`` fewer positions can be drafted)."""
        check_int("max_depth", max_depth, minimum=1)
        if max_depth >= self.depth:
            return self
        return DraftTree([p for p in self.paths if len(p) <= max_depth])

    # ------------------------------------------------------------------ using
    def node_tokens(self, candidates: torch.LongTensor) -> torch.LongTensor:
        """Token of every node, from ``candidates`` ``(..., positions, ranks)`` → ``(..., num_nodes)``."""
        if candidates.shape[-2] < self.depth or candidates.shape[-1] <= self.max_rank:
            raise ValueError(
                f"The tree needs {self.depth} positions x {self.max_rank + 1} candidates; got {tuple(candidates.shape[-2:])}."
            )
        return candidates[..., self.depths - 1, self.ranks]

    def attention_mask(self, past_length: int, num_pending: int, dtype: torch.dtype, device) -> torch.Tensor:
        """Additive 4-D mask ``(1, 1, q, past + q)`` for ``num_pending`` causal tokens followed by the nodes.

        Pending tokens see the past and earlier pending tokens; a node sees the past, every pending token
        (the last of which is the root), its ancestors and itself.
        """
        n = self.num_nodes
        q = num_pending + n
        allowed = torch.zeros(q, past_length + q, dtype=torch.bool, device=device)
        allowed[:, :past_length] = True
        allowed[:num_pending, past_length : past_length + num_pending] = torch.ones(
            num_pending, num_pending, dtype=torch.bool, device=device
        ).tril()
        allowed[num_pending:, past_length : past_length + num_pending] = True
        allowed[num_pending:, past_length + num_pending :] = self.ancestors.to(device)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[None, None]
