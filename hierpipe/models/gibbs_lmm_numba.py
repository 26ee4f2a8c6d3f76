r"""Numba back end of :mod:`hierpipe.models.gibbs_lmm` (the ``fast`` extra).

One compiled call runs one whole iteration (steps 0-5 of
:mod:`hierpipe.models.gibbs_lmm`'s docstring) for every chain, on random
numbers drawn beforehand by numpy in exactly the order the numpy back end
draws them (:func:`hierpipe.models.gibbs_lmm._numba_variates`). The arithmetic
is the numpy back end's, formula for formula: the per-group :math:`q \times q`
Cholesky factorisations and triangular solves use the same recurrences as
``_cholesky``/``_solve_lower``/``_solve_upper``; only the small dense
inverses and solves that numpy hands to LAPACK (:math:`\Sigma^{-1}`, the
:math:`p \times p` draw of :math:`\beta`, the Bartlett factor) are written out
here, so the two back ends agree to rounding (about 1e-13 relative), not bit
for bit. Importing this module needs numba; it is imported only when the
back end is selected. ``cache=True`` keeps the compiled code on disk
(numba's ``__pycache__`` beside this file, or the user cache directory), so
the compile time (tens of seconds) is paid once per installation, not once
per workflow job.
"""

from __future__ import annotations

import math

import numba
import numpy as np

# error_model="numpy": division by zero and the square root or log of a negative
# number give inf/nan as in numpy instead of raising, so a proposal whose
# factorisation fails gets weight 0 in both back ends.
_njit = numba.njit(cache=True, fastmath=False, nogil=True, error_model="numpy")


@_njit
def _chol(m, out):
    """Lower Cholesky factor of ``m`` into ``out`` (``_cholesky``'s recurrence; NaN if not PD)."""
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
    """``out = low^{-1} rhs`` for a lower-triangular ``low``; ``rhs``/``out`` (n,) ."""
    n = low.shape[0]
    for i in range(n):
        acc = rhs[i]
        for k in range(i):
            acc = acc - low[i, k] * out[k]
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


@_njit
def _inv(a, out):
    """Inverse of a small square matrix: Gauss-Jordan with partial pivoting (LAPACK's LU)."""
    n = a.shape[0]
    w = a.copy()
    for i in range(n):
        for j in range(n):
            out[i, j] = 1.0 if i == j else 0.0
    for col in range(n):
        piv = col
        for r in range(col + 1, n):
            if abs(w[r, col]) > abs(w[piv, col]):
                piv = r
        if piv != col:
            for j in range(n):
                w[col, j], w[piv, j] = w[piv, j], w[col, j]
                out[col, j], out[piv, j] = out[piv, j], out[col, j]
        d = w[col, col]
        for j in range(n):
            w[col, j] /= d
            out[col, j] /= d
        for r in range(n):
            if r != col:
                f = w[r, col]
                if f != 0.0:
                    for j in range(n):
                        w[r, j] -= f * w[col, j]
                        out[r, j] -= f * out[col, j]


@_njit
def _mvn_prec(prec, lin, z, out):
    """``_mvn_from_precision`` for one chain: :math:`N(P^{-1}m, P^{-1})` from standard normals."""
    n = lin.shape[0]
    low = np.empty((n, n))
    _chol(prec, low)
    tmp = np.empty(n)
    mean = np.empty(n)
    _fwd(low, lin, tmp)
    _bwd(low, tmp, mean)
    _bwd(low, z, tmp)
    for i in range(n):
        out[i] = mean[i] + tmp[i]


