r"""Preconditioners for :func:`bilevel.linsolve.cg`: maps ``r ↦ M r`` with ``M ≈ A⁻¹`` symmetric positive definite.

:func:`lbfgs_preconditioner` recycles curvature from an earlier solve. Along a hyperparameter run the inner Hessian
changes little from one outer step to the next, so the pairs (p_k, A p_k) one CG solve met are a nearly free
approximation of the next solve's operator: no Hessian-vector product is spent on building it (Morales & Nocedal,
2000, "Automatic Preconditioning by Limited Memory Quasi-Newton Updating", SIAM J. Optim. 10(4)).

Memory. The pairs live as the rows of one (2·capacity, P) matrix in the working dtype (:class:`CurvaturePairs`), and
the preconditioner reads its rows in place: m pairs cost 2m vectors of P entries, with no second copy when the
preconditioner is built. Their Gram matrix is formed in float64 a block of columns at a time (temporaries of about
one vector) and, along a run, only for the rows a solve added. A CG solve that records m new pairs writes them into
a new matrix beside the one its preconditioner reads, and :func:`recycle_pairs` tops that matrix up with the old
pairs still kept. So the ``cg`` solver holds 2m vectors between outer steps, and at the peak of a step, while the
solve records its pairs, 4m + 1 more than plain CG (the two matrices and the vector z = M r, which plain CG does not
need): ``benchmarks/preconditioner_memory.py`` measures 20 and 41 for m = 10 (P = 10⁵ and 10⁶, float64 and float32).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, overload

import numpy as np
import torch
from torch import Tensor

from bilevel import tree
from bilevel.errors import BilevelError
from bilevel.types import Params

CurvaturePair = tuple[Params, Params]
"""(s, y) with y = A s: a direction and the operator applied to it."""


class _Storage:
    """Room for ``capacity`` pairs as the rows of one (2·capacity, P) tensor, allocated at the first append: the pair
    in slot j is row 2j (s) and row 2j + 1 (y), flattened. Slots are written once, in order (``used`` so far), and
    never changed afterwards, so every :class:`CurvaturePairs` naming written slots keeps seeing the same pairs."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self.rows: Tensor | None = None
        self.like: Params = {}  # names and shapes of the Params (meta tensors: no data)

    def append(self, s: Params, y: Params) -> int:
        """Copy (s, y) into the next free slot and return it."""
        if self.used == self.capacity:
            raise BilevelError(f"CurvaturePairs: all {self.capacity} slots are written.")
        if self.rows is None:
            first = next(iter(s.values()))
            self.like = {k: torch.empty(v.shape, device="meta") for k, v in s.items()}
            self.rows = torch.empty(2 * self.capacity, tree.size(s), dtype=tree.floating_dtype(s), device=first.device)
        slot = self.used
        for row, pair_half in ((2 * slot, s), (2 * slot + 1, y)):
            for k, view in tree.unflatten(self.rows[row], self.like).items():
                view.copy_(pair_half[k])
        self.used += 1
        return slot

    def extend(self, pairs: Sequence[CurvaturePair]) -> list[int]:
        """Copy ``pairs`` into the next free slots and return them: the rows of a :class:`CurvaturePairs` of the same
        size, dtype and device in one gather (no temporary), other pairs one by one."""
        source = pairs._storage.rows if isinstance(pairs, CurvaturePairs) else None
        rows = self.rows
        if (source is None or rows is None or source.shape[1] != rows.shape[1] or source.dtype != rows.dtype
                or source.device != rows.device or self.used + len(pairs) > self.capacity):
            return [self.append(s, y) for s, y in pairs]
        assert isinstance(pairs, CurvaturePairs)
        index = torch.tensor([row for slot in pairs._slots for row in (2 * slot, 2 * slot + 1)], device=rows.device)
        start = self.used
        torch.index_select(source, 0, index, out=rows[2 * start : 2 * (start + len(pairs))])
        self.used += len(pairs)
        return list(range(start, self.used))


