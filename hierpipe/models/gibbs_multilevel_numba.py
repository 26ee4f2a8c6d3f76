r"""Numba back end of :mod:`hierpipe.models.gibbs_multilevel`'s collapsed scheme (``fast`` extra).

The collapsed scheme's iteration is ``steps`` random-walk Metropolis steps on
the log-SDs :math:`u`, each one evaluation of the marginal posterior
:math:`\log p(u \mid y)` for every chain, then (on kept iterations) a draw of
:math:`\beta \mid u, y` and of all effects. On small data each evaluation is
20-40 numpy calls on arrays of a few hundred numbers, so the numpy back end's
time is nearly all per-call overhead. Here one compiled call runs an
iteration's Metropolis steps for every chain and one more the draw, on random
numbers drawn beforehand by numpy in exactly the order the numpy back end draws
them (:func:`hierpipe.models.gibbs_multilevel._step_variates` and
``_draw_variates``).

The arithmetic is the numpy back end's, formula for formula:
:class:`~hierpipe.models.nested_reml.NestedEvaluator`'s pass up the levels
(Woodbury and the determinant lemma a group) and top-down draw, and
:class:`~hierpipe.models.crossed_reml.CrossedEvaluator`'s Schur complement on
the factors other than the largest, its Cholesky factor and block solves. The
only changes are where numpy calls LAPACK: the :math:`p \times p` system of
:math:`\beta` and the Schur complement's solves use the Cholesky factor here
(numpy: LU), so the back ends agree to rounding (about 1e-13 relative), not bit
for bit. ``cache=True`` keeps the compiled code on disk, so the compile time
(about 20 s) is paid once per installation.
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np

from hierpipe.models.crossed_reml import CrossedEvaluator
from hierpipe.models.gibbs_twolevel import HalfCauchy
from hierpipe.models.nested_reml import NestedEvaluator

# error_model="numpy": division by zero and the log of a non-positive number give
# inf/nan as in numpy, so a proposal whose density is not finite is rejected.
_njit = numba.njit(cache=True, fastmath=False, nogil=True, error_model="numpy")


# --------------------------------------------------------------------------- linear algebra


@_njit
def _chol(m, out):
    """Lower Cholesky factor of ``m`` into ``out`` (NaN where ``m`` is not positive definite)."""
    n = m.shape[0]
    for i in range(n):
        for j in range(n):
            out[i, j] = 0.0
    for j in range(n):
        s = 0.0
        for k in range(j):
            s += out[j, k] * out[j, k]
        out[j, j] = np.sqrt(m[j, j] - s)
        for i in range(j + 1, n):
            s = 0.0
            for k in range(j):
                s += out[i, k] * out[j, k]
            out[i, j] = (m[i, j] - s) / out[j, j]


@_njit
def _fwd(low, rhs, out):
    """``out = low^{-1} rhs`` for a lower-triangular ``low``."""
    n = low.shape[0]
    for i in range(n):
        acc = rhs[i]
        for k in range(i):
            acc -= low[i, k] * out[k]
        out[i] = acc / low[i, i]


@_njit
def _bwd(low, rhs, out):
    """``out = low^{-T} rhs`` for a lower-triangular ``low``."""
    n = low.shape[0]
    for i in range(n - 1, -1, -1):
        acc = rhs[i]
        for k in range(i + 1, n):
            acc -= low[k, i] * out[k]
        out[i] = acc / low[i, i]


# --------------------------------------------------------------------------- marginal


@_njit
def _log_prior(kind, a, b, u):
    """``log_prior_logsd``: half-Cauchy (kind 0, scale ``a``) or inverse gamma (``a``, ``b``)."""
    if kind == 0:
        return u - math.log1p(math.exp(2.0 * u) / (a * a))
    return -2.0 * a * u - b * math.exp(-2.0 * u)


@_njit
def _beta_system(u, Q, prec, mean, P, h):
    """``_Marginal.parts``: P = Q_XX / s2 + diag(prec), h = Q_Xy / s2 + prec * mean."""
    p = prec.shape[0]
    s2 = math.exp(2.0 * u[u.shape[0] - 1])
    for i in range(p):
        for j in range(p):
            P[i, j] = Q[i, j] / s2
        P[i, i] += prec[i]
        h[i] = Q[i, p] / s2 + prec[i] * mean[i]
    return s2


@_njit
def _log_marginal(u, logdet, Q, n_obs, prec, mean, pri, P, Lp, h, y):
    """``_Marginal.logp`` for one chain, from the evaluator's ``logdet`` and ``Q``."""
    p = prec.shape[0]
    s2 = _beta_system(u, Q, prec, mean, P, h)
    logdet_p = 0.0
    fit = 0.0
    mdm = 0.0
    if p:
        _chol(P, Lp)
        _fwd(Lp, h, y)
        for i in range(p):
            logdet_p += math.log(Lp[i, i])
            fit += y[i] * y[i]
            mdm += mean[i] * prec[i] * mean[i]
        logdet_p *= 2.0
    quad = Q[p, p] / s2 + mdm - fit
    lp = -0.5 * (n_obs * math.log(s2) + logdet + logdet_p + quad)
    K = u.shape[0] - 1
    lp += _log_prior(int(pri[3]), pri[4], pri[5], u[K])
    for k in range(K):
        lp += _log_prior(int(pri[0]), pri[1], pri[2], u[k])
    return lp