@_njit
def _inv_wishart(df, psi, nrm, chi, out):
    r"""``inv_wishart`` for one chain: :math:`L A^{-\top} A^{-1} L^\top` (Bartlett), symmetrised."""
    k = psi.shape[0]
    low = np.empty((k, k))
    _chol(psi, low)
    at = np.zeros((k, k))  # A', A lower with the normals below the diagonal
    for i in range(k):
        at[i, i] = np.sqrt(chi[i])
        for j in range(i):
            at[j, i] = nrm[i, j]
    ati = np.empty((k, k))
    _inv(at, ati)
    t = np.zeros((k, k))
    for i in range(k):
        for j in range(k):
            s = 0.0
            for m in range(k):
                s += low[i, m] * ati[m, j]
            t[i, j] = s
    for i in range(k):
        for j in range(k):
            s = 0.0
            for m in range(k):
                s += t[i, m] * t[j, m]
            out[i, j] = s
    for i in range(k):
        for j in range(i + 1, k):
            v = 0.5 * (out[i, j] + out[j, i])
            out[i, j] = v
            out[j, i] = v


@_njit
def _to_x(sigma2, Sig, rows, cols, diag, out):
    """``_to_x`` for one chain: (log sigma^2, log-Cholesky entries of Sigma)."""
    q = Sig.shape[0]
    low = np.empty((q, q))
    _chol(Sig, low)
    out[0] = np.log(sigma2)
    for d in range(rows.size):
        e = low[rows[d], cols[d]]
        out[1 + d] = np.log(e) if diag[d] else e


