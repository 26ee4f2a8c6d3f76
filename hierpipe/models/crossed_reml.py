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

from hierpipe.errors import MethodError
from hierpipe.models.variance_components import CellStats

#: Largest number of groups in the factors other than the largest for which the
#: Schur complement is factorised densely (q^3/3 flops a criterion evaluation).
MAX_DENSE = 2000


def _scatter(index: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """Sum ``values`` (C, E[, r]) into ``size`` slots by ``index`` (E,), per chain."""
    C = values.shape[0]
    flat = (np.arange(C)[:, None] * size + index[None, :]).ravel()
    if values.ndim == 2:
        return np.bincount(flat, weights=values.ravel(), minlength=C * size).reshape(C, size)
    r = values.shape[2]
    out = np.empty((C, size, r))
    for j in range(r):
        out[:, :, j] = np.bincount(
            flat, weights=values[:, :, j].ravel(), minlength=C * size
        ).reshape(C, size)
    return out


class CrossedEvaluator:
    """The :class:`~hierpipe.models.variance_components.Evaluator` by block elimination."""

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
        codes = stats.codes
        n = stats.n
        cells = np.arange(stats.n_cells)
        self.g_of_cell = codes[:, self.e]
        self.n_g = np.bincount(self.g_of_cell, weights=n, minlength=self.Ge)
        R = len(self.rest)
        # Entries: one a (cell, other factor).
        self.ent_cell = np.repeat(cells, R)
        self.ent_k = np.tile(np.array(self.rest), stats.n_cells)
        self.ent_col = (
            np.concatenate([self.offsets[j] + codes[:, k] for j, k in enumerate(self.rest)])
            .reshape(R, -1)
            .T.ravel()
        )
        self.ent_g = self.g_of_cell[self.ent_cell]
        self.ent_n = n[self.ent_cell]
        self.col_k = np.repeat(np.array(self.rest), np.diff(self.offsets))
        # Within-cell pairs of other factors: M_RR = I + Lambda Z_R'Z_R Lambda.
        a, b = np.meshgrid(np.arange(R), np.arange(R), indexing="ij")
        a, b = a.ravel(), b.ravel()
        ent = np.arange(stats.n_cells * R).reshape(-1, R)
        self.p0_e1 = ent[:, a].ravel()
        self.p0_e2 = ent[:, b].ravel()
        # Pairs of entries that share a group of the eliminated factor.
        order = np.argsort(self.ent_g, kind="stable")
        gs = self.ent_g[order]
        per_g = np.bincount(gs, minlength=self.Ge)
        starts = np.cumsum(per_g) - per_g
        reps = per_g[gs]
        first = np.repeat(np.arange(order.size), reps)
        offs = np.arange(first.size) - np.repeat(np.cumsum(reps) - reps, reps)
        self.p1_e1 = order[first]
        self.p1_e2 = order[starts[gs[first]] + offs]
        self.p0_flat = self.ent_col[self.p0_e1] * self.q2 + self.ent_col[self.p0_e2]
        self.p1_flat = self.ent_col[self.p1_e1] * self.q2 + self.ent_col[self.p1_e2]
        self.p1_g = self.ent_g[self.p1_e1]
        self.p0_w = self.ent_n[self.p0_e1]
        self.p1_w = self.ent_n[self.p1_e1] * self.ent_n[self.p1_e2]
        zbar = stats.zbar
        self.base = stats.pooled_within + np.einsum("g,bgi,bgj->bij", n, zbar, zbar)

    # ------------------------------------------------------------------ pieces
    def _parts(self, theta2: np.ndarray):
        th = np.sqrt(np.maximum(np.asarray(theta2, dtype=float), 0.0))
        C = th.shape[0]
        te = th[:, self.e]
        D = 1.0 + theta2[:, self.e, None] * self.n_g
        tk1 = th[:, self.ent_k[self.p0_e1]]
        tk2 = th[:, self.ent_k[self.p0_e2]]
        vals0 = tk1 * tk2 * self.p0_w
        s1 = th[:, self.ent_k[self.p1_e1]] * th[:, self.ent_k[self.p1_e2]]
        vals1 = (te**2)[:, None] * s1 * self.p1_w / D[:, self.p1_g]
        q2 = self.q2
        S = _scatter(
            np.concatenate([self.p0_flat, self.p1_flat]),
            np.concatenate([vals0, -vals1], axis=1),
            q2 * q2,
        ).reshape(C, q2, q2)
        S[:, np.arange(q2), np.arange(q2)] += 1.0
        # M_eR entries: theta_e theta_k n_c at (g, col).
        m_ent = te[:, None] * th[:, self.ent_k] * self.ent_n
        return th, D, S, m_ent

    def _u(self, th: np.ndarray, sums: np.ndarray):
        """U_e (C, Ge, r) and U_R (C, q2, r) from cell sums (C|B, cells, r)."""
        Te = _scatter(self.g_of_cell, sums, self.Ge)
        TR = _scatter(self.ent_col, sums[:, self.ent_cell], self.q2)
        Ue = th[:, self.e, None, None] * Te
        UR = th[:, self.col_k, None] * TR
        return Ue, UR

    def _w(self, D: np.ndarray, m_ent: np.ndarray, Ue: np.ndarray, UR: np.ndarray) -> np.ndarray:
        scaled = Ue / D[..., None]
        return UR - _scatter(self.ent_col, m_ent[..., None] * scaled[:, self.ent_g], self.q2)

    # ------------------------------------------------------------------ interface
    def terms(self, theta2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        th, D, S, m_ent = self._parts(theta2)
        L = np.linalg.cholesky(S)
        logdet = np.log(D).sum(axis=1) + 2.0 * np.log(np.diagonal(L, axis1=1, axis2=2)).sum(1)
        Ue, UR = self._u(th, self.stats.sums)
        W = self._w(D, m_ent, Ue, UR)
        SW = np.linalg.solve(S, W)
        Q = (
            self.base
            - np.einsum("cgi,cg,cgj->cij", Ue, 1.0 / D, Ue)
            - np.einsum("cqi,cqj->cij", W, SW)
        )
        return logdet, Q

    def _solve(self, theta2: np.ndarray, sums: np.ndarray):
        th, D, S, m_ent = self._parts(theta2)
        Ue, UR = self._u(th, sums)
        W = self._w(D, m_ent, Ue, UR)
        x2 = np.linalg.solve(S, W)
        Mx2 = _scatter(self.ent_g, m_ent[..., None] * x2[:, self.ent_col], self.Ge)
        x1 = (Ue - Mx2) / D[..., None]
        return th, D, S, m_ent, x1, x2

    def _split(self, th: np.ndarray, x1: np.ndarray, x2: np.ndarray) -> list[np.ndarray]:
        out: list = [None] * self.stats.K
        out[self.e] = th[:, self.e, None, None] * x1 if x1.ndim == 3 else th[:, self.e, None] * x1
        for j, k in enumerate(self.rest):
            block = x2[:, self.offsets[j] : self.offsets[j + 1]]
            out[k] = (th[:, k, None, None] if block.ndim == 3 else th[:, k, None]) * block
        return out

    def modes(self, theta2: np.ndarray, sums: np.ndarray) -> list[np.ndarray]:
        th, _, _, _, x1, x2 = self._solve(theta2, sums)
        return self._split(th, x1, x2)

    def cond_var(self, theta2: np.ndarray) -> list[np.ndarray]:
        th, D, S, m_ent = self._parts(theta2)
        C = th.shape[0]
        Sinv = np.linalg.inv(S)
        Y = np.zeros((C, self.Ge * self.q2))
        flat = self.ent_g * self.q2 + self.ent_col
        for c in range(C):
            Y[c] = np.bincount(flat, weights=m_ent[c] / D[c, self.ent_g], minlength=Y.shape[1])
        Y = Y.reshape(C, self.Ge, self.q2)
        d1 = 1.0 / D + np.einsum("cgi,cij,cgj->cg", Y, Sinv, Y)
        d2 = np.diagonal(Sinv, axis1=1, axis2=2)
        return self._split_var(th, d1, d2)

    def _split_var(self, th: np.ndarray, d1: np.ndarray, d2: np.ndarray) -> list[np.ndarray]:
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
        th, D, S, m_ent, x1, x2 = self._solve(theta2, resid_sums[..., None])
        C = th.shape[0]
        L = np.linalg.cholesky(S)
        eps2 = rng.standard_normal((C, self.q2, 1))
        v2 = np.linalg.solve(np.swapaxes(L, 1, 2), eps2)[..., 0]
        eps1 = rng.standard_normal((C, self.Ge))
        Mv2 = _scatter(self.ent_g, m_ent * v2[:, self.ent_col], self.Ge)
        sq = np.sqrt(D)
        v1 = (eps1 - Mv2 / sq) / sq
        s = sigma[:, None]
        return self._split(th, x1[..., 0] + s * v1, x2[..., 0] + s * v2)