@_njit
def _draw_beta(u, Q, prec, mean, z, P, Lp, h, y, beta):
    """``_Marginal.draw_beta``: beta = P^{-1} h + L^{-T} z (L L' = P)."""
    p = prec.shape[0]
    if not p:
        return
    _beta_system(u, Q, prec, mean, P, h)
    _chol(P, Lp)
    _fwd(Lp, h, y)
    _bwd(Lp, y, beta)
    _bwd(Lp, z, y)
    for i in range(p):
        beta[i] += y[i]


@_njit
def _theta2(u, out):
    """Relative variances exp(2 (u_k - u_sigma))."""
    K = u.shape[0] - 1
    for k in range(K):
        out[k] = math.exp(2.0 * (u[k] - u[K]))


# --------------------------------------------------------------------------- nested


@_njit
def _nested_up(th2, order, goff, parent, tb, mb, db):
    """The pass up the levels from the cells' ``tb``/``mb`` (already in the innermost rows).

    Keeps each level's t, m (before division) and d in ``tb``, ``mb``, ``db``;
    returns log|V| and fills ``drop`` (the subtracted t t' terms) as a new array.
    """
    L = order.shape[0]
    r = tb.shape[1]
    logdet = 0.0
    drop = np.zeros((r, r))
    for lvl in range(L - 1, -1, -1):
        th = th2[order[lvl]]
        if lvl < L - 1:
            for g in range(goff[lvl], goff[lvl + 1]):
                mb[g] = 0.0
                for i in range(r):
                    tb[g, i] = 0.0
            for g in range(goff[lvl + 1], goff[lvl + 2]):
                pg = parent[g]
                mb[pg] += mb[g] / db[g]
                for i in range(r):
                    tb[pg, i] += tb[g, i] / db[g]
        for g in range(goff[lvl], goff[lvl + 1]):
            d = 1.0 + th * mb[g]
            db[g] = d
            logdet += math.log(d)
            if lvl < L - 1:
                w = th / d
                for i in range(r):
                    for j in range(r):
                        drop[i, j] += w * tb[g, i] * tb[g, j]
    return logdet, drop


@_njit
def _nested_terms(th2, b, nested, tb, mb, db, Q):
    """``NestedEvaluator.terms`` for one chain (data set ``b``): log|V| and Q into ``Q``."""
    n, zbar, W, order, goff, parent = (
        nested[0],
        nested[1],
        nested[2],
        nested[3],
        nested[4],
        nested[5],
    )
    L = order.shape[0]
    r = zbar.shape[2]
    thL = th2[order[L - 1]]
    for i in range(r):
        for j in range(r):
            Q[i, j] = 0.0
    for g in range(n.shape[0]):
        w = n[g] / (1.0 + thL * n[g])
        for i in range(r):
            for j in range(r):
                Q[i, j] += w * zbar[b, g, i] * zbar[b, g, j]
    lo = goff[L - 1]
    for g in range(n.shape[0]):
        mb[lo + g] = n[g]
        for i in range(r):
            tb[lo + g, i] = n[g] * zbar[b, g, i]
    logdet, drop = _nested_up(th2, order, goff, parent, tb, mb, db)
    for i in range(r):
        for j in range(r):
            Q[i, j] = (W[b, i, j] + Q[i, j]) - drop[i, j]
    return logdet