@_njit
def _log_target(
    x, ztz_cm, ztx_cm, zty_cm, wk, wp, wq, xtx, xty_c, yty_c, n_obs, beta_prec, beta_lin,
    rows, cols, diag, jac, sig_hc, sig_par, blk_start, blk_size, blk_type, blk_par,
    blk_scale, inv_a2, psi_iw, x_max, k_cond_max,
):  # fmt: skip
    r"""``_log_target_x`` for one point ``x`` of one chain (-inf outside its region).

    The region: every coordinate within ``x_max`` and
    :math:`\max_g \mathrm{tr}(\Sigma Z_g^\top Z_g)/\sigma^2 \le` ``k_cond_max``.
    """
    dim = x.size
    for i in range(dim):
        if not abs(x[i]) <= x_max:
            return -np.inf
    q, p = ztx_cm.shape[0], ztx_cm.shape[1]
    low = np.zeros((q, q))
    log_sd = np.zeros(q)
    jsum = 0.0
    for d in range(dim - 1):
        v = x[1 + d]
        if diag[d]:
            low[rows[d], cols[d]] = np.exp(v)
            log_sd[rows[d]] = v
        else:
            low[rows[d], cols[d]] = v
        jsum += v * jac[d]
    sigma2 = np.exp(x[0])
    lj = x[0] + jsum
    sig = np.empty((q, q))
    for i in range(q):
        for j in range(q):
            s = 0.0
            for k in range(q):
                s += low[i, k] * low[j, k]
            sig[i, j] = s
    g_n = ztz_cm.shape[2]
    rmax = -np.inf
    for g in range(g_n):
        tr = 0.0
        for i in range(q):
            for j in range(q):
                tr += sig[i, j] * ztz_cm[j, i, g]
        if math.isnan(tr):  # numpy's max propagates NaN, and NaN is outside the region
            return -np.inf
        rmax = max(rmax, tr)
    if not rmax / sigma2 <= k_cond_max:
        return -np.inf
    # Sigma^{-1} = L^{-T} L^{-1}
    linv = np.empty((q, q))
    e = np.zeros(q)
    col = np.empty(q)
    for j in range(q):
        e[:] = 0.0
        e[j] = 1.0
        _fwd(low, e, col)
        for i in range(q):
            linv[i, j] = col[i]
    s_inv = np.empty((q, q))
    for i in range(q):
        for j in range(q):
            s = 0.0
            for k in range(q):
                s += linv[k, i] * linv[k, j]
            s_inv[i, j] = s
    # _log_marginal, on the component-major layout (group axis last and innermost):
    # the loops over groups are long and contiguous, so the compiler vectorises them.
    # Each group's operations run in the same order as in _cholesky/_solve_lower.
    zl, kmat, kch = wk[0], wk[1], wk[2]
    ltx, ux = wp[0], wp[1]
    lty, uy, acc = wq[0], wq[1], wq[2]
    for k in range(q):
        for j in range(q):
            zl[k, j, :] = 0.0
            for m in range(j, q):
                lmj = low[m, j]
                for g in range(g_n):
                    zl[k, j, g] += ztz_cm[k, m, g] * lmj
    for i in range(q):
        for j in range(i + 1):
            kmat[i, j, :] = 0.0
            for m in range(i, q):
                lmi = low[m, i]
                for g in range(g_n):
                    kmat[i, j, g] += lmi * zl[m, j, g]
        for g in range(g_n):
            kmat[i, i, g] += sigma2
        for r in range(p):
            ltx[i, r, :] = 0.0
            for m in range(i, q):
                lmi = low[m, i]
                for g in range(g_n):
                    ltx[i, r, g] += lmi * ztx_cm[m, r, g]
        lty[i, :] = 0.0
        for m in range(i, q):
            lmi = low[m, i]
            for g in range(g_n):
                lty[i, g] += lmi * zty_cm[m, g]
    for j in range(q):
        acc[0, :] = 0.0
        for k in range(j):
            for g in range(g_n):
                acc[0, g] += kch[j, k, g] * kch[j, k, g]
        for g in range(g_n):
            kch[j, j, g] = np.sqrt(kmat[j, j, g] - acc[0, g])
        for i in range(j + 1, q):
            acc[0, :] = 0.0
            for k in range(j):
                for g in range(g_n):
                    acc[0, g] += kch[i, k, g] * kch[j, k, g]
            for g in range(g_n):
                kch[i, j, g] = (kmat[i, j, g] - acc[0, g]) / kch[j, j, g]
    for i in range(q):
        for r in range(p):
            for g in range(g_n):
                acc[0, g] = ltx[i, r, g]
            for k in range(i):
                for g in range(g_n):
                    acc[0, g] = acc[0, g] - kch[i, k, g] * ux[k, r, g]
            for g in range(g_n):
                ux[i, r, g] = acc[0, g] / kch[i, i, g]
        for g in range(g_n):
            acc[0, g] = lty[i, g]
        for k in range(i):
            for g in range(g_n):
                acc[0, g] = acc[0, g] - kch[i, k, g] * uy[k, g]
        for g in range(g_n):
            uy[i, g] = acc[0, g] / kch[i, i, g]
    logdet_k = 0.0
    for i in range(q):
        for g in range(g_n):
            logdet_k += 2.0 * np.log(kch[i, i, g])
    axx = np.zeros((p, p))
    rxy = np.zeros(p)
    for a in range(p):
        for b in range(p):
            acc[0, :] = 0.0
            for k in range(q):
                for g in range(g_n):
                    acc[0, g] += ux[k, a, g] * ux[k, b, g]
            for g in range(g_n):
                axx[a, b] += acc[0, g]
        acc[0, :] = 0.0
        for k in range(q):
            for g in range(g_n):
                acc[0, g] += ux[k, a, g] * uy[k, g]
        for g in range(g_n):
            rxy[a] += acc[0, g]
    uyy = 0.0
    for g in range(g_n):
        for k in range(q):
            uyy += uy[k, g] * uy[k, g]
    qm = np.empty((p, p))
    hv = np.empty(p)
    for a in range(p):
        for b in range(p):
            qm[a, b] = (xtx[a, b] - axx[a, b]) / sigma2 + beta_prec[a, b]
        hv[a] = (xty_c[a] - rxy[a]) / sigma2 + beta_lin[a]
    cq = np.empty((p, p))
    _chol(qm, cq)
    v = np.empty(p)
    _fwd(cq, hv, v)
    quad = (yty_c - uyy) / sigma2
    logdet_q = 0.0
    for a in range(p):
        quad -= v[a] * v[a]
        logdet_q += 2.0 * np.log(cq[a, a])
    lm = -0.5 * ((n_obs - g_n * q) * np.log(sigma2) + logdet_k + logdet_q + quad)
    # _log_prior_marginal
    if sig_hc:
        lp = -0.5 * np.log(sigma2) - np.log1p(sigma2 / sig_par[0] ** 2)
    else:
        lp = -(sig_par[1] + 1.0) * np.log(sigma2) - sig_par[2] / sigma2
    for bi in range(blk_start.size):
        s0, k, typ = blk_start[bi], blk_size[bi], blk_type[bi]
        logdet = 0.0
        for i in range(s0, s0 + k):
            logdet += log_sd[i]
        logdet *= 2.0
        if typ == 0:
            nu = blk_par[bi]
            ls = 0.0
            for i in range(s0, s0 + k):
                ls += np.log(nu * s_inv[i, i] + inv_a2[i])
            lp = lp - 0.5 * (nu + 2 * k) * logdet
            lp = lp - 0.5 * (nu + k) * ls
        elif typ == 1:
            tr = 0.0
            for i in range(s0, s0 + k):
                for j in range(s0, s0 + k):
                    tr += psi_iw[i, j] * s_inv[j, i]
            lp = lp - 0.5 * (blk_par[bi] + k + 1) * logdet - 0.5 * tr
        else:
            lp = lp - (blk_par[bi] + 1.0) * logdet - blk_scale[bi] * s_inv[s0, s0]
    out = lm + lp + lj
    return out if math.isfinite(out) else -np.inf


