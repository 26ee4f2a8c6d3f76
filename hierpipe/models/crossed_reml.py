r"""Crossed (or any) variance components by block elimination of the largest factor.

With :math:`\Lambda = \operatorname{diag}(\theta_k)` and :math:`M = \Lambda Z^\top Z\Lambda + I`
(lme4's :math:`L_\theta L_\theta^\top`), :math:`\log|V_\theta| = \log|M|` and
:math:`z^\top V_\theta^{-1} z = z^\top z - U^\top M^{-1} U`, :math:`U = \Lambda Z^\top z`
(Woodbury). Order the factor with the most groups (students, say) first: its
block of :math:`M` is diagonal, :math:`D = I + \theta_e^2 \operatorname{diag}(n_g)`,
so eliminating it leaves the Schur complement on the other factors (teachers)

.. math::
    S = M_{RR} - M_{Re} D^{-1} M_{eR}, \qquad
    \log|M| = \textstyle\sum_g \log D_g + \log|S|, \qquad
    U^\top M^{-1} U = U_e^\top D^{-1} U_e + W^\top S^{-1} W,\ W = U_R - M_{Re}D^{-1}U_e.

Every entry comes from the non-empty cells (distinct student-teacher pairs):
:math:`M_{eR}` has one entry a cell and factor, and :math:`M_{Re}D^{-1}M_{eR}`
one a pair of cells sharing a student, so building :math:`S` costs
:math:`O(\text{cells} + \text{pairs})`; it is factorised densely
(:math:`O(q_R^3)`, :math:`q_R` the groups of the other factors, which is why the
largest factor is the one eliminated). Conditional modes and joint draws of
all effects use the same block Cholesky factor
:math:`L = \begin{pmatrix} D^{1/2} & 0 \\ M_{Re}D^{-1/2} & L_S\end{pmatrix}`.

This evaluator needs no nesting, so for nested data it is an independent check
of :mod:`hierpipe.models.nested_reml`.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from hierpipe.errors import MethodError
from hierpipe.models.variance_components import CellStats

#: Largest number of groups in the factors other than the largest for which the
#: Schur complement is factorised densely (q^3/3 flops a criterion evaluation).
MAX_DENSE = 2000


def _apply(mat: sparse.csr_matrix, x: np.ndarray) -> np.ndarray:
    """``mat @ x`` along axis 1 of ``x`` (C, n[, r]), for every chain in one sparse product."""
    C, n = x.shape[:2]
    flat = np.moveaxis(x, 1, 0).reshape(n, -1)
    out = np.asarray(mat @ flat)
    return np.moveaxis(out.reshape(mat.shape[0], C, *x.shape[2:]), 0, 1)


class CrossedEvaluator:
    """The :class:`~hierpipe.models.variance_components.Evaluator` by block elimination.

    With :math:`A` the counts of the eliminated factor's groups (rows) in the
    other factors' groups (columns) and :math:`t` each column's
    :math:`\\theta_k`, :math:`M_{Re} = \\theta_e\\, t \\odot A^\\top` and
    :math:`S = I + (t t^\\top) \\odot (A_{RR} - \\theta_e^2 A^\\top D^{-1} A)`;
    :math:`A^\\top D^{-1} A` is summed over pairs of cells that share a group of
    the eliminated factor, all chains in one sparse product.
    """

    def __init__(self, stats: CellStats) -> None:
        self.stats = stats
        counts = stats.group_counts
        K = stats.K
        self.e = int(np.argmax(counts))
        self.rest = [k for k in range(K) if k != self.e]
        self.offsets = np.cumsum([0] + [counts[k] for k in self.rest])
        self.q2 = int(self.offsets[-1])
        if self.q2 > MAX_DENSE:
            names = ", ".join(stats.factors[k] for k in self.rest)
            raise MethodError(
                f"grouping factors {names} have {self.q2} groups together; the crossed "
                f"fit factorises their {self.q2}x{self.q2} block densely and supports at "
                f"most {MAX_DENSE}"
            )
        self.Ge = counts[self.e]
        codes, n = stats.codes, stats.n
        cells = np.arange(stats.n_cells)
        q2, Ge = self.q2, self.Ge
        g = codes[:, self.e]
        self.n_g = np.bincount(g, weights=n, minlength=Ge)
        self.col_k = np.repeat(np.array(self.rest, dtype=np.int64), np.diff(self.offsets))
        cols = [self.offsets[j] + codes[:, k] for j, k in enumerate(self.rest)]
        # cell -> eliminated group, cell -> other groups (one column per other factor)
        self.cell_to_g = sparse.csr_matrix(
            (np.ones(cells.size), (g, cells)), shape=(Ge, cells.size)
        )
        self.cell_to_col = sparse.csr_matrix(
            (np.ones(cells.size * len(cols)), (np.concatenate(cols), np.tile(cells, len(cols)))),
            shape=(q2, cells.size),
        )
        # A: counts of each eliminated group in each other group (Ge x q2), and A^T
        self.A = sparse.csr_matrix(
            (np.tile(n, len(cols)), (np.tile(g, len(cols)), np.concatenate(cols))), shape=(Ge, q2)
        )
        self.At = self.A.T.tocsr()
        # A_RR = Z_R' Z_R (counts of pairs of other groups sharing a cell)
        rr = np.zeros((q2, q2))
        for c1 in cols:
            for c2 in cols:
                np.add.at(rr, (c1, c2), n)
        self.A_RR = rr
        # pairs of A's nonzeros in one row: A^T diag(w) A summed as one product
        coo = self.A.tocoo()
        order = np.argsort(coo.row, kind="stable")
        rows, colv, val = coo.row[order], coo.col[order], coo.data[order]
        per = np.bincount(rows, minlength=Ge)
        starts = np.cumsum(per) - per
        reps = per[rows]
        first = np.repeat(np.arange(rows.size), reps)
        offs = np.arange(first.size) - np.repeat(np.cumsum(reps) - reps, reps)
        second = starts[rows[first]] + offs
        self.pair_g = rows[first]
        self.pair_w = val[first] * val[second]
        self.pair_sum = sparse.csr_matrix(
            (np.ones(first.size), (colv[first] * q2 + colv[second], np.arange(first.size))),
            shape=(q2 * q2, first.size),
        )
        zbar = stats.zbar
        self.base = stats.pooled_within + np.einsum("g,bgi,bgj->bij", n, zbar, zbar)
        self.Te, self.TR = self._totals(stats.sums)

    def _totals(self, sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sums over each eliminated group (C|B, Ge, r) and each other group (C|B, q2, r)."""
        return _apply(self.cell_to_g, sums), _apply(self.cell_to_col, sums)

    # ------------------------------------------------------------------ pieces
    def _parts(self, theta2: np.ndarray):
        theta2 = np.maximum(np.asarray(theta2, dtype=float), 0.0)
        th = np.sqrt(theta2)
        te2 = theta2[:, self.e]
        D = 1.0 + te2[:, None] * self.n_g
        t = th[:, self.col_k]
        inv = (1.0 / D)[:, self.pair_g] * self.pair_w
        E = (self.pair_sum @ inv.T).T.reshape(-1, self.q2, self.q2)
        S = (t[:, :, None] * t[:, None, :]) * (self.A_RR - te2[:, None, None] * E)
        S[:, np.arange(self.q2), np.arange(self.q2)] += 1.0
        return th, D, S, t

    def _u(self, th: np.ndarray, D: np.ndarray, t: np.ndarray, Te: np.ndarray, TR: np.ndarray):
        """U_e = theta_e T_e and W = U_R - M_Re D^-1 U_e."""
        te = th[:, self.e, None, None]
        Ue = te * Te
        W = t[..., None] * (TR - _apply(self.At, te**2 * Te / D[..., None]))
        return Ue, W

    def _m12(self, th: np.ndarray, t: np.ndarray, x2: np.ndarray) -> np.ndarray:
        """M_eR x2 = theta_e A (t * x2)."""
        tt = t if x2.ndim == 2 else t[..., None]
        te = th[:, self.e, None] if x2.ndim == 2 else th[:, self.e, None, None]
        return te * _apply(self.A, tt * x2)

    # ------------------------------------------------------------------ interface
    def terms(self, theta2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        th, D, S, t = self._parts(theta2)
        L = np.linalg.cholesky(S)
        logdet = np.log(D).sum(axis=1) + 2.0 * np.log(np.diagonal(L, axis1=1, axis2=2)).sum(1)
        Ue, W = self._u(th, D, t, self.Te, self.TR)
        SW = np.linalg.solve(S, W)
        Q = (
            self.base
            - np.einsum("cgi,cg,cgj->cij", Ue, 1.0 / D, Ue)
            - np.einsum("cqi,cqj->cij", W, SW)
        )
        return logdet, Q

    def _solve(self, theta2: np.ndarray, sums: np.ndarray):
        th, D, S, t = self._parts(theta2)
        Ue, W = self._u(th, D, t, *self._totals(sums))
        x2 = np.linalg.solve(S, W)
        x1 = (Ue - self._m12(th, t, x2)) / D[..., None]
        return th, D, S, t, x1, x2

    def _split(self, th: np.ndarray, x1: np.ndarray, x2: np.ndarray) -> list[np.ndarray]:
        out: list = [None] * self.stats.K
        pad = (None,) * (x1.ndim - 1)
        out[self.e] = th[(slice(None), self.e, *pad)] * x1
        for j, k in enumerate(self.rest):
            out[k] = th[(slice(None), k, *pad)] * x2[:, self.offsets[j] : self.offsets[j + 1]]
        return out

    def modes(self, theta2: np.ndarray, sums: np.ndarray) -> list[np.ndarray]:
        th, _, _, _, x1, x2 = self._solve(theta2, sums)
        return self._split(th, x1, x2)

    def cond_var(self, theta2: np.ndarray) -> list[np.ndarray]:
        th, D, S, t = self._parts(theta2)
        Sinv = np.linalg.inv(S)
        Adense = self.A.toarray()
        # Y = D^-1 M_eR (dense, Ge x q2 a chain): only for the final fit's few chains
        Y = th[:, self.e, None, None] * Adense[None] * t[:, None, :] / D[..., None]
        d1 = 1.0 / D + np.einsum("cgi,cij,cgj->cg", Y, Sinv, Y)
        d2 = np.diagonal(Sinv, axis1=1, axis2=2)
        out: list = [None] * self.stats.K
        out[self.e] = th[:, self.e, None] ** 2 * d1
        for j, k in enumerate(self.rest):
            out[k] = th[:, k, None] ** 2 * d2[:, self.offsets[j] : self.offsets[j + 1]]
        return out

    def draw(
        self,
        theta2: np.ndarray,
        sigma: np.ndarray,
        resid_sums: np.ndarray,
        rng: np.random.Generator,
    ) -> list[np.ndarray]:
        th, D, S, t, x1, x2 = self._solve(theta2, resid_sums[..., None])
        C = th.shape[0]
        L = np.linalg.cholesky(S)
        eps2 = rng.standard_normal((C, self.q2, 1))
        v2 = np.linalg.solve(np.swapaxes(L, 1, 2), eps2)[..., 0]
        eps1 = rng.standard_normal((C, self.Ge))
        sq = np.sqrt(D)
        v1 = (eps1 - self._m12(th, t, v2) / sq) / sq
        s = sigma[:, None]
        return self._split(th, x1[..., 0] + s * v1, x2[..., 0] + s * v2)