@_njit
def _nested_draw(th2, sigma, b, beta, nested, noise, tb, mb, db, acc, out):
    """``NestedEvaluator.draw`` for one chain: effects of every level, flat, top level first."""
    n, order, goff, parent, sums_sorted = nested[0], nested[3], nested[4], nested[5], nested[6]
    L = order.shape[0]
    p = beta.shape[0]
    lo = goff[L - 1]
    for g in range(n.shape[0]):
        res = sums_sorted[b, g, p]
        for i in range(p):
            res -= sums_sorted[b, g, i] * beta[i]
        tb[lo + g, 0] = res
        mb[lo + g] = n[g]
    _nested_up(th2, order, goff, parent, tb[:, :1], mb, db)
    for lvl in range(L):
        th = th2[order[lvl]]
        for g in range(goff[lvl], goff[lvl + 1]):
            cv = th / db[g]
            anc = acc[parent[g]] if lvl > 0 else 0.0
            mean = cv * (tb[g, 0] - anc * mb[g])
            eff = mean + sigma * np.sqrt(cv) * noise[g]
            out[g] = eff
            acc[g] = anc + eff


# --------------------------------------------------------------------------- crossed


@_njit
def _crossed_schur(th2, crossed, D, inv, t, S, Ls):
    """``CrossedEvaluator._parts`` and the Cholesky factor of S; returns log|M|."""
    e, n_g, colfac, pair_g = crossed[0], crossed[1], crossed[2], crossed[3]
    pair_w, pair_c1, pair_c2, A_RR = crossed[4], crossed[5], crossed[6], crossed[7]
    Ge = n_g.shape[0]
    q2 = colfac.shape[0]
    te2 = th2[e]
    logdet = 0.0
    for g in range(Ge):
        D[g] = 1.0 + te2 * n_g[g]
        inv[g] = 1.0 / D[g]
        logdet += math.log(D[g])
    for j in range(q2):
        t[j] = np.sqrt(th2[colfac[j]])
    for i in range(q2):
        for j in range(q2):
            S[i, j] = 0.0
    # the pairs with c1 <= c2 only (``Collapsed``): A' D^-1 A is symmetric, and its
    # (c2, c1) entry sums the same terms in the same order as its (c1, c2) entry
    for k in range(pair_g.shape[0]):
        S[pair_c1[k], pair_c2[k]] += inv[pair_g[k]] * pair_w[k]
    for i in range(q2):
        for j in range(i + 1, q2):
            S[j, i] = S[i, j]
    for i in range(q2):
        for j in range(q2):
            S[i, j] = (t[i] * t[j]) * (A_RR[i, j] - te2 * S[i, j])
        S[i, i] += 1.0
    _chol(S, Ls)
    for j in range(q2):
        logdet += 2.0 * math.log(Ls[j, j])
    return logdet


@_njit
def _crossed_w(th2, crossed, D, t, Te, TR, W):
    """W = t * (T_R - A' (theta_e^2 T_e / D)), columns r of ``Te``/``TR`` (Ge|q2, r)."""
    e = crossed[0]
    Aptr, Aidx, Aval = crossed[8], crossed[9], crossed[10]
    te = np.sqrt(th2[e])
    te_sq = te * te
    q2, r = W.shape
    for j in range(q2):
        for i in range(r):
            W[j, i] = 0.0
    x = np.empty(r)
    for g in range(D.shape[0]):
        for i in range(r):
            x[i] = te_sq * Te[g, i] / D[g]
        for k in range(Aptr[g], Aptr[g + 1]):
            for i in range(r):
                W[Aidx[k], i] += Aval[k] * x[i]
    for j in range(q2):
        for i in range(r):
            W[j, i] = t[j] * (TR[j, i] - W[j, i])
    return te


@_njit
def _chol_solve(Ls, rhs, tmp, out):
    """out = (Ls Ls')^{-1} rhs, one column."""
    _fwd(Ls, rhs, tmp)
    _bwd(Ls, tmp, out)


@_njit
def _crossed_terms(th2, b, crossed, D, inv, t, S, Ls, W, SW, tmp, Q):
    """``CrossedEvaluator.terms`` for one chain (data set ``b``): log|M| and Q into ``Q``."""
    Te, TR, base = crossed[11], crossed[12], crossed[13]
    logdet = _crossed_schur(th2, crossed, D, inv, t, S, Ls)
    te = _crossed_w(th2, crossed, D, t, Te[b], TR[b], W)
    q2, r = W.shape
    for i in range(r):
        _chol_solve(Ls, W[:, i], tmp, SW[:, i])
    ue = np.zeros((r, r))
    x = np.empty(r)
    for g in range(D.shape[0]):
        for i in range(r):
            x[i] = te * Te[b, g, i]
        for i in range(r):
            for j in range(r):
                ue[i, j] += x[i] * inv[g] * x[j]
    for i in range(r):
        for j in range(r):
            ws = 0.0
            for k in range(q2):
                ws += W[k, i] * SW[k, j]
            Q[i, j] = base[b, i, j] - ue[i, j] - ws
    return logdet