class CurvaturePairs(Sequence[CurvaturePair]):
    r"""Curvature pairs (s_i, y_i = A s_i), oldest first, held as the rows of one matrix in the working dtype, with
    their Gram matrix G = [S Y]ᵀ[S Y] (S = [s_1 … s_n], Y = [y_1 … y_n]) in float64 on the host.

    A sequence of (s, y) Params (views into the matrix, not copies): ``len``, indexing, iteration and slicing (a
    slice is again a :class:`CurvaturePairs` on the same matrix) work as on a tuple of pairs. What
    :func:`bilevel.linsolve.cg` returns for ``record_pairs`` and what :func:`recycle_pairs` returns; build one from
    other pairs with :meth:`from_pairs` (one copy). Values: nothing changes the pairs a handle names.
    """

    def __init__(self, storage: _Storage, slots: Sequence[int], gram: np.ndarray | None = None):
        self._storage = storage
        self._slots = tuple(slots)
        self._gram = gram
        self._block: tuple[Tensor, np.ndarray] | None = None

    @classmethod
    def from_pairs(cls, pairs: Sequence[CurvaturePair], *, capacity: int | None = None) -> CurvaturePairs:
        """The pairs copied into a new matrix with room for ``capacity`` (default ``len(pairs)``) pairs; a
        :class:`CurvaturePairs` without ``capacity`` is returned as it is."""
        if isinstance(pairs, CurvaturePairs) and capacity is None:
            return pairs
        storage = _Storage(max(len(pairs), capacity or 0, 1))
        return cls(storage, [storage.append(s, y) for s, y in pairs])

    def to_state(self) -> dict[str, Any]:
        """The matrix, its slots and the Gram matrix as plain data, for a checkpoint (see :meth:`from_state`)."""
        storage = self._storage
        return {"capacity": storage.capacity, "used": storage.used, "rows": storage.rows,
                "like": {k: tuple(v.shape) for k, v in storage.like.items()}, "slots": list(self._slots),
                "gram": None if self._gram is None else torch.from_numpy(self._gram.copy())}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> CurvaturePairs:
        """Inverse of :meth:`to_state`: the same rows in the same layout (so a resumed run computes the same)."""
        storage = _Storage(state["capacity"])
        storage.used, storage.rows = state["used"], state["rows"]
        storage.like = {k: torch.empty(shape, device="meta") for k, shape in state["like"].items()}
        gram = None if state["gram"] is None else state["gram"].numpy()
        return cls(storage, state["slots"], gram)

    def __len__(self) -> int:
        return len(self._slots)

    @overload
    def __getitem__(self, index: int) -> CurvaturePair: ...

    @overload
    def __getitem__(self, index: slice) -> CurvaturePairs: ...

    def __getitem__(self, index: int | slice) -> CurvaturePair | CurvaturePairs:
        if isinstance(index, slice):
            positions = range(len(self))[index]
            gram = None
            if self._gram is not None:
                logical = np.concatenate([np.asarray(positions, dtype=int), len(self) + np.asarray(positions, dtype=int)])
                gram = self._gram[np.ix_(logical, logical)]
            return CurvaturePairs(self._storage, [self._slots[i] for i in positions], gram)
        slot = self._slots[index]
        rows, like = self._storage.rows, self._storage.like
        assert rows is not None
        return tree.unflatten(rows[2 * slot], like), tree.unflatten(rows[2 * slot + 1], like)

    def __iter__(self) -> Iterator[CurvaturePair]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        rows = self._storage.rows
        shape = "" if rows is None else f" of {rows.shape[1]} entries ({rows.dtype})"
        return f"CurvaturePairs({len(self)} pairs{shape}, matrix for {self._storage.capacity})"

    @property
    def gram(self) -> np.ndarray:
        """G = [S Y]ᵀ[S Y], (2n, 2n) float64 whatever the working precision (the R⁻¹ of
        :class:`LBFGSPreconditioner` amplifies rounding); formed once, from the matrix's rows in place."""
        if self._gram is None:
            block, position = self._rows()
            products = _products(block, block)
            self._gram = products[np.ix_(position, position)]
        return self._gram

    def _rows(self) -> tuple[Tensor, np.ndarray]:
        """The contiguous rows of the matrix that cover this handle's slots (a view) and, for each logical index of
        [S Y] (s_1 … s_n, y_1 … y_n), its row in that block."""
        if self._block is None:
            rows = self._storage.rows
            assert rows is not None and self._slots
            low = 2 * min(self._slots)
            slots = np.asarray(self._slots, dtype=int)
            self._block = rows[low : 2 * max(self._slots) + 2], np.concatenate([2 * slots, 2 * slots + 1]) - low
        return self._block


