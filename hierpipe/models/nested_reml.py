r"""Nested variance components: log-determinant and quadratic forms by recursion over levels.

For nested factors (``(1 | school/classroom)``, ``(1 | a/b/c)``) the covariance
:math:`V_\theta = I + \sum_k \theta_k^2 Z_k Z_k^\top` is block diagonal by top-level
group, and within a group of level :math:`k` it is :math:`B_h + \theta_k^2 \mathbf 1
\mathbf 1^\top`, :math:`B_h` the block diagonal of its children's matrices. Woodbury's
identity and the matrix determinant lemma then give, with :math:`m_h = \mathbf
1^\top B_h^{-1}\mathbf 1`, :math:`t_h = \mathbf 1^\top B_h^{-1} z_h` (sums of the
children's values) and :math:`d_h = 1 + \theta_k^2 m_h`,

.. math::
    \log|V_h| &= \textstyle\sum_{\text{children}} \log|V_c| + \log d_h, \\
    z_h^\top V_h^{-1} z_h &= \textstyle\sum_{\text{children}} z_c^\top V_c^{-1} z_c
        - \frac{\theta_k^2}{d_h} t_h t_h^\top, \\
    \mathbf 1^\top V_h^{-1} z_h &= t_h / d_h, \qquad \mathbf 1^\top V_h^{-1}\mathbf 1 = m_h/d_h,

starting from the innermost groups (cells), where :math:`z_c^\top V_c^{-1} z_c =
W_c + \frac{n_c}{1+\theta_L^2 n_c}\bar z_c \bar z_c^\top` exactly (:math:`W_c` the
within-cell cross-products). One evaluation is a pass up the levels,
:math:`O(\text{cells}\cdot(p+1)^2)`, exact for any group sizes.

Conditional modes go back down: given the sum :math:`A` of its ancestors'
effects, a level-:math:`k` group's effect has

.. math::
    E[b_h \mid y, A] = \theta_k^2 (t_h - A\, m_h)/d_h, \qquad
    \operatorname{Var}[b_h \mid y, A] = \sigma^2\theta_k^2/d_h,

(:math:`t_h` for the residual :math:`y - X\beta`), which gives the modes, the
conditional variances (through :math:`\operatorname{Var}(A \mid y)`) and exact
joint draws of all effects, level by level from the top.
"""

from __future__ import annotations

import numpy as np

from hierpipe.models.variance_components import CellStats


class _Level:
    """Aggregation of one level's groups into their parents (a segment sum)."""

    def __init__(self, child_parent: np.ndarray, n_parents: int) -> None:
        self.parent = child_parent
        self.perm = np.argsort(child_parent, kind="stable")
        self.starts = np.searchsorted(child_parent[self.perm], np.arange(n_parents))

    def up(self, x: np.ndarray, axis: int) -> np.ndarray:
        """Sum children into parents along ``axis``."""
        return np.add.reduceat(np.take(x, self.perm, axis=axis), self.starts, axis=axis)