@_njit
def iterate(
    ztz, ztx, zty, ztz_cm, ztx_cm, zty_cm, xtx, xty, yty, n_obs, beta_prec, beta_lin,
    sig_hc, sig_par, blk_start, blk_size, blk_type, blk_par, blk_scale, inv_a2, psi_iw,
    scale, moved, pairs, rows, cols, diag, jac, mp_df, x_max, k_cond_max,
    sigma2, Sigma, a, lam, beta, b,
    do_marginal, loc, pchol, mz, mchi, mu, aux_gam, lam_gam,
    zbeta, zb, sig_gam, sig_nrm, sig_chi, blk_gam, zs, zshear,
    do_trace, trace_row,
):  # fmt: skip
    """One iteration for every chain, in place on the state (sigma2, Sigma, a, lam, beta, b).

    The variates (mz, ..., zshear) are numpy's, in the numpy back end's shapes
    (the group axis second); ``sig_nrm``, ``sig_chi``, ``blk_gam``, ``aux_gam``
    hold each block's draws at its coefficients' positions.
    """
    n_ch = sigma2.shape[0]
    g_n, q, p = ztx.shape
    n_blk = blk_start.size
    dim = 1 + rows.size
    n_mp = mz.shape[0]
    t = np.empty((g_n, q))
    sinv = np.empty((q, q))
    big = np.empty((q, q))
    wk = np.empty((3, q, q, g_n))  # the marginal move's work arrays, component-major
    wp = np.empty((2, q, p, g_n))
    wq = np.empty((3, q, g_n))
    for c in range(n_ch):
        Sig = Sigma[c]
        # ---- step 0: marginal move of (sigma^2, Sigma), then the auxiliaries
        if do_marginal:
            xs = np.empty((n_mp + 1, dim))
            _to_x(sigma2[c], Sig, rows, cols, diag, xs[0])
            logw = np.empty(n_mp + 1)
            std = np.empty(dim)
            dev = np.empty(dim)
            for m in range(n_mp + 1):
                if m > 0:
                    w = np.sqrt(mchi[m - 1, c] / mp_df)
                    for i in range(dim):
                        s = 0.0
                        for j in range(dim):
                            s += pchol[c, i, j] * mz[m - 1, c, j]
                        xs[m, i] = loc[c, i] + s / w
                for i in range(dim):
                    dev[i] = xs[m, i] - loc[c, i]
                _fwd(pchol[c], dev, std)
                ss = 0.0
                for i in range(dim):
                    ss += std[i] * std[i]
                log_q = -0.5 * (mp_df + dim) * np.log1p(ss / mp_df)
                lt = _log_target(
                    xs[m], ztz_cm, ztx_cm, zty_cm[c], wk, wp, wq, xtx, xty[c], yty[c], n_obs,
                    beta_prec, beta_lin, rows, cols, diag, jac, sig_hc, sig_par, blk_start,
                    blk_size, blk_type, blk_par, blk_scale, inv_a2, psi_iw, x_max, k_cond_max,
                )  # fmt: skip
                logw[m] = lt - log_q
            mx = logw[0]
            for m in range(1, n_mp + 1):
                mx = max(mx, logw[m])
            cw = np.empty(n_mp + 1)
            acc = 0.0
            for m in range(n_mp + 1):
                acc += np.exp(logw[m] - mx)
                cw[m] = acc
            thr = mu[c] * cw[n_mp]
            idx = 0
            for m in range(n_mp + 1):
                if cw[m] < thr:
                    idx += 1
            if not math.isfinite(logw[0]):
                idx = 0  # a chain outside the target's region stays where it is
            xn = xs[idx]
            sigma2[c] = np.exp(xn[0])
            big[:, :] = 0.0
            for d in range(dim - 1):
                big[rows[d], cols[d]] = np.exp(xn[1 + d]) if diag[d] else xn[1 + d]
            for i in range(q):
                for j in range(q):
                    s = 0.0
                    for k in range(q):
                        s += big[i, k] * big[j, k]
                    Sig[i, j] = s
            for bi in range(n_blk):
                if blk_type[bi] == 0:
                    s0, k = blk_start[bi], blk_size[bi]
                    blk = Sig[s0 : s0 + k, s0 : s0 + k].copy()
                    binv = np.empty((k, k))
                    _inv(blk, binv)
                    nu = blk_par[bi]
                    for i in range(k):
                        a[c, s0 + i] = (nu * binv[i, i] + inv_a2[s0 + i]) / aux_gam[c, s0 + i]
            if sig_hc:
                lam[c] = (1.0 / sig_par[0] ** 2 + 1.0 / sigma2[c]) / lam_gam[c]
        # ---- step 1: (beta, b) | sigma^2, Sigma
        # component-major like the marginal move (group axis innermost); each group's
        # operations in _cholesky/_solve_lower/_solve_upper's order
        s2 = sigma2[c]
        _inv(Sig, sinv)
        mcm, lcm, acc = wk[0], wk[1], wq[2]
        uxc, uyc = wp[0], wq[0]
        for i in range(q):
            for j in range(q):
                v = s2 * sinv[i, j]
                for g in range(g_n):
                    mcm[i, j, g] = ztz_cm[i, j, g] + v
        for j in range(q):
            acc[0, :] = 0.0
            for k in range(j):
                for g in range(g_n):
                    acc[0, g] += lcm[j, k, g] * lcm[j, k, g]
            for g in range(g_n):
                lcm[j, j, g] = np.sqrt(mcm[j, j, g] - acc[0, g])
            for i in range(j + 1, q):
                acc[0, :] = 0.0
                for k in range(j):
                    for g in range(g_n):
                        acc[0, g] += lcm[i, k, g] * lcm[j, k, g]
                for g in range(g_n):
                    lcm[i, j, g] = (mcm[i, j, g] - acc[0, g]) / lcm[j, j, g]
        for i in range(q):
            for r in range(p):
                for g in range(g_n):
                    acc[0, g] = ztx_cm[i, r, g]
                for k in range(i):
                    for g in range(g_n):
                        acc[0, g] = acc[0, g] - lcm[i, k, g] * uxc[k, r, g]
                for g in range(g_n):
                    uxc[i, r, g] = acc[0, g] / lcm[i, i, g]
            for g in range(g_n):
                acc[0, g] = zty_cm[c, i, g]
            for k in range(i):
                for g in range(g_n):
                    acc[0, g] = acc[0, g] - lcm[i, k, g] * uyc[k, g]
            for g in range(g_n):
                uyc[i, g] = acc[0, g] / lcm[i, i, g]
        axx = np.zeros((p, p))
        rxy = np.zeros(p)
        for i in range(p):
            for j in range(p):
                acc[0, :] = 0.0
                for k in range(q):
                    for g in range(g_n):
                        acc[0, g] += uxc[k, i, g] * uxc[k, j, g]
                for g in range(g_n):
                    axx[i, j] += acc[0, g]
            acc[0, :] = 0.0
            for k in range(q):
                for g in range(g_n):
                    acc[0, g] += uxc[k, i, g] * uyc[k, g]
            for g in range(g_n):
                rxy[i] += acc[0, g]
        prec = np.empty((p, p))
        lin = np.empty(p)
        for i in range(p):
            for j in range(p):
                prec[i, j] = (xtx[i, j] - axx[i, j]) / s2 + beta_prec[i, j]
            lin[i] = (xty[c, i] - rxy[i]) / s2 + beta_lin[i]
        _mvn_prec(prec, lin, zbeta[c], beta[c])
        sq = np.sqrt(s2)
        vcm = wq[1]
        for k in range(q):
            acc[0, :] = 0.0
            for r in range(p):
                br = beta[c, r]
                for g in range(g_n):
                    acc[0, g] += uxc[k, r, g] * br
            for g in range(g_n):
                vcm[k, g] = uyc[k, g] - acc[0, g] + sq * zb[c, g, k]
        for i in range(q - 1, -1, -1):
            for g in range(g_n):
                acc[0, g] = vcm[i, g]
            for k in range(i + 1, q):
                for g in range(g_n):
                    acc[0, g] -= lcm[k, i, g] * b[c, g, k]
            for g in range(g_n):
                b[c, g, i] = acc[0, g] / lcm[i, i, g]
        # ---- step 2: sigma^2 | beta, b from the residual sum of squares
        bxy = 0.0
        bxb = 0.0
        for i in range(p):
            bxy += beta[c, i] * xty[c, i]
            for j in range(p):
                bxb += beta[c, i] * xtx[i, j] * beta[c, j]
        quad = 0.0
        for g in range(g_n):
            for k in range(q):
                s = 0.0
                for r in range(p):
                    s += ztx[g, k, r] * beta[c, r]
                t[g, k] = zty[c, g, k] - s
            for k in range(q):
                s = 0.0
                for m in range(q):
                    s += ztz[g, k, m] * b[c, g, m]
                quad += b[c, g, k] * (s - 2.0 * t[g, k])
        rss = max(yty[c] - 2.0 * bxy + bxb + quad, 1e-300)
        if sig_hc:
            sigma2[c] = (0.5 * rss + 1.0 / lam[c]) / sig_gam[c, 0]
            lam[c] = (1.0 / sig_par[0] ** 2 + 1.0 / sigma2[c]) / sig_gam[c, 1]
        else:
            sigma2[c] = (sig_par[2] + 0.5 * rss) / sig_gam[c, 0]
        s2 = sigma2[c]
        # ---- step 3: Sigma | b (and the Huang-Wand auxiliaries)
        Sig[:, :] = 0.0
        for bi in range(n_blk):
            s0, k, typ = blk_start[bi], blk_size[bi], blk_type[bi]
            ssb = np.zeros((k, k))
            for i in range(k):
                for j in range(k):
                    s = 0.0
                    for g in range(g_n):
                        s += b[c, g, s0 + i] * b[c, g, s0 + j]
                    ssb[i, j] = s
            blk = np.empty((k, k))
            if typ == 0:
                nu = blk_par[bi]
                for i in range(k):
                    ssb[i, i] += 2.0 * nu / a[c, s0 + i]
                _inv_wishart(
                    nu + k - 1 + g_n, ssb, sig_nrm[c, s0 : s0 + k, s0 : s0 + k],
                    sig_chi[c, s0 : s0 + k], blk,
                )  # fmt: skip
                binv = np.empty((k, k))
                _inv(blk, binv)
                for i in range(k):
                    a[c, s0 + i] = (nu * binv[i, i] + inv_a2[s0 + i]) / blk_gam[c, s0 + i]
            elif typ == 1:
                for i in range(k):
                    for j in range(k):
                        ssb[i, j] += psi_iw[s0 + i, s0 + j]
                _inv_wishart(
                    blk_par[bi] + g_n, ssb, sig_nrm[c, s0 : s0 + k, s0 : s0 + k],
                    sig_chi[c, s0 : s0 + k], blk,
                )  # fmt: skip
            else:
                blk[0, 0] = (blk_scale[bi] + 0.5 * ssb[0, 0]) / blk_gam[c, s0]
            Sig[s0 : s0 + k, s0 : s0 + k] = blk
        # ---- step 4: interweaving rescaling
        n_mv = 0
        for k in range(q):
            if moved[k]:
                n_mv += 1
        if n_mv > 0:
            ww = np.zeros((q, q))
            wr = np.zeros(q)
            for k in range(q):
                for m in range(q):
                    s = 0.0
                    for g in range(g_n):
                        s += b[c, g, k] * ztz[g, k, m] * b[c, g, m]
                    ww[k, m] = s
                s = 0.0
                for g in range(g_n):
                    s += b[c, g, k] * t[g, k]
                wr[k] = s
            mk = np.empty(n_mv, dtype=np.int64)
            n = 0
            for k in range(q):
                if moved[k]:
                    mk[n] = k
                    n += 1
            pm = np.empty((n_mv, n_mv))
            lm = np.empty(n_mv)
            for i in range(n_mv):
                s = 0.0
                for f in range(q):
                    if not moved[f]:
                        s += ww[mk[i], f]
                lm[i] = (wr[mk[i]] - s) / s2
                for j in range(n_mv):
                    pm[i, j] = ww[mk[i], mk[j]] / s2
                kk = mk[i]
                pm[i, i] += 2.0 / (scale[kk] ** 2 * a[c, kk])
            sv = np.ones(q)
            sm = np.empty(n_mv)
            _mvn_prec(pm, lm, zs[c], sm)
            for i in range(n_mv):
                sv[mk[i]] = sm[i]
            for g in range(g_n):
                for k in range(q):
                    b[c, g, k] = b[c, g, k] * sv[k]
            for i in range(q):
                for j in range(q):
                    Sig[i, j] = Sig[i, j] * sv[i] * sv[j]
            for k in range(q):
                a[c, k] = a[c, k] / sv[k] ** 2
        # ---- step 5: interweaving shears
        if pairs.shape[0] > 0:
            psi = np.zeros((q, q))
            for bi in range(n_blk):
                s0, k, typ = blk_start[bi], blk_size[bi], blk_type[bi]
                if typ == 0 and k > 1:
                    for i in range(s0, s0 + k):
                        psi[i, i] = 2.0 * blk_par[bi] / a[c, i]
                elif typ == 1:
                    for i in range(s0, s0 + k):
                        for j in range(s0, s0 + k):
                            psi[i, j] = psi_iw[i, j]
            for pi in range(pairs.shape[0]):
                j, k = pairs[pi, 0], pairs[pi, 1]
                _inv(Sig, sinv)
                hp = 0.0
                hl = 0.0
                for g in range(g_n):
                    bj = b[c, g, j]
                    s = 0.0
                    for m in range(q):
                        s += ztz[g, k, m] * b[c, g, m]
                    hp += bj * bj * ztz[g, k, k]
                    hl += bj * (t[g, k] - s)
                hp = hp / s2 + psi[j, j] * sinv[k, k]
                s = 0.0
                for m in range(q):
                    s += psi[j, m] * sinv[m, k]
                hl = hl / s2 + s
                cc = hl / hp + zshear[pi, c] / np.sqrt(hp)
                for g in range(g_n):
                    b[c, g, k] += cc * b[c, g, j]
                for m in range(q):
                    Sig[k, m] += cc * Sig[j, m]
                for m in range(q):
                    Sig[m, k] += cc * Sig[m, j]
            for i in range(q):
                for m in range(i + 1, q):
                    v = 0.5 * (Sig[i, m] + Sig[m, i])
                    Sig[i, m] = v
                    Sig[m, i] = v
        if do_trace:
            _to_x(sigma2[c], Sig, rows, cols, diag, trace_row[c])