class LBFGSPreconditioner:
    r"""The limited-memory BFGS inverse approximation H ≈ A⁻¹ built from curvature pairs (s_i, y_i = A s_i),
    i = 1..m, starting from H₀ = γI with γ = s_mᵀy_m / y_mᵀy_m, applied in the compact form of Byrd, Nocedal &
    Schnabel, 1994, "Representations of quasi-Newton matrices and their use in limited memory methods", Math.
    Program. 63 (their eq. 3.1 for the inverse):

    .. math::
        H = \gamma I + \begin{bmatrix} S & \gamma Y \end{bmatrix}
        \begin{bmatrix} R^{-\top}(D + \gamma Y^\top Y) R^{-1} & -R^{-\top} \\ -R^{-1} & 0 \end{bmatrix}
        \begin{bmatrix} S^\top \\ \gamma Y^\top \end{bmatrix},

    with S = [s_1 … s_m], Y = [y_1 … y_m], R the upper triangle of SᵀY and D its diagonal. H is symmetric positive
    definite when every s_iᵀy_i > 0, and satisfies the secant equation H y_m = s_m (all H y_i = s_i when the pairs
    are A-conjugate, as CG's are). One application costs two products with the 2m × P matrix [S Y]ᵀ and a 2m × 2m
    one, the same as the two-loop recursion's 4m dot products but as two matrix-vector calls.

    ``pairs``: a :class:`CurvaturePairs` (read in place: the preconditioner adds no vector of P entries) or any
    sequence of (s, y) Params (copied once into one).
    """

    def __init__(self, pairs: Sequence[CurvaturePair]):
        if not pairs:
            raise BilevelError("LBFGSPreconditioner: needs at least one curvature pair (s, y = A s).")
        self._build(CurvaturePairs.from_pairs(pairs), np.arange(len(pairs)))

    @classmethod
    def _from_pairs(cls, pairs: CurvaturePairs, keep: np.ndarray) -> LBFGSPreconditioner:
        self = cls.__new__(cls)
        self._build(pairs, keep)
        return self

    def _build(self, pairs: CurvaturePairs, keep: np.ndarray) -> None:
        """From the pairs at positions ``keep`` (ascending) of ``pairs``. The 2m × 2m algebra runs on the host in
        float64 numpy (for such small matrices per-op overhead, not flops, is the cost); the kernel is then placed
        at the rows the pairs occupy in the matrix (zeros elsewhere), so the products read that matrix in place."""
        n, m = len(pairs), keep.size
        logical = np.concatenate([keep, keep + n])
        gram = pairs.gram if m == n else pairs.gram[np.ix_(logical, logical)]
        sy, yy = gram[:m, m:], gram[m:, m:]  # (SᵀY)_ij = s_iᵀ y_j
        curvature = np.diag(sy)
        if not (curvature > 0).all():
            bad = int(keep[np.flatnonzero(curvature <= 0)[0]])
            raise BilevelError(
                f"LBFGSPreconditioner: pair {bad} has sᵀy={curvature[curvature <= 0][0]:.3g} ≤ 0; every pair needs "
                "positive curvature (a positive-definite A along s). Drop such pairs (lbfgs_preconditioner does)."
            )
        gamma = float(curvature[-1] / yy[-1, -1])
        r_inv = np.linalg.inv(np.triu(sy))
        kernel = np.zeros((2 * m, 2 * m))
        kernel[:m, :m] = r_inv.T @ (np.diag(curvature) + gamma * yy) @ r_inv
        kernel[:m, m:] = -gamma * r_inv.T
        kernel[m:, :m] = -gamma * r_inv
        basis, position = pairs._rows()
        placed = np.zeros((basis.shape[0], basis.shape[0]))
        placed[np.ix_(position[logical], position[logical])] = kernel
        self._basis = basis
        self._basis_t = basis.T
        self._kernel = torch.from_numpy(placed).to(device=basis.device, dtype=basis.dtype)
        self.gamma = gamma
        self.size = m

    def __call__(self, r: Params) -> Params:
        """H r = γ r + [S γY] K [S γY]ᵀ r (the γ of γY is folded into the kernel)."""
        flat = tree.flatten(r)
        coefficients = self._kernel @ (self._basis @ flat)
        return tree.unflatten(torch.addmv(flat, self._basis_t, coefficients, beta=self.gamma), r)


def lbfgs_preconditioner(pairs: Sequence[CurvaturePair], *, memory: int = 10) -> LBFGSPreconditioner | None:
    r"""M = H_LBFGS ≈ A⁻¹ from the first ``memory`` pairs with positive curvature sᵀy > 0, or None if there are none.

    Meant for the pairs :func:`bilevel.linsolve.cg` records (``record_pairs``), which are its first ones: CG's first
    directions resolve the largest eigenvalues of A, which is what a preconditioner has to take out. Measured by
    ``benchmarks/preconditioner_iterations.py`` (CG iterations over 30 outer steps of the ``cg`` solver at rtol 1e-8,
    ridge / breast cancer / spambase): recycling each solve's first 10 pairs 884 / 431 / 500, its last 10 pairs
    1044 / 548 / 623, no preconditioner 1132 / 616 / 717. A :class:`CurvaturePairs` (what ``cg`` and
    :func:`recycle_pairs` return) is read in place, other pairs are copied once. Morales & Nocedal, 2000, "Automatic
    Preconditioning by Limited Memory Quasi-Newton Updating", SIAM J. Optim. 10(4).
    """
    if memory < 1:
        raise BilevelError(f"lbfgs_preconditioner: memory must be >= 1, got {memory}.")
    if not pairs:
        return None
    if isinstance(pairs, CurvaturePairs):
        n = len(pairs)
        curvature = np.diag(pairs.gram[:n, n:])
    else:  # select before copying: only the pairs used are stacked
        curvature = np.array([_products(tree.flatten(s)[None], tree.flatten(y)[None])[0, 0] for s, y in pairs])
    keep = np.flatnonzero(curvature > 0)[:memory]
    if keep.size == 0:
        return None
    if not isinstance(pairs, CurvaturePairs):
        pairs, keep = CurvaturePairs.from_pairs([pairs[int(i)] for i in keep]), np.arange(keep.size)
    return LBFGSPreconditioner._from_pairs(pairs, keep)