class NestedEvaluator:
    """The :class:`~hierpipe.models.variance_components.Evaluator` of nested factors.

    Parameters
    ----------
    stats : cell statistics; every factor nested in the previous of ``order``.
    order : factor indices from the top level to the innermost.
    """

    def __init__(self, stats: CellStats, order: tuple[int, ...]) -> None:
        self.order = tuple(order)
        inner = order[-1]
        # Innermost groups are the cells: reorder the cells by innermost code.
        self.cell_perm = np.argsort(stats.codes[:, inner], kind="stable")
        self.stats = stats
        self.n = stats.n[self.cell_perm]
        self.zbar = stats.zbar[:, self.cell_perm]
        self.W = stats.pooled_within
        codes = stats.codes[self.cell_perm]
        counts = stats.group_counts
        # levels[l] aggregates level l+1 groups into level l groups (l = 0 is the top).
        self.levels: list[_Level] = []
        for lvl in range(len(order) - 1):
            parent_f, child_f = order[lvl], order[lvl + 1]
            child_parent = np.empty(counts[child_f], dtype=np.int64)
            child_parent[codes[:, child_f]] = codes[:, parent_f]
            self.levels.append(_Level(child_parent, counts[parent_f]))

    def _theta_levels(self, theta2: np.ndarray) -> np.ndarray:
        return np.asarray(theta2, dtype=float)[:, list(self.order)]

    def _upward(self, th: np.ndarray, t: np.ndarray, keep: bool):
        """Pass up from cells: returns logdet, the subtracted t t' terms, per-level (t, m, d)."""
        L = th.shape[1]
        m = np.broadcast_to(self.n, (th.shape[0], self.n.size))
        logdet = np.zeros(th.shape[0])
        drop = 0.0
        kept: list = [None] * L
        for lvl in range(L - 1, -1, -1):
            if lvl < L - 1:
                t = self.levels[lvl].up(t, axis=-2)
                m = self.levels[lvl].up(m, axis=-1)
            d = 1.0 + th[:, lvl, None] * m
            logdet = logdet + np.log(d).sum(axis=-1)
            if keep:
                kept[lvl] = (t, m, d)
            if lvl < L - 1:
                w = th[:, lvl, None] / d
                drop = drop + np.einsum("cg,cgi,cgj->cij", w, t, t)
            t = t / d[..., None]
            m = m / d
        return logdet, drop, kept

    def terms(self, theta2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        th = self._theta_levels(theta2)
        w = self.n / (1.0 + th[:, -1, None] * self.n)
        # Innermost level in closed form, W + sum_c n_c/d_c zbar zbar' (no cancellation).
        if self.zbar.shape[0] == 1:
            Q = self.W + np.einsum("cg,gi,gj->cij", w, self.zbar[0], self.zbar[0])
        else:
            Q = self.W + np.einsum("cg,cgi,cgj->cij", w, self.zbar, self.zbar)
        sums = self.n[None, :, None] * self.zbar
        logdet, drop, _ = self._upward(th, sums, keep=False)
        return logdet, Q - drop

    def _down(self, th: np.ndarray, kept: list, noise: tuple | None):
        r"""Top-down pass: modes (``noise`` None) or draws, and conditional variances.

        ``A`` is the sum of the ancestors' effects (modes or draws) and ``VA`` its
        conditional variance given y (relative to sigma^2): with
        :math:`\kappa = \theta^2 m/d`, :math:`b = \theta^2 t/d - \kappa A + \varepsilon`,
        so :math:`\operatorname{Var} b = \kappa^2 V_A + \theta^2/d` and the new
        ancestor sum has variance :math:`(1-\kappa)^2 V_A + \theta^2/d`.
        """
        L = th.shape[1]
        A = VA = None
        effects, cvars = [], []
        for lvl in range(L):
            t, m, d = kept[lvl]
            if lvl > 0:
                parent = self.levels[lvl - 1].parent
                A = np.take(A, parent, axis=1)
                VA = np.take(VA, parent, axis=1)
            tl = th[:, lvl, None]
            cv = tl / d
            kappa = tl * m / d
            centred = t if A is None else t - A * m[..., None]
            mean = (tl / d)[..., None] * centred
            if noise is not None:
                sigma, rng = noise
                mean = mean + (sigma[:, None] * np.sqrt(cv))[..., None] * rng.standard_normal(
                    mean.shape
                )
            effects.append(mean)
            cvars.append(cv if VA is None else kappa**2 * VA + cv)
            A = mean if A is None else A + mean
            VA = cv if VA is None else (1.0 - kappa) ** 2 * VA + cv
        return effects, cvars

    def _formula_order(self, per_level: list[np.ndarray]) -> list[np.ndarray]:
        out: list = [None] * len(self.order)
        for lvl, k in enumerate(self.order):
            out[k] = per_level[lvl]
        return out

    def modes(self, theta2: np.ndarray, sums: np.ndarray) -> list[np.ndarray]:
        th = self._theta_levels(theta2)
        _, _, kept = self._upward(th, sums[:, self.cell_perm], keep=True)
        return self._formula_order(self._down(th, kept, None)[0])

    def cond_var(self, theta2: np.ndarray) -> list[np.ndarray]:
        th = self._theta_levels(theta2)
        _, _, kept = self._upward(th, np.zeros((1, self.n.size, 1)), keep=True)
        return self._formula_order(self._down(th, kept, None)[1])

    def draw(
        self,
        theta2: np.ndarray,
        sigma: np.ndarray,
        resid_sums: np.ndarray,
        rng: np.random.Generator,
    ) -> list[np.ndarray]:
        th = self._theta_levels(theta2)
        _, _, kept = self._upward(th, resid_sums[:, self.cell_perm, None], keep=True)
        effects, _ = self._down(th, kept, (sigma, rng))
        return self._formula_order([e[..., 0] for e in effects])