@_njit
def _a_times(crossed, v, out):
    """out = A v (Ge) for a vector v over the other factors' columns (q2)."""
    Aptr, Aidx, Aval = crossed[8], crossed[9], crossed[10]
    for g in range(out.shape[0]):
        s = 0.0
        for k in range(Aptr[g], Aptr[g + 1]):
            s += Aval[k] * v[Aidx[k]]
        out[g] = s


@_njit
def _crossed_draw(th2, sigma, b, beta, crossed, noise, D, inv, t, S, Ls, out):
    """``CrossedEvaluator.draw`` for one chain: effects flat, eliminated factor first."""
    cell_g, cell_cols, sums = crossed[14], crossed[15], crossed[16]
    Ge = D.shape[0]
    q2 = t.shape[0]
    p = beta.shape[0]
    Te = np.zeros((Ge, 1))
    TR = np.zeros((q2, 1))
    for c in range(cell_g.shape[0]):
        res = sums[b, c, p]
        for i in range(p):
            res -= sums[b, c, i] * beta[i]
        Te[cell_g[c], 0] += res
        for j in range(cell_cols.shape[1]):
            TR[cell_cols[c, j], 0] += res
    W = np.empty((q2, 1))
    te = _crossed_w(th2, crossed, D, t, Te, TR, W)
    tmp = np.empty(q2)
    x2 = np.empty(q2)
    _chol_solve(Ls, W[:, 0], tmp, x2)
    v2 = np.empty(q2)
    _bwd(Ls, noise[:q2], v2)
    tv = np.empty(q2)
    ax = np.empty(Ge)
    av = np.empty(Ge)
    for j in range(q2):
        tv[j] = t[j] * x2[j]
    _a_times(crossed, tv, ax)
    for j in range(q2):
        tv[j] = t[j] * v2[j]
    _a_times(crossed, tv, av)
    for g in range(Ge):
        x1 = (te * Te[g, 0] - te * ax[g]) / D[g]
        sq = np.sqrt(D[g])
        v1 = (noise[q2 + g] - te * av[g] / sq) / sq
        out[g] = te * (x1 + sigma * v1)
    for j in range(q2):
        out[Ge + j] = t[j] * (x2[j] + sigma * v2[j])


# --------------------------------------------------------------------------- kernels


@_njit
def _lp_one(u, b, kind, nested, crossed, marg, ws):
    """log p(u | y) of one chain on either evaluator."""
    n_obs, prec, mean, pri = marg
    th2, Q, P, Lp, h, y, tb, mb, db, D, inv, t, S, Ls, W, SW, tmp = ws
    _theta2(u, th2)
    if kind == 0:
        logdet = _nested_terms(th2, b, nested, tb, mb, db, Q)
    else:
        logdet = _crossed_terms(th2, b, crossed, D, inv, t, S, Ls, W, SW, tmp, Q)
    return _log_marginal(u, logdet, Q, n_obs, prec, mean[b], pri, P, Lp, h, y)


@_njit
def _workspace(K, r, nested, crossed):
    goff = nested[4]
    G = goff[goff.shape[0] - 1]
    Ge = crossed[1].shape[0]
    q2 = crossed[2].shape[0]
    p = r - 1
    return (
        np.empty(K),
        np.empty((r, r)),
        np.empty((p, p)),
        np.empty((p, p)),
        np.empty(p),
        np.empty(p),
        np.empty((G, r)),
        np.empty(G),
        np.empty(G),
        np.empty(Ge),
        np.empty(Ge),
        np.empty(q2),
        np.empty((q2, q2)),
        np.empty((q2, q2)),
        np.empty((q2, r)),
        np.empty((q2, r)),
        np.empty(q2),
    )