def recycle_pairs(
    old: Sequence[CurvaturePair], new: Sequence[CurvaturePair], *, memory: int = 10
) -> CurvaturePairs | tuple[()]:
    """The ``memory`` most recent pairs of ``old`` followed by ``new``, oldest first (the order the BFGS updates take),
    as a :class:`CurvaturePairs` (``()`` when both are empty).

    A preconditioned solve that converges in a few iterations records only a few new pairs; topping them up with the
    previous solve's keeps the next preconditioner from losing what the last one knew. Measured by
    ``benchmarks/preconditioner_iterations.py`` (CG iterations over 30 outer steps of the ``cg`` solver, ridge /
    breast cancer / spambase): at rtol 1e-4, where solves are shorter than the memory, 325 / 152 / 167 against
    331 / 170 / 177 with the latest solve's pairs alone (532 / 337 / 348 without preconditioner); at rtol 1e-8,
    where every solve records its 10 pairs, 884 / 431 / 500 against 884 / 443 / 500. When ``new`` is what
    ``cg(..., record_pairs=memory)`` returned, the old pairs kept are copied into the free rows of its matrix (no new
    matrix: ``old``'s is left as it is, and freed with the last reference to it) and the Gram matrix is extended
    rather than recomputed: ``old``'s entries are reused and only the products with the new pairs are formed.
    """
    if memory < 1:
        raise BilevelError(f"recycle_pairs: memory must be >= 1, got {memory}.")
    if new and not isinstance(new, CurvaturePairs):
        new = CurvaturePairs.from_pairs(new, capacity=memory)
    keep = min(len(old), max(memory - len(new), 0))
    if not new:
        return CurvaturePairs.from_pairs(old[len(old) - keep :]) if keep else ()
    if keep == 0:
        return new[max(len(new) - memory, 0) :]
    assert isinstance(new, CurvaturePairs)
    storage = new._storage
    if storage.capacity - storage.used < keep:  # no free slots (a full matrix, or another recycle took them): copy
        return CurvaturePairs.from_pairs([*old[len(old) - keep :], *new], capacity=memory)
    kept = old[len(old) - keep :]
    slots = storage.extend(kept) + list(new._slots)
    known = kept._gram if isinstance(kept, CurvaturePairs) else None
    return CurvaturePairs(storage, slots, None if known is None else _extend_gram(storage, slots, keep, known))


def _extend_gram(storage: _Storage, slots: Sequence[int], keep: int, known: np.ndarray) -> np.ndarray:
    """The Gram matrix of the pairs in ``slots``, whose first ``keep`` have Gram matrix ``known``: only the
    products of the others' rows with every row are formed."""
    n = len(slots)
    block, position = CurvaturePairs(storage, slots)._rows()
    fresh = np.concatenate([np.arange(keep, n), n + np.arange(keep, n)])  # logical indices of the new pairs
    new_rows = position[fresh]
    low = int(new_rows.min())
    products = _products(block[low : int(new_rows.max()) + 1], block)
    gram = np.empty((2 * n, 2 * n))
    gram[fresh] = products[new_rows - low][:, position]
    gram[:, fresh] = gram[fresh].T
    for rows, known_rows in ((slice(0, keep), slice(0, keep)), (slice(n, n + keep), slice(keep, 2 * keep))):
        gram[rows, :keep] = known[known_rows, :keep]
        gram[rows, n : n + keep] = known[known_rows, keep:]
    return gram


def _products(left: Tensor, right: Tensor) -> np.ndarray:
    """left rightᵀ in float64 on the host, for rows (r, P) and (q, P) in the working dtype. float64 rows are
    multiplied as they are; lower precisions are cast a block of columns at a time, so the float64 temporaries
    ((r + q) × block) stay within about one vector of P entries in the working dtype."""
    if left.dtype == torch.float64:
        return (left @ right.T).cpu().numpy()
    size = left.shape[1]
    block = max(1024, size * left.element_size() // (8 * (left.shape[0] + right.shape[0])))
    out = torch.zeros(left.shape[0], right.shape[0], dtype=torch.float64, device=left.device)
    for start in range(0, size, block):
        out += left[:, start : start + block].double() @ right[:, start : start + block].double().T
    return out.cpu().numpy()