@_njit
def metropolis(u, lp, chol, log_lam, z, logu, warm, it, accepted, kind, nested, crossed, marg):
    """One iteration's Metropolis steps for every chain, in place (``_rwm``'s inner loop).

    ``z`` (steps, C, d) standard normals and ``logu`` (steps, C) log-uniforms
    as the numpy back end draws them; ``accepted[0]`` gains each step's
    acceptance fraction after warm-up, ``log_lam`` its Robbins-Monro step in
    warm-up.
    """
    C, d = u.shape
    B = marg[2].shape[0]
    ws = _workspace(d - 1, marg[2].shape[1] + 1, nested, crossed)
    prop = np.empty(d)
    step_size = (it + 1.0) ** 0.6
    for s in range(z.shape[0]):
        count = 0
        for c in range(C):
            lam = math.exp(log_lam[c])
            for i in range(d):
                acc = 0.0
                for k in range(d):
                    acc += chol[c, i, k] * z[s, c, k]
                prop[i] = u[c, i] + lam * acc
            lpp = _lp_one(prop, c if B > 1 else 0, kind, nested, crossed, marg, ws)
            ok = logu[s, c] < lpp - lp[c]
            if ok:
                u[c, :] = prop
                lp[c] = lpp
                count += 1
            if warm:
                log_lam[c] += ((1.0 if ok else 0.0) - 0.3) / step_size
        if not warm:
            accepted[0] += count / C


@_njit
def draw(u, zb, noise, kind, nested, crossed, marg, beta, out):
    """beta | u, y and all effects | beta, u, y for every chain, into ``beta`` and ``out``."""
    prec, mean = marg[1], marg[2]
    C, d = u.shape
    B = mean.shape[0]
    r = mean.shape[1] + 1
    ws = _workspace(d - 1, r, nested, crossed)
    th2, Q, P, Lp, h, y, tb, mb, db, D, inv, t, S, Ls, W, SW, tmp = ws
    acc = np.empty(mb.shape[0])
    for c in range(C):
        b = c if B > 1 else 0
        _theta2(u[c], th2)
        if kind == 0:
            _nested_terms(th2, b, nested, tb, mb, db, Q)
        else:
            _crossed_terms(th2, b, crossed, D, inv, t, S, Ls, W, SW, tmp, Q)
        _draw_beta(u[c], Q, prec, mean[b], zb[c], P, Lp, h, y, beta[c])
        sigma = math.exp(u[c, d - 1])
        if kind == 0:
            _nested_draw(th2, sigma, b, beta[c], nested, noise[c], tb, mb, db, acc, out[c])
        else:
            _crossed_draw(th2, sigma, b, beta[c], crossed, noise[c], D, inv, t, S, Ls, out[c])


# --------------------------------------------------------------------------- driver


def _f(x: Any) -> np.ndarray:
    # writable C-ordered float copies: numba compiles separate code for read-only arrays
    return np.array(x, dtype=np.float64, order="C")


def _i(x: Any) -> np.ndarray:
    return np.array(x, dtype=np.int64, order="C")


class Collapsed:
    """The evaluator and the marginal as flat arrays for the kernels; calls them.

    Parameters
    ----------
    ev : a :class:`NestedEvaluator` or :class:`CrossedEvaluator`.
    prec, mean : the prior precision (p,) and mean (B, p) of beta (``_Marginal``).
    n_obs : observations.
    priors : the SD and sigma priors (half-Cauchy or inverse gamma).

    Notes
    -----
    The kernels take fixed-layout tuples (numba compiles one version for both
    evaluators, so the unused one gets empty arrays of the same types):
    ``nested`` = (n, zbar, W, order, goff, parent, sums) with the cells sorted
    by innermost group (``NestedEvaluator.cell_perm``), every level's groups
    end to end from the top (level ``l`` at ``goff[l]:goff[l+1]``) and
    ``parent`` the flat index of each group's parent (-1 at the top);
    ``crossed`` = (e, n_g, col_k, pair_g, pair_w, pair_c1, pair_c2, A_RR,
    A.indptr, A.indices, A.data, Te, TR, base, cell_g, cell_cols, sums) in
    ``CrossedEvaluator``'s notation, the pairs restricted to c1 <= c2;
    ``marg`` = (n_obs, prec, mean, priors as [kind, a, b] for the SDs then sigma).
    """

    def __init__(self, ev: Any, prec: np.ndarray, mean: np.ndarray, n_obs: int, priors: Any):
        st = ev.stats
        self.K = st.K
        no_i, no_f = np.zeros(0, np.int64), np.zeros(0)
        nested_empty = (
            no_f, np.zeros((1, 0, 1)), np.zeros((1, 1, 1)), no_i, np.zeros(1, np.int64), no_i,
            np.zeros((1, 0, 1)),
        )  # fmt: skip
        crossed_empty = (
            0, no_f, no_i, no_i, no_f, no_i, no_i, np.zeros((0, 0)),
            np.zeros(1, np.int64), no_i, no_f, np.zeros((1, 0, 1)), np.zeros((1, 0, 1)),
            np.zeros((1, 1, 1)), no_i, np.zeros((0, 1), np.int64), np.zeros((1, 0, 1)),
        )  # fmt: skip
        if isinstance(ev, NestedEvaluator):
            self.kind = 0
            counts = [st.group_counts[k] for k in ev.order]
            inner = st.codes[ev.cell_perm, ev.order[-1]]
            if not np.array_equal(inner, np.arange(counts[-1])):
                raise ValueError("nested statistics: the cells are not the innermost groups")
            goff = np.concatenate([[0], np.cumsum(counts)])
            parent = np.full(goff[-1], -1, dtype=np.int64)
            for lvl, level in enumerate(ev.levels):
                parent[goff[lvl + 1] : goff[lvl + 2]] = goff[lvl] + level.parent
            self.nested = (
                _f(ev.n), _f(ev.zbar), _f(ev.W), _i(ev.order), _i(goff), parent,
                _f(st.sums[:, ev.cell_perm]),
            )  # fmt: skip
            self.crossed = crossed_empty
            # per level (top first) its factor and its slice of the flat effects
            self.layout = [(k, slice(goff[lvl], goff[lvl + 1])) for lvl, k in enumerate(ev.order)]
            self.noise_shapes = [(g, 1) for g in counts]
        elif isinstance(ev, CrossedEvaluator):
            self.kind = 1
            q2 = ev.q2
            coo = ev.pair_sum.tocoo()
            flat = np.empty(coo.shape[1], dtype=np.int64)
            flat[coo.col] = coo.row
            c1, c2 = flat // max(q2, 1), flat % max(q2, 1)
            upper = c1 <= c2
            A = ev.A.tocsr()
            A.sort_indices()
            cell_cols = np.column_stack(
                [ev.offsets[j] + st.codes[:, k] for j, k in enumerate(ev.rest)]
                or [np.zeros((st.n_cells, 0), np.int64)]
            )
            self.crossed = (
                int(ev.e), _f(ev.n_g), _i(ev.col_k), _i(ev.pair_g[upper]), _f(ev.pair_w[upper]),
                _i(c1[upper]), _i(c2[upper]), _f(ev.A_RR),
                _i(A.indptr), _i(A.indices), _f(A.data), _f(ev.Te), _f(ev.TR), _f(ev.base),
                _i(st.codes[:, ev.e]), _i(cell_cols), _f(st.sums),
            )  # fmt: skip
            self.nested = nested_empty
            self.layout = [(ev.e, slice(0, ev.Ge))] + [
                (k, slice(ev.Ge + ev.offsets[j], ev.Ge + ev.offsets[j + 1]))
                for j, k in enumerate(ev.rest)
            ]
            self.noise_shapes = [(q2, 1), (ev.Ge,)]
        else:
            raise ValueError(f"numba back end: unsupported evaluator {type(ev).__name__}")
        pri = []
        for prior in (priors.sd, priors.sigma):
            if isinstance(prior, HalfCauchy):
                pri += [0.0, float(prior.scale), 0.0]
            else:
                pri += [1.0, float(prior.shape), float(prior.scale)]
        self.marg = (float(n_obs), _f(prec), _f(mean), np.array(pri))
        self.n_effects = int(sum(np.prod(s) for s in self.noise_shapes))

    def metropolis(
        self,
        u: np.ndarray,
        lp: np.ndarray,
        chol: np.ndarray,
        log_lam: np.ndarray,
        z: np.ndarray,
        logu: np.ndarray,
        warm: bool,
        it: int,
        accepted: np.ndarray,
    ) -> None:
        metropolis(
            u, lp, chol, log_lam, z, logu, warm, it, accepted,
            self.kind, self.nested, self.crossed, self.marg,
        )  # fmt: skip

    def draw(
        self, u: np.ndarray, zb: np.ndarray, noise: np.ndarray
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """beta (C, p) and the effects of every factor in formula order."""
        C = u.shape[0]
        beta = np.zeros((C, self.marg[1].shape[0]))
        out = np.empty((C, self.n_effects))
        draw(u, zb, noise, self.kind, self.nested, self.crossed, self.marg, beta, out)
        effects: list = [None] * self.K
        for k, sl in self.layout:
            effects[k] = out[:, sl]
        return beta, effects
