r"""Gibbs sampler for the two-level varying-intercept model, from sufficient statistics.

Model (brms names in brackets)
------------------------------
.. math::

    y_{ij} \mid \theta_j, \sigma &\sim \mathcal N(\theta_j, \sigma^2),
        \qquad i = 1..n_j,\ j = 1..J, \\
    \theta_j &= \mu + r_j, \qquad r_j \mid \tau \sim \mathcal N(0, \tau^2), \\
    \mu &\sim \text{flat} \ \text{or}\ \mathcal N(m_0, s_0^2), \\
    \tau &\sim C^+(0, A_\tau)\ \text{or}\ \tau^2 \sim \text{IG}(\alpha_\tau, \beta_\tau),
    \qquad \sigma \sim C^+(0, A_\sigma)\ \text{or}\ \sigma^2 \sim
    \text{IG}(\alpha_\sigma, \beta_\sigma),

with :math:`\mu` = ``b_Intercept``, :math:`\tau` = ``sd_<group>__Intercept``,
:math:`\sigma` = ``sigma``, :math:`\theta_j` = ``coef_<group>[j,Intercept]`` and
:math:`r_j` = ``r_<group>[j,Intercept]``. The data enter only through
:math:`n_j`, :math:`\bar y_j` and :math:`SSW = \sum_{ij}(y_{ij} - \bar y_j)^2`:

.. math::

    p(y \mid \theta, \sigma) \propto \sigma^{-N}
    \exp\Big\{-\frac{SSW + \sum_j n_j (\bar y_j - \theta_j)^2}{2\sigma^2}\Big\},

so an iteration costs at most :math:`O(J)` whatever :math:`N = \sum_j n_j` is.

Schemes (all chains advance together; chains are the leading array axis)
------------------------------------------------------------------------
``"collapsed"`` (default). :math:`\mu` and :math:`\theta` are integrated out in
closed form: given :math:`(\tau, \sigma)`, :math:`\bar y_j \sim \mathcal N(\mu,
V_j)` with :math:`V_j = \tau^2 + \sigma^2/n_j`, so

.. math::

    \log p(\tau, \sigma \mid y) = \text{const} + \log p(\tau) + \log p(\sigma)
    - (N - J)\log\sigma - \frac{SSW}{2\sigma^2}
    - \frac12\Big(\sum_j \log V_j + \log P + \sum_j \frac{(\bar y_j - \hat\mu)^2}{V_j}
    + \frac{(m_0 - \hat\mu)^2}{s_0^2}\Big),

:math:`P = \sum_j V_j^{-1} + s_0^{-2}`, :math:`\hat\mu = (\sum_j \bar y_j/V_j +
m_0/s_0^2)/P` (flat prior: :math:`s_0^{-2} = 0`). Groups of equal size share
:math:`V_j`, so one evaluation costs :math:`O(K)`, :math:`K \le J` the number of
distinct group sizes. The chain runs on this two-dimensional marginal
posterior:

* during the first 50 warm-up iterations, :math:`\tau \mid \sigma, y` and then
  :math:`\sigma \mid \tau, y` by slice sampling (Neal 2003: stepping out, then
  shrinkage), which needs no tuning and moves the chains from their dispersed
  starts into the bulk;
* afterwards, a multiple-proposal independence sampler (Tjelmeland 2004;
  Calderhead 2014) for :math:`(\tau, \sigma)` jointly: each iteration draws 15
  points from a multivariate :math:`t_2` fitted to the chain's own recent
  warm-up draws (refitted at warm-up iterations 50, 100, 200, ... and at the
  end of warm-up, each time to the second half of the draws so far; fixed
  after warm-up) and moves to one of the 16 points (current included) with
  probability proportional to target over proposal density. It works in the
  coordinates :math:`(\log(\tau^2 + \sigma^2/\bar n), \log(\tau^2 \bar n/\sigma^2))`
  (:math:`\bar n` the harmonic mean group size), in which the posterior is
  close to a product both when groups are informative and when only
  :math:`\tau^2 + \sigma^2` is identified (one observation a group). Measured
  ESS is 0.65-0.9 a draw across regimes (about 0.3 when the posterior of
  :math:`\tau` piles up at zero, which a :math:`t` fits less well).

The prior densities (half-Cauchy or inverse gamma) are evaluated directly, so
no auxiliary variables are needed. At kept iterations only,
:math:`\mu \mid \tau, \sigma, y \sim \mathcal N(\hat\mu, 1/P)` and
:math:`\theta_j \mid \mu,\tau,\sigma,y \sim \mathcal N(v_j(n_j\bar y_j/\sigma^2 +
\mu/\tau^2), v_j)`, :math:`v_j = (n_j/\sigma^2 + 1/\tau^2)^{-1}`, are drawn exactly.
Mixing thus does not depend on whether the groups are informative (there is
nothing to centre or non-centre), and an iteration costs :math:`O(K)`; the
:math:`O(J)` work is only the output.

``"asis"``. The data-augmentation Gibbs sampler with half-Cauchy priors through
the auxiliary variables of Makalic & Schmidt (2016) (:math:`\tau^2 \mid a \sim
\text{IG}(1/2, 1/a)`, :math:`a \sim \text{IG}(1/2, 1/A^2)` gives :math:`\tau \sim
C^+(0, A)`, and every full conditional is conjugate). Per iteration:
:math:`\theta \mid \mu, \tau, \sigma, y` (normal, as above); :math:`b \mid \sigma
\sim \text{IG}(1, 1/A_\sigma^2 + 1/\sigma^2)` and :math:`\sigma^2 \mid \theta, b \sim
\text{IG}((N+1)/2, S_w/2 + 1/b)`, :math:`S_w = SSW + \sum_j n_j(\bar y_j -
\theta_j)^2` (inverse-gamma prior: :math:`\text{IG}(\alpha + N/2, \beta + S_w/2)`);
the centred (sufficient-augmentation) update of :math:`(\mu, \tau)` given
:math:`\theta` (:math:`\mu \mid \theta, \tau` normal; :math:`a \mid \tau`;
:math:`\tau^2 \mid \theta, \mu, a \sim \text{IG}((J+1)/2, S_\theta/2 + 1/a)`); then
the non-centred (ancillary-augmentation) update with :math:`\eta_j = (\theta_j -
\mu)/\tau` fixed: :math:`\bar y_j \sim \mathcal N(\mu + \tau\eta_j, \sigma^2/n_j)` is a
linear regression in :math:`(\mu, \tau)`; propose :math:`(\mu', \tau')` from its
Gaussian posterior with a flat prior on a *signed* :math:`\tau`, accept with
probability :math:`\min\{1, p_\tau(|\tau'|)/p_\tau(\tau)\}` and fold :math:`\tau
\leftarrow |\tau'|`, :math:`\theta' = \mu' + \tau'\eta`. This is the
ancillarity-sufficiency interweaving strategy (ASIS) of Yu & Meng (2011). The
fold is valid because the sign-symmetric extension :math:`\tau \in \mathbb R`,
:math:`p(\tau) = p(-\tau)` leaves the posterior invariant under :math:`(\tau, \eta)
\mapsto (-\tau, -\eta)` (Frühwirth-Schnatter & Wagner 2010) and the proposal and
acceptance ratio are equivariant under it. ASIS mixes :math:`\tau` well when the
groups are informative. With :math:`\kappa_j = n_j\tau^2/(n_j\tau^2 + \sigma^2)`,
the fractions of missing information about :math:`\tau` of the centred and the
non-centred augmentations are about :math:`1 - \overline{\kappa^2}` and
:math:`1 - \overline{2\kappa(1-\kappa)}` (cf. Papaspiliopoulos, Roberts & Sköld
2007); both tend to 1 when every group is weak (:math:`\kappa \to 0`), a common
regime with many small groups, and there ASIS mixes slowly (measured ESS of
:math:`\tau` 0.05-0.12 per draw for 2000 groups with :math:`\kappa \le 0.004`,
against 0.7 for ``"collapsed"``). Hence ``"collapsed"`` is the default.

``"centred"``. ASIS without the non-centred step: the textbook Gibbs sampler,
for comparison only.

Random numbers are drawn in blocks, one child generator per stream, so the
draws do not depend on the block size, and the pure-numpy and the optional
numba back ends consume identical variates and agree up to rounding. The slice
sampler's shrinkage uniforms come from a buffered stream that both back ends
consume in the same order (one uniform a chain a shrinkage round, all chains in
lockstep). All adaptation (slice widths at warm-up iteration 25, the proposal
at 50, 100, 200, ... and at the end of warm-up) uses each chain's own warm-up
draws and stops with warm-up, so the kept draws come from a fixed Markov
kernel. With fewer than 50 warm-up iterations the slice sampler is used
throughout.

References
----------
Neal, R. M. (2003). Slice sampling. *Ann. Statist.* 31(3), 705-767.

Tjelmeland, H. (2004). Using all Metropolis-Hastings proposals. Technical
report, Norwegian University of Science and Technology, Trondheim.

Calderhead, B. (2014). A general construction for parallelizing
Metropolis-Hastings algorithms. *Proc. Natl. Acad. Sci. USA* 111(49),
17408-17413.

Yu, Y. & Meng, X.-L. (2011). To center or not to center: that is not the
question — an ancillarity-sufficiency interweaving strategy (ASIS) for boosting
MCMC efficiency. *J. Comput. Graph. Statist.* 20(3), 531-570.

Makalic, E. & Schmidt, D. F. (2016). A simple sampler for the horseshoe
estimator. *IEEE Signal Process. Lett.* 23(1), 179-182.

Papaspiliopoulos, O., Roberts, G. O. & Sköld, M. (2007). A general framework for
the parametrization of hierarchical models. *Statist. Sci.* 22(1), 59-73.

Frühwirth-Schnatter, S. & Wagner, H. (2010). Stochastic model specification
search for Gaussian and partial non-Gaussian state space models. *J.
Econometrics* 154(1), 85-100.

Gelman, A. (2006). Prior distributions for variance parameters in hierarchical
models. *Bayesian Anal.* 1(3), 515-534.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np

from hierpipe.errors import ConfigError, InputError

__all__ = [
    "Flat",
    "GibbsSettings",
    "HalfCauchy",
    "InvGamma",
    "Normal",
    "Priors",
    "TwoLevelDraws",
    "gibbs_two_level",
    "gibbs_two_level_batch",
    "numba_available",
]

Scheme = Literal["collapsed", "asis", "centred"]
Backend = Literal["numpy", "numba"]
_SCHEMES = ("centred", "asis", "collapsed")  # index = code used by the kernels

# Target size (float64 elements) of one block of pre-drawn theta normals; the
# draws do not depend on it, only memory and speed do.
_BLOCK_ELEMENTS = 1 << 18
_MAX_BLOCK_ITERATIONS = 1024
# Slice sampler: stepping out is limited to _SLICE_M widths (Neal 2003, Fig. 3;
# valid for any limit); more than _SLICE_MAX_ROUNDS shrinkage rounds in one
# iteration can only mean a non-finite log density, and is reported as an error.
_SLICE_M = 64
_SLICE_MAX_ROUNDS = 256
_SLICE_WIDTH_FACTOR = 2.5
_ADAPT_FIRST = 25
# Multiple-proposal independence sampler for (log tau, log sigma): _MP_M
# multivariate-t proposals (_MP_DF degrees of freedom, covariance of the chain's
# recent warm-up draws inflated by _MP_INFLATE^2, SDs at least _MP_SD_FLOOR) an
# iteration, first fitted at warm-up iteration _MP_START.
_MP_M = 15
_MP_DF = 2.0
_MP_INFLATE = 1.0
_MP_SD_FLOOR = 1e-3
_MP_START = 50


# --------------------------------------------------------------------------- priors


@dataclass(frozen=True)
class Flat:
    """Improper flat prior on ``b_Intercept`` (brms's default for fixed effects)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description for ``fit.json``."""
        return {"family": "flat"}


@dataclass(frozen=True)
class Normal:
    r"""Normal prior :math:`\mathcal N(\text{mean}, \text{sd}^2)` on ``b_Intercept``."""

    mean: float
    sd: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description for ``fit.json``."""
        return {"family": "normal", "mean": float(self.mean), "sd": float(self.sd)}


@dataclass(frozen=True)
class HalfCauchy:
    r"""Half-Cauchy prior :math:`C^+(0, \text{scale})` on a standard deviation."""

    scale: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description for ``fit.json`` (on the SD, as brms states it)."""
        return {"family": "half_cauchy", "on": "sd", "scale": float(self.scale)}


@dataclass(frozen=True)
class InvGamma:
    r"""Inverse-gamma prior :math:`\text{IG}(\text{shape}, \text{scale})` on a *variance*.

    Density :math:`p(v) \propto v^{-\text{shape}-1} e^{-\text{scale}/v}`.
    """

    shape: float
    scale: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description for ``fit.json`` (on the variance)."""
        return {
            "family": "inv_gamma",
            "on": "variance",
            "shape": float(self.shape),
            "scale": float(self.scale),
        }


ScalePrior = HalfCauchy | InvGamma
InterceptPrior = Flat | Normal


@dataclass(frozen=True)
class Priors:
    """Priors of the two-level model; the scales are the caller's choice.

    Attributes
    ----------
    sd : prior of ``sd_<group>__Intercept`` (tau).
    sigma : prior of ``sigma``; ignored when ``sigma`` is fixed.
    b_Intercept : prior of ``b_Intercept`` (mu); flat by default.
    """

    sd: ScalePrior
    sigma: ScalePrior
    b_Intercept: InterceptPrior = field(default_factory=Flat)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description for ``fit.json``."""
        return {
            "b_Intercept": self.b_Intercept.to_dict(),
            "sd": self.sd.to_dict(),
            "sigma": self.sigma.to_dict(),
        }


@dataclass(frozen=True)
class GibbsSettings:
    """Sampler settings, recorded in ``fit.json``.

    Attributes
    ----------
    chains, warmup, draws, thin : ``chains`` chains each run ``warmup + draws *
        thin`` iterations and keep every ``thin``-th after warm-up.
    scheme : ``"collapsed"`` (default), ``"asis"`` or ``"centred"``; see the
        module docstring.
    sigma_fixed : if given, ``sigma`` is known and held at this value (the
        known-standard-error model with ``se_j = sigma / sqrt(n_j)``).
    backend : ``"numpy"`` (default, no extra dependency) or ``"numba"`` (a
        compiled kernel; same variates, same draws up to rounding).
    """

    chains: int = 4
    warmup: int = 1000
    draws: int = 1000
    thin: int = 1
    scheme: Scheme = "collapsed"
    sigma_fixed: float | None = None
    backend: Backend = "numpy"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description for ``fit.json``."""
        return asdict(self)


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class TwoLevelDraws:
    """Posterior draws of the two-level model; leading axes are (chain, draw).

    Attributes
    ----------
    b_Intercept, sd, sigma : arrays of shape ``(C, D)``.
    theta : group means (``coef``), shape ``(C, D, J)``.
    settings, priors : what produced the draws.
    stats : JSON-able sampler statistics: for ``"collapsed"`` the update used
        after warm-up, the fraction of kept iterations in which a proposal was
        chosen, per chain, and the collapsed-density evaluations per iteration;
        for ``"asis"`` the acceptance rate of the ancillary step, per chain.
    """

    b_Intercept: np.ndarray
    sd: np.ndarray
    sigma: np.ndarray
    theta: np.ndarray
    settings: GibbsSettings
    priors: Priors
    stats: dict[str, Any]

    @cached_property
    def r(self) -> np.ndarray:
        """Group deviations ``theta - b_Intercept`` (``r``), shape ``(C, D, J)``.

        Computed on first access and then kept (another array the size of
        ``theta``).
        """
        return self.theta - self.b_Intercept[:, :, None]

    def info(self) -> dict[str, Any]:
        """JSON-able facts for ``fit.json``: sampler, settings, priors, statistics."""
        return {
            "sampler": "gibbs_two_level",
            "settings": self.settings.to_dict(),
            "priors": self.priors.to_dict(),
            "stats": self.stats,
        }


# --------------------------------------------------------------------------- data


class _Data:
    """Sufficient statistics with a leading data axis of length B = 1 or C.

    With one data set the weighted sums over groups are matrix-vector products
    against stacked weight matrices (one BLAS call for several sums); with one
    data set a chain they are row-wise ``einsum``. The table of distinct group
    sizes (``inv_ks`` = 1/size; ``cnt``, ``s1``, ``s2`` = number of groups and sums
    of centred means and of their squares per size; padded with zero counts to a
    common length) serves the collapsed density.
    """

    def __init__(self, n: np.ndarray, ybar: np.ndarray, ssw: np.ndarray, chains: int) -> None:
        self.n = np.ascontiguousarray(n, dtype=np.float64)
        self.ybar = np.ascontiguousarray(ybar, dtype=np.float64)
        self.nybar = self.n * self.ybar
        self.B, self.J = self.n.shape
        # Per-chain copies of the scalar statistics, shape (C,), so that chain-axis
        # arithmetic never broadcasts.
        shape = (chains,)
        self.N = np.broadcast_to(self.n.sum(axis=1), shape).copy()
        self.Y = np.broadcast_to(self.nybar.sum(axis=1), shape).copy()
        self.ssw = np.broadcast_to(np.asarray(ssw, dtype=np.float64).reshape(-1), shape).copy()
        self.dof = self.N - self.J  # degrees of freedom of SSW
        # log of the harmonic mean group size (coordinates of the proposal)
        self.log_nh = np.broadcast_to(np.log(self.J / (1.0 / self.n).sum(axis=1)), shape).copy()
        # Centre for the collapsed density: the n-weighted grand mean.
        self.y0 = self.Y / self.N
        if self.B == 1:
            self._n = self.n[0]
            self._ones_n = np.stack([np.ones(self.J), self.n[0]], axis=1)
            self._n_nybar = np.stack([self.n[0], self.nybar[0]], axis=1)
        rows = []
        for b in range(self.B):
            ks, inv = np.unique(self.n[b], return_inverse=True)
            yc = self.ybar[b] - self.y0[b]
            rows.append(
                (
                    ks,
                    np.bincount(inv).astype(np.float64),
                    np.bincount(inv, weights=yc),
                    np.bincount(inv, weights=yc * yc),
                )
            )
        K = max(len(r[0]) for r in rows)
        self.K = K
        self.inv_ks = np.ones((self.B, K))
        self.cnt = np.zeros((self.B, K))
        self.s1 = np.zeros((self.B, K))
        self.s2 = np.zeros((self.B, K))
        for b, (ks, cnt, s1, s2) in enumerate(rows):
            m = len(ks)
            self.inv_ks[b, :m] = 1.0 / ks
            self.cnt[b, :m] = cnt
            self.s1[b, :m] = s1
            self.s2[b, :m] = s2
        self.tab = np.stack([self.cnt[0], self.s1[0], self.s2[0]], axis=1) if self.B == 1 else None
        # Centred prior mean of b_Intercept, c0 = m0 - y0 (set when the prior is normal).
        self.c0 = np.zeros(chains)

    def ndot(self, x: np.ndarray) -> np.ndarray:
        """Row sums ``sum_j n_j x[c, j]``."""
        if self.B == 1:
            return x @ self._n
        return np.einsum("cj,cj->c", x, self.n)

    def sum_and_ndot(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row sums ``(sum_j x[c, j], sum_j n_j x[c, j])``."""
        if self.B == 1:
            s = x @ self._ones_n
            return s[:, 0], s[:, 1]
        return x.sum(axis=1), np.einsum("cj,cj->c", x, self.n)

    def ndot_and_nybardot(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row sums ``(sum_j n_j x[c, j], sum_j n_j ybar_j x[c, j])``."""
        if self.B == 1:
            s = x @ self._n_nybar
            return s[:, 0], s[:, 1]
        return np.einsum("cj,cj->c", x, self.n), np.einsum("cj,cj->c", x, self.nybar)


def _validate(n: Any, ybar: Any, ssw: Any) -> tuple[np.ndarray, np.ndarray, float]:
    n_arr = np.asarray(n)
    y_arr = np.asarray(ybar)
    if n_arr.ndim != 1 or y_arr.ndim != 1:
        raise InputError("gibbs_two_level: n and ybar must be one-dimensional (one entry a group)")
    if n_arr.shape != y_arr.shape:
        raise InputError(f"gibbs_two_level: n has {n_arr.size} groups but ybar has {y_arr.size}")
    if n_arr.size < 2:
        raise InputError(f"gibbs_two_level: need at least two groups, got {n_arr.size}")
    try:
        n_f = n_arr.astype(np.float64)
        y_f = y_arr.astype(np.float64)
        ssw_f = float(ssw)
    except (TypeError, ValueError) as exc:
        raise InputError(f"gibbs_two_level: non-numeric input ({exc})") from None
    bad = np.flatnonzero(~np.isfinite(n_f) | (n_f < 1) | (n_f != np.round(n_f)))
    if bad.size:
        j = int(bad[0])
        raise InputError(
            f"gibbs_two_level: group size n must be a positive integer; group index {j} "
            f"has n = {n_arr[j]!r}"
        )
    bad = np.flatnonzero(~np.isfinite(y_f))
    if bad.size:
        j = int(bad[0])
        raise InputError(
            f"gibbs_two_level: group mean ybar is not finite at group index {j} ({y_arr[j]!r})"
        )
    if not math.isfinite(ssw_f) or ssw_f < 0:
        raise InputError(f"gibbs_two_level: ssw must be finite and >= 0, got {ssw_f!r}")
    return n_f, y_f, ssw_f


def _check_positive(name: str, value: Any) -> None:
    ok = isinstance(value, int | float | np.floating | np.integer) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value > 0):
        raise ConfigError(
            f"gibbs_two_level: {name} must be a positive finite number, got {value!r}"
        )


def _validate_config(priors: Priors, settings: GibbsSettings) -> None:
    for name, p in (("sd", priors.sd), ("sigma", priors.sigma)):
        if isinstance(p, HalfCauchy):
            _check_positive(f"prior {name} half-Cauchy scale", p.scale)
        elif isinstance(p, InvGamma):
            _check_positive(f"prior {name} inverse-gamma shape", p.shape)
            _check_positive(f"prior {name} inverse-gamma scale", p.scale)
        else:
            raise ConfigError(f"gibbs_two_level: prior {name} must be HalfCauchy or InvGamma")
    b = priors.b_Intercept
    if isinstance(b, Normal):
        _check_positive("prior b_Intercept sd", b.sd)
        if not math.isfinite(b.mean):
            raise ConfigError("gibbs_two_level: prior b_Intercept mean must be finite")
    elif not isinstance(b, Flat):
        raise ConfigError("gibbs_two_level: prior b_Intercept must be Flat or Normal")
    for name, low in (("chains", 1), ("draws", 1), ("thin", 1), ("warmup", 0)):
        v = getattr(settings, name)
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < low:
            raise ConfigError(f"gibbs_two_level: {name} must be an integer >= {low}, got {v!r}")
    if settings.sigma_fixed is not None:
        _check_positive("sigma_fixed", settings.sigma_fixed)
    if settings.scheme not in _SCHEMES:
        raise ConfigError(
            f"gibbs_two_level: scheme must be one of {', '.join(_SCHEMES)}, got {settings.scheme!r}"
        )
    if settings.backend not in ("numpy", "numba"):
        raise ConfigError(
            f"gibbs_two_level: backend must be 'numpy' or 'numba', got {settings.backend!r}"
        )


# --------------------------------------------------------------------------- constants


@dataclass(frozen=True)
class _Consts:
    """Prior constants and switches in the form both back ends use.

    Scale priors: ``*_hc`` is 1 for half-Cauchy (``*_inv_A2`` = 1/A^2) and 0 for
    inverse gamma on the variance (``*_beta`` its scale, ``*_pow`` = 2 shape + 1,
    the power in the density of the SD w.r.t. d SD). ``mu_prec`` = 1/s0^2 and
    ``mu_prec_mean`` = m0/s0^2 (both 0 for the flat prior).
    """

    tau_hc: int
    tau_inv_A2: float
    tau_beta: float
    tau_pow: float
    sigma_free: int
    sigma_hc: int
    sigma_inv_A2: float
    sigma_beta: float
    mu_prec: float
    mu_prec_mean: float
    scheme: int
    sigma_pow: float

    def kernel_array(self) -> np.ndarray:
        return np.array(
            [
                self.tau_hc,
                self.tau_inv_A2,
                self.tau_beta,
                self.tau_pow,
                self.sigma_free,
                self.sigma_hc,
                self.sigma_inv_A2,
                self.sigma_beta,
                self.mu_prec,
                self.mu_prec_mean,
                self.scheme,
                self.sigma_pow,
            ],
            dtype=np.float64,
        )


def _consts(priors: Priors, settings: GibbsSettings) -> _Consts:
    def parts(p: ScalePrior) -> tuple[int, float, float, float]:
        if isinstance(p, HalfCauchy):
            return 1, 1.0 / p.scale**2, 0.0, 0.0
        return 0, 0.0, float(p.scale), 2.0 * p.shape + 1.0

    t_hc, t_ia2, t_beta, t_pow = parts(priors.sd)
    s_hc, s_ia2, s_beta, s_pow = parts(priors.sigma)
    b = priors.b_Intercept
    mu_prec = 1.0 / b.sd**2 if isinstance(b, Normal) else 0.0
    mu_prec_mean = b.mean / b.sd**2 if isinstance(b, Normal) else 0.0
    return _Consts(
        tau_hc=t_hc,
        tau_inv_A2=t_ia2,
        tau_beta=t_beta,
        tau_pow=t_pow,
        sigma_free=int(settings.sigma_fixed is None),
        sigma_hc=s_hc,
        sigma_inv_A2=s_ia2,
        sigma_beta=s_beta,
        mu_prec=mu_prec,
        mu_prec_mean=mu_prec_mean,
        scheme=_SCHEMES.index(settings.scheme),
        sigma_pow=s_pow,
    )


def _gamma_shapes(
    d: _Data, priors: Priors, settings: GibbsSettings, chains: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Shapes of the gamma variates for the tau^2 (centred) and sigma^2 updates."""
    if isinstance(priors.sd, HalfCauchy):
        shape_tau = np.full(chains, (d.J + 1) / 2.0)
    else:
        shape_tau = np.full(chains, priors.sd.shape + d.J / 2.0)
    if settings.sigma_fixed is not None:
        return shape_tau, None
    if isinstance(priors.sigma, HalfCauchy):
        shape_sigma = (d.N + 1.0) / 2.0
    else:
        shape_sigma = priors.sigma.shape + d.N / 2.0
    return shape_tau, np.asarray(shape_sigma, dtype=np.float64)


# --------------------------------------------------------------------------- initial values


def _initial_values(
    d: _Data, chains: int, sigma_fixed: float | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Dispersed starting values ``(mu, tau^2, sigma^2)`` (each ``(C,)``) and slice widths.

    ``mu`` starts at the weighted grand mean plus one between-group SD times a
    standard normal (about sqrt(J) posterior SDs), ``tau`` at the between-group
    SD of the means times a log-uniform factor in [e^-2.5, e^1] (so some chains
    start near zero, the centred sampler's sticking point) and ``sigma`` at the
    pooled within-group SD times a log-uniform factor in [1/2, 2]. Slice widths
    (shape ``(2, C)``, for tau and sigma) start at the between-group SD and at
    2.5 rough posterior SDs of sigma; warm-up adapts them.
    """
    z = rng.standard_normal(chains)
    u = rng.random((chains, 2))
    J = d.J
    spread = np.sqrt(np.sum((d.ybar - d.ybar.mean(axis=1, keepdims=True)) ** 2, axis=1) / (J - 1))
    spread = np.broadcast_to(spread, (chains,))
    with np.errstate(divide="ignore", invalid="ignore"):
        within = np.where((d.dof > 0) & (d.ssw > 0), np.sqrt(d.ssw / d.dof), np.nan)
    # Fallbacks keep every start positive and finite for degenerate inputs
    # (all groups of size one, or identical means).
    within = np.where(np.isfinite(within), within, np.where(spread > 0, spread, 1.0))
    scale = np.where(spread > 0, spread, within / np.sqrt(d.N / J))
    mu0 = d.y0 + scale * z
    tau0 = scale * np.exp(-2.5 + 3.5 * u[:, 0])
    if sigma_fixed is None:
        sigma0 = within * np.exp(math.log(2.0) * (2.0 * u[:, 1] - 1.0))
    else:
        sigma0 = np.full(chains, float(sigma_fixed))
    widths = np.stack([scale, _SLICE_WIDTH_FACTOR * within / np.sqrt(2.0 * np.maximum(d.dof, 1))])
    return (
        np.ascontiguousarray(mu0, dtype=np.float64),
        np.ascontiguousarray(tau0**2, dtype=np.float64),
        np.ascontiguousarray(sigma0**2, dtype=np.float64),
        np.ascontiguousarray(widths, dtype=np.float64),
    )


# --------------------------------------------------------------------------- variates


class _Variates:
    """Pre-drawn random variates in blocks, one child generator per stream.

    Collapsed scheme, per iteration and chain: ``z`` (one normal: mu), ``e``
    (exponentials: slice heights for tau, sigma), ``u`` (uniforms: interval
    position and stepping-out split for tau, then sigma, then the proposal
    choice), ``zp`` and ``gp`` (normals and chi-square variates of the
    multivariate-t proposals); ``z_theta`` (J normals) only for the iterations
    that are kept. Both the slice and the multiple-proposal variates are drawn
    every iteration whichever is used, so stream positions never depend on it.
    Centred and ASIS schemes: ``z_theta`` every iteration, ``z`` (mu, ancillary
    lambda, ancillary mu), ``e`` (auxiliaries a, b), ``u`` (ancillary
    acceptance), ``g_tau``, ``g_sigma`` (gammas of fixed shape). Streams a
    scheme does not use are not drawn (placeholders keep the kernel's argument
    types fixed).
    """

    def __init__(
        self,
        rng: np.random.Generator,
        chains: int,
        J: int,
        shape_tau: np.ndarray,
        shape_sigma: np.ndarray | None,
        scheme: int,
    ) -> None:
        (
            self._g_theta,
            self._g_normal,
            self._g_gamma_tau,
            self._g_gamma_sigma,
            self._g_exp,
            self._g_unif,
            g_shrink,
            self._g_prop_normal,
            self._g_prop_gamma,
        ) = rng.spawn(9)
        self.C = chains
        self.J = J
        self.shape_tau = shape_tau
        self.shape_sigma = shape_sigma
        self.scheme = scheme
        self.shrink = _UniformBuffer(g_shrink, chains)

    def block(self, K: int, n_rec: int) -> dict[str, np.ndarray]:
        C = self.C
        if self.scheme == 2:
            return {
                "z_theta": self._g_theta.standard_normal((n_rec, C, self.J)),
                "z": self._g_normal.standard_normal((K, C, 1)),
                "e": self._g_exp.standard_exponential((K, C, 2)),
                "u": self._g_unif.random((K, C, 5)),
                "zp": self._g_prop_normal.standard_normal((K, _MP_M, C, 2)),
                # chi-square(2) = 2 Exp(1): cheap heavy-tailed t_2 proposals
                "gp": 2.0 * self._g_prop_gamma.standard_exponential((K, _MP_M, C)),
                "g_tau": np.ones((K, C)),
                "g_sigma": np.ones((K, C)),
            }
        out = {
            "z_theta": self._g_theta.standard_normal((K, C, self.J)),
            "z": self._g_normal.standard_normal((K, C, 3)),
            "e": self._g_exp.standard_exponential((K, C, 2)),
            "u": self._g_unif.random((K, C, 1)),
            "g_tau": self._g_gamma_tau.standard_gamma(self.shape_tau, size=(K, C)),
            "zp": np.zeros((K, 1, C, 2)),
            "gp": np.ones((K, 1, C)),
        }
        if self.shape_sigma is not None:
            out["g_sigma"] = self._g_gamma_sigma.standard_gamma(self.shape_sigma, size=(K, C))
        else:
            out["g_sigma"] = np.ones((K, C))
        return out


class _UniformBuffer:
    """Shrinkage uniforms for the slice sampler, consumed C at a time in order.

    Both back ends refill at the start of an iteration when fewer than
    ``reserve`` remain (enough for the most shrinkage rounds two slice updates
    may take), so they read the same uniforms in the same places.
    """

    def __init__(self, gen: np.random.Generator, chains: int) -> None:
        self.gen = gen
        self.C = chains
        self.reserve = 2 * chains * _SLICE_MAX_ROUNDS
        self.chunk = max(4 * self.reserve, 1 << 14)
        self.buf = np.empty(0)
        self.pos = 0

    def low(self) -> bool:
        return self.buf.size - self.pos < self.reserve

    def refill(self) -> None:
        self.buf = np.concatenate([self.buf[self.pos :], self.gen.random(self.chunk)])
        self.pos = 0

    def take(self) -> np.ndarray:
        u = self.buf[self.pos : self.pos + self.C]
        self.pos += self.C
        return u


# --------------------------------------------------------------------------- conditionals
# Pure functions of the state and pre-drawn standard variates; the tests check
# each against its closed form.


def draw_theta(
    d: _Data, mu: np.ndarray, t2: np.ndarray, s2: np.ndarray, z: np.ndarray
) -> np.ndarray:
    r"""Draw :math:`\theta_j \mid \mu, \tau, \sigma, y`; shape ``(C, J)``.

    .. math:: \theta_j \sim \mathcal N\big(v_j(n_j\bar y_j/\sigma^2 + \mu/\tau^2),\ v_j\big),
        \quad v_j = (n_j/\sigma^2 + 1/\tau^2)^{-1}.

    ``mu``, ``t2`` (:math:`\tau^2`), ``s2`` (:math:`\sigma^2`) have shape ``(C,)``;
    ``z`` holds standard normals of shape ``(C, J)``.
    """
    inv_s2 = (1.0 / s2)[:, None]
    inv_t2 = 1.0 / t2
    var = 1.0 / (d.n * inv_s2 + inv_t2[:, None])
    return var * (d.nybar * inv_s2 + (mu * inv_t2)[:, None]) + z * np.sqrt(var)


def draw_sigma2(
    d: _Data, theta: np.ndarray, s2: np.ndarray, g: np.ndarray, e: np.ndarray, k: _Consts
) -> np.ndarray:
    r"""Draw :math:`\sigma^2 \mid \theta, y` (after :math:`b \mid \sigma` for half-Cauchy).

    :math:`\sigma^2 = (S_w/2 + \text{extra})/g`, :math:`S_w = SSW + \sum_j n_j(\bar
    y_j - \theta_j)^2`, with :math:`g \sim \text{Gamma}((N+1)/2)` (half-Cauchy) or
    :math:`\text{Gamma}(\alpha + N/2)` (inverse gamma) pre-drawn, and ``extra`` =
    :math:`1/b`, :math:`b \sim \text{IG}(1, 1/A^2 + 1/\sigma^2)`, i.e. ``e / (1/sigma^2
    + 1/A^2)`` with ``e`` standard exponential (half-Cauchy), or :math:`\beta`.
    """
    resid = d.ybar - theta
    sw = d.ssw + d.ndot(resid * resid)
    extra = e / (1.0 / s2 + k.sigma_inv_A2) if k.sigma_hc else k.sigma_beta
    return (0.5 * sw + extra) / g


def draw_mu_centred(
    theta_sum: np.ndarray, J: int, t2: np.ndarray, z: np.ndarray, k: _Consts
) -> np.ndarray:
    r"""Draw :math:`\mu \mid \theta, \tau` from ``theta_sum`` :math:`= \sum_j \theta_j`.

    .. math:: \mu \sim \mathcal N\Big(\frac{\sum_j\theta_j/\tau^2 + m_0/s_0^2}{P},
        \frac{1}{P}\Big), \quad P = J/\tau^2 + 1/s_0^2

    (flat prior: :math:`1/s_0^2 = m_0/s_0^2 = 0`).
    """
    if not k.mu_prec:
        return theta_sum / J + z * np.sqrt(t2 / J)
    prec = J / t2 + k.mu_prec
    return (theta_sum / t2 + k.mu_prec_mean) / prec + z / np.sqrt(prec)


def draw_tau2_centred(
    s_theta: np.ndarray, t2: np.ndarray, g: np.ndarray, e: np.ndarray, k: _Consts
) -> np.ndarray:
    r"""Draw :math:`\tau^2 \mid \theta, \mu` from :math:`S_\theta = \sum_j(\theta_j - \mu)^2`.

    :math:`\tau^2 = (S_\theta/2 + \text{extra})/g` with :math:`g \sim
    \text{Gamma}((J+1)/2)` (half-Cauchy) or :math:`\text{Gamma}(\alpha + J/2)`, and
    ``extra`` = :math:`1/a` from :math:`a \mid \tau \sim \text{IG}(1, 1/A^2 +
    1/\tau^2)` (``t2`` is the current :math:`\tau^2`) or :math:`\beta`.
    """
    extra = e / (1.0 / t2 + k.tau_inv_A2) if k.tau_hc else k.tau_beta
    return (0.5 * s_theta + extra) / g


def ancillary_proposal(
    d: _Data,
    m12: np.ndarray,
    m22: np.ndarray,
    r2: np.ndarray,
    s2: np.ndarray,
    z_lam: np.ndarray,
    z_mu: np.ndarray,
    k: _Consts,
) -> tuple[np.ndarray, np.ndarray]:
    r"""ASIS proposal :math:`(\mu', \lambda)` with :math:`\eta \propto \text{dev}` fixed.

    With :math:`\text{dev}_j = \theta_j - \mu = \tau\eta_j` fixed, the model is the
    weighted regression :math:`\bar y_j \sim \mathcal N(\mu' + \lambda\,\text{dev}_j,
    \sigma^2/n_j)` in :math:`(\mu', \lambda)`, :math:`\tau' = \lambda\tau`. Under the
    :math:`\mu` prior and a flat prior on :math:`\lambda \in \mathbb R` its
    posterior is :math:`\mathcal N(M^{-1}r, \sigma^2 M^{-1})` with

    .. math:: M = \begin{pmatrix} N + \sigma^2/s_0^2 & m_{12} \\ m_{12} & m_{22}
        \end{pmatrix},\quad r = \begin{pmatrix}\sum_j n_j\bar y_j + \sigma^2
        m_0/s_0^2\\ r_2 \end{pmatrix},

    :math:`m_{12} = \sum_j n_j\text{dev}_j`, :math:`m_{22} = \sum_j
    n_j\text{dev}_j^2`, :math:`r_2 = \sum_j n_j\bar y_j \text{dev}_j`. Drawn as
    :math:`\lambda` from its marginal, then :math:`\mu' \mid \lambda`; ``z_lam`` and
    ``z_mu`` are standard normals. Returns ``(mu_new, lam)``.
    """
    if k.mu_prec:
        m11 = d.N + s2 * k.mu_prec
        r1 = d.Y + s2 * k.mu_prec_mean
    else:
        m11, r1 = d.N, d.Y
    # Centred form of the 2x2 solve: s_xx = det(M) / m11 > 0 by Cauchy-Schwarz.
    xbar = m12 / m11
    s_xx = m22 - xbar * m12
    lam = (r2 - xbar * r1) / s_xx + z_lam * np.sqrt(s2 / s_xx)
    mu_new = (r1 - m12 * lam) / m11 + z_mu * np.sqrt(s2 / m11)
    return mu_new, lam


def log_prior_ratio_tau(lam: np.ndarray, t2: np.ndarray, k: _Consts) -> np.ndarray:
    r"""ASIS acceptance: :math:`\log p_\tau(|\lambda|\tau) - \log p_\tau(\tau)`.

    Densities w.r.t. :math:`d\tau`: half-Cauchy :math:`\propto (1 +
    \tau^2/A^2)^{-1}`; inverse gamma on :math:`\tau^2` :math:`\propto
    \tau^{-2\alpha-1}e^{-\beta/\tau^2}`. ``t2`` is :math:`\tau^2`.
    """
    tp2 = lam * lam * t2
    if k.tau_hc:
        return np.log1p(t2 * k.tau_inv_A2) - np.log1p(tp2 * k.tau_inv_A2)
    with np.errstate(divide="ignore"):
        return -k.tau_pow * np.log(np.abs(lam)) - k.tau_beta * (1.0 / tp2 - 1.0 / t2)


def collapsed_log_posterior(
    d: _Data, tau: np.ndarray, sigma: np.ndarray, k: _Consts, vary: str = "both"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Log of :math:`p(\tau, \sigma \mid y)` up to a constant, with :math:`\mu, \theta` integrated.

    With :math:`V_k = \tau^2 + \sigma^2/n_k` for each distinct group size
    :math:`n_k` (``cnt_k`` groups) and centred means :math:`c_j = \bar y_j - y_0`,

    .. math::

        \log p = \log p_\tau(\tau) + \log p_\sigma(\sigma) - (N - J)\log\sigma
        - \frac{SSW}{2\sigma^2} - \tfrac12\Big(\sum_k \text{cnt}_k\log V_k + \log P
        + \sum_j \frac{c_j^2}{V_j} + \pi_0 c_0^2 - \frac{m^2}{P}\Big),

    :math:`P = \sum_j 1/V_j + \pi_0`, :math:`m = \sum_j c_j/V_j + \pi_0 c_0`,
    :math:`\pi_0 = 1/s_0^2` (0 for the flat prior), :math:`c_0 = m_0 - y_0`; prior
    densities are w.r.t. :math:`d\tau, d\sigma`. The :math:`\sigma` terms are
    dropped when :math:`\sigma` is fixed, and so are the terms in the argument
    that is held constant when ``vary`` is ``"tau"`` or ``"sigma"`` (the slice
    sampler needs the density only up to a constant). ``tau`` and ``sigma``
    broadcast to a shape ``(..., C)``; returns ``(log_density, P, m)`` of that
    shape, and then :math:`\mu \mid \tau, \sigma, y \sim \mathcal N(y_0 + m/P,
    1/P)`. Valid for positive arguments only (the slice sampler treats others as
    outside).
    """
    t2 = tau * tau
    s2 = sigma * sigma
    V = s2[..., None] * d.inv_ks + t2[..., None]
    w = 1.0 / V
    if d.B == 1:
        sums = w @ d.tab
        slog = np.log(V) @ d.cnt[0]
    else:
        sums = np.stack([np.einsum("...ck,ck->...c", w, t) for t in (d.cnt, d.s1, d.s2)], axis=-1)
        slog = np.einsum("...ck,ck->...c", np.log(V), d.cnt)
    P, m, q = sums[..., 0], sums[..., 1], sums[..., 2]
    if k.mu_prec:
        P = P + k.mu_prec
        m = m + k.mu_prec * d.c0
        q = q + k.mu_prec * d.c0 * d.c0
    f = -0.5 * (slog + np.log(P) + q - m * (m / P))
    if vary != "sigma":
        if k.tau_hc:
            f = f - np.log1p(t2 * k.tau_inv_A2)
        else:
            f = f - k.tau_pow * np.log(tau) - k.tau_beta / t2
    if k.sigma_free and vary != "tau":
        f = f - d.dof * np.log(sigma) - (0.5 * d.ssw) / s2
        if k.sigma_hc:
            f = f - np.log1p(s2 * k.sigma_inv_A2)
        else:
            f = f - k.sigma_pow * np.log(sigma) - k.sigma_beta / s2
    return f, P, m


LogPost = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def slice_update(
    logpost: LogPost,
    x0: np.ndarray,
    width: np.ndarray,
    e: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    shrink: _UniformBuffer,
    n_eval: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""One slice-sampling update of a positive scalar per chain (all chains in lockstep).

    Neal (2003): stepping out (Fig. 3) by at most :data:`_SLICE_M` widths, split
    between the two sides by the uniform ``v``, then shrinkage (Fig. 5). The
    slice is :math:`\{x > 0: \log p(x) > \log p(x_0) - e\}` with ``e`` standard
    exponential; the initial interval is ``[x0 - width*u, x0 - width*u +
    width]``. ``logpost(x)`` maps an array of shape ``(..., C)`` to ``(log p, P,
    m)`` of that shape. Shrinkage uniforms come from ``shrink``, ``C`` a round.
    Adds each chain's density evaluations to ``n_eval`` and returns ``(x_new,
    P, m)`` with ``P, m`` at the new point.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        left = x0 - width * u
        right = left + width
        steps_left = np.floor(_SLICE_M * v)
        steps_right = (_SLICE_M - 1) - steps_left
        # The current point and both initial ends in one evaluation.
        f, _, _ = logpost(np.stack([x0, left, right]))
        level = f[0] - e
        act_l = steps_left > 0
        act_r = steps_right > 0
        n_eval += 1 + act_l + act_r
        act_l &= (f[1] > level) & (left > 0.0)
        act_r &= f[2] > level
        while act_l.any() or act_r.any():
            left = np.where(act_l, left - width, left)
            right = np.where(act_r, right + width, right)
            steps_left = steps_left - act_l
            steps_right = steps_right - act_r
            act_l &= steps_left > 0
            act_r &= steps_right > 0
            if not (act_l.any() or act_r.any()):
                break
            f, _, _ = logpost(np.stack([left, right]))
            n_eval += act_l
            n_eval += act_r
            act_l &= (f[0] > level) & (left > 0.0)
            act_r &= f[1] > level
        new = x0.copy()
        P_new = np.empty_like(x0)
        m_new = np.empty_like(x0)
        active = np.ones(x0.shape, dtype=bool)
        rounds = 0
        while active.any():
            if rounds >= _SLICE_MAX_ROUNDS:
                raise RuntimeError(
                    "gibbs_two_level: slice sampler did not terminate (non-finite log density?)"
                )
            x = left + shrink.take() * (right - left)
            f, P, m = logpost(x)
            n_eval += active
            rounds += 1
            ok = active & (f > level) & (x > 0.0)
            new = np.where(ok, x, new)
            P_new = np.where(ok, P, P_new)
            m_new = np.where(ok, m, m_new)
            active &= ~ok
            lower = active & (x < x0)
            left = np.where(lower, x, left)
            right = np.where(active & ~lower, x, right)
    return new, P_new, m_new


def _softplus(x: np.ndarray) -> np.ndarray:
    """``log(1 + exp(x))`` without overflow."""
    return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


def multi_proposal_update(
    d: _Data,
    k: _Consts,
    tau: np.ndarray,
    sigma: np.ndarray,
    loc: np.ndarray,
    chol: np.ndarray,
    zp: np.ndarray,
    gp: np.ndarray,
    u: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r"""One multiple-proposal independence update of :math:`(\tau, \sigma)`, all chains.

    Tjelmeland (2004): with the current point :math:`x_0` and :math:`M` proposals
    :math:`x_1..x_M` drawn independently from a fixed density :math:`q`, the next
    state is :math:`x_i` with probability proportional to :math:`\pi(x_i)/q(x_i)`.
    This is a Gibbs step on the space of :math:`M + 1` points with a uniformly
    placed current point, so it leaves :math:`\pi` invariant for any :math:`q`;
    when :math:`q \approx \pi` the draws are nearly independent.

    Coordinates: with :math:`a = \tau^2`, :math:`b = \sigma^2/\bar n` (:math:`\bar n`
    the harmonic mean group size), :math:`x = (\log(a + b), \log(a/b))`: the log
    variance of a typical group mean and the log ratio of its two parts. When
    groups are informative these are nearly linear in :math:`(\log\tau,
    \log\sigma)`; when they are not (e.g. one observation a group, where only
    :math:`\tau^2 + \sigma^2` is identified) the posterior, an L-shaped ridge in
    :math:`(\log\tau, \log\sigma)`, becomes nearly a product. The Jacobian
    :math:`|\partial(\log\tau, \log\sigma)/\partial x| = 1/4` is constant, so
    :math:`\pi(x) \propto p(\tau, \sigma \mid y)\,\tau\sigma`. With sigma fixed,
    :math:`x = \log\tau`.

    :math:`q` is a multivariate :math:`t_\nu` with location ``loc`` (C, 2) and
    scale Cholesky factor ``chol`` (C, 2, 2); its tails are polynomial while
    those of :math:`\pi` are at least exponential, so the weights are bounded
    and the sampler is uniformly ergodic. ``zp`` (M, C, 2) are standard normals,
    ``gp`` (M, C) chi-square(nu) variates, ``u`` (C,) uniforms for the choice.
    Returns ``(tau, sigma, P, m, moved)`` at the chosen points (``moved``: a
    proposal was chosen rather than the current point).
    """
    dim = 2 if k.sigma_free else 1
    scale = np.sqrt(gp / _MP_DF)
    t0 = zp[..., 0] / scale
    t1 = zp[..., 1] / scale
    log_tau = np.log(tau)
    log_sigma = np.log(sigma)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        if k.sigma_free:
            la = 2.0 * log_tau
            lb = 2.0 * log_sigma - d.log_nh
            x0 = np.maximum(la, lb) + np.log1p(np.exp(-np.abs(la - lb)))
            x1 = la - lb
            r0 = (x0 - loc[:, 0]) / chol[:, 0, 0]
            r1 = ((x1 - loc[:, 1]) - chol[:, 1, 0] * r0) / chol[:, 1, 1]
            q0 = r0 * r0 + r1 * r1
            U0 = loc[:, 0] + (chol[:, 0, 0] * t0 + chol[:, 0, 1] * t1)
            U1 = loc[:, 1] + (chol[:, 1, 0] * t0 + chol[:, 1, 1] * t1)
            LA = U0 - _softplus(-U1)
            LB = U0 - _softplus(U1)
            tau_p = np.exp(0.5 * LA)
            sigma_p = np.exp(0.5 * (LB + d.log_nh))
            jac = np.concatenate([(log_tau + log_sigma)[None], 0.5 * LA + 0.5 * (LB + d.log_nh)])
            q2 = np.concatenate([q0[None], t0 * t0 + t1 * t1])
            S = np.concatenate([sigma[None], sigma_p])
        else:
            r0 = (log_tau - loc[:, 0]) / chol[:, 0, 0]
            U0 = loc[:, 0] + (chol[:, 0, 0] * t0 + chol[:, 0, 1] * t1)
            tau_p = np.exp(U0)
            sigma_p = None
            jac = np.concatenate([log_tau[None], U0])
            q2 = np.concatenate([(r0 * r0)[None], t0 * t0])
            S = np.broadcast_to(sigma, q2.shape)
        T = np.concatenate([tau[None], tau_p])
        f, P, m = collapsed_log_posterior(d, T, S, k)
        logw = f + jac + 0.5 * (_MP_DF + dim) * np.log1p(q2 / _MP_DF)
        logw = np.where(logw == logw, logw, -np.inf)  # NaN (overflow) has weight 0
        cw = np.cumsum(np.exp(logw - logw.max(axis=0)), axis=0)
    idx = (cw < u * cw[-1]).sum(axis=0)
    cols = np.arange(idx.size)
    moved = idx > 0
    tau_new = np.where(moved, T[idx, cols], tau)
    sigma_new = np.where(moved, S[idx, cols], sigma) if k.sigma_free else sigma
    return tau_new, sigma_new, P[idx, cols], m[idx, cols], moved


def _fit_proposal(
    trace: np.ndarray, sigma_free: bool, log_nh: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Location (C, 2) and Cholesky factor (C, 2, 2) of the t proposal from warm-up draws.

    ``trace`` holds (tau^2, sigma^2) draws, shape (W, 2, C); they are mapped to
    the coordinates of :func:`multi_proposal_update`. The scale is their
    covariance, each SD floored at :data:`_MP_SD_FLOOR`, inflated by
    :data:`_MP_INFLATE`.
    """
    la = np.log(trace[:, 0])
    if sigma_free:
        lb = np.log(trace[:, 1]) - log_nh
        x = np.stack([np.logaddexp(la, lb), la - lb], axis=1)  # (W, 2, C)
    else:
        x = np.stack([0.5 * la, np.zeros_like(la)], axis=1)
    loc = x.mean(axis=0).T
    dev = x - x.mean(axis=0)
    cov = np.einsum("wic,wjc->cij", dev, dev) / max(x.shape[0] - 1, 1)
    if not sigma_free:
        cov[:, 0, 1] = cov[:, 1, 0] = 0.0
        cov[:, 1, 1] = 1.0
    cov += np.eye(2) * _MP_SD_FLOOR**2
    return np.ascontiguousarray(loc), np.ascontiguousarray(np.linalg.cholesky(cov) * _MP_INFLATE)


# --------------------------------------------------------------------------- numpy back end


@dataclass
class _State:
    """Chain state, slice widths, outputs and counters shared by the back ends."""

    mu: np.ndarray  # (C,)
    t2: np.ndarray  # (C,) tau^2
    s2: np.ndarray  # (C,) sigma^2
    width: np.ndarray  # (2, C) slice widths for tau, sigma
    o_mu: np.ndarray  # (C, D)
    o_t2: np.ndarray  # (C, D)
    o_s2: np.ndarray  # (C, D)
    o_theta: np.ndarray  # (C, D, J)
    trace: np.ndarray  # (warmup, 2, C) tau^2, sigma^2 during warm-up
    n_acc: np.ndarray  # (C,) ASIS acceptances over kept draws
    n_eval: np.ndarray  # (C,) collapsed log-density evaluations
    prop_loc: np.ndarray  # (C, 2) multiple-proposal location (log tau, log sigma)
    prop_chol: np.ndarray  # (C, 2, 2) and scale Cholesky factor
    multi: bool = False  # multiple-proposal updates (True once a proposal is fitted)
    n_moved: np.ndarray | None = None  # (C,) kept iterations where (tau, sigma) moved


def _numpy_iterations(
    d: _Data,
    k: _Consts,
    st: _State,
    v: dict[str, np.ndarray],
    b0: int,
    K: int,
    it0: int,
    i_first: int,
    warmup: int,
    thin: int,
    shrink: _UniformBuffer,
) -> int:
    """Run iterations ``b0..K-1`` of a block (global index ``it0 + b``); return ``K``.

    ``i_first`` is the index of the first kept draw at or after ``it0`` (the
    collapsed scheme's theta normals are drawn for kept iterations only).
    """
    J = d.J
    mu, t2, s2 = st.mu, st.t2, st.s2
    z_theta, g_sigma, g_tau = v["z_theta"], v["g_sigma"], v["g_tau"]
    z, e, u = v["z"], v["e"], v["u"]
    for b in range(b0, K):
        it = it0 + b
        rec = it - warmup
        keep = rec >= 0 and rec % thin == 0
        lam = None
        dev = None
        theta = None
        if k.scheme == 2 and st.multi:
            tau, sigma, P, m, moved = multi_proposal_update(
                d, k, np.sqrt(t2), np.sqrt(s2), st.prop_loc, st.prop_chol, v["zp"][b],
                v["gp"][b], u[b, :, 4],
            )  # fmt: skip
            st.n_eval += _MP_M + 1
            if keep:
                st.n_moved += moved
            t2 = np.where(moved, tau * tau, t2)
            s2 = np.where(moved, sigma * sigma, s2)
            if keep:
                mu = d.y0 + m / P + z[b, :, 0] / np.sqrt(P)
                theta = draw_theta(d, mu, t2, s2, z_theta[rec // thin - i_first])
        elif k.scheme == 2:
            if shrink.low():
                shrink.refill()
            sigma = np.sqrt(s2)
            tau, P, m = slice_update(
                lambda x, sigma=sigma: collapsed_log_posterior(d, x, sigma, k, "tau"),
                np.sqrt(t2), st.width[0], e[b, :, 0], u[b, :, 0], u[b, :, 1], shrink, st.n_eval,
            )  # fmt: skip
            if k.sigma_free:
                sigma, P, m = slice_update(
                    lambda x, tau=tau: collapsed_log_posterior(d, tau, x, k, "sigma"),
                    sigma, st.width[1], e[b, :, 1], u[b, :, 2], u[b, :, 3], shrink, st.n_eval,
                )  # fmt: skip
            t2 = tau * tau
            s2 = sigma * sigma
            if keep:
                mu = d.y0 + m / P + z[b, :, 0] / np.sqrt(P)
                theta = draw_theta(d, mu, t2, s2, z_theta[rec // thin - i_first])
        else:
            theta = draw_theta(d, mu, t2, s2, z_theta[b])
            if k.sigma_free:
                s2 = draw_sigma2(d, theta, s2, g_sigma[b], e[b, :, 1], k)
            mu = draw_mu_centred(theta.sum(axis=1), J, t2, z[b, :, 0], k)
            dev = theta - mu[:, None]
            s_theta, m22 = d.sum_and_ndot(dev * dev)
            t2 = draw_tau2_centred(s_theta, t2, g_tau[b], e[b, :, 0], k)
            if k.scheme == 1:
                m12, r2 = d.ndot_and_nybardot(dev)
                mu_p, lam = ancillary_proposal(d, m12, m22, r2, s2, z[b, :, 1], z[b, :, 2], k)
                acc = np.log(u[b, :, 0]) < log_prior_ratio_tau(lam, t2, k)
                mu = np.where(acc, mu_p, mu)
                lam = np.where(acc, lam, 1.0)
                t2 = lam * lam * t2
        if it < warmup:
            st.trace[it, 0] = t2
            st.trace[it, 1] = s2
        if keep:
            i = rec // thin
            st.o_mu[:, i] = mu
            st.o_t2[:, i] = t2
            st.o_s2[:, i] = s2
            if lam is None:
                st.o_theta[:, i, :] = theta
            else:
                st.o_theta[:, i, :] = mu[:, None] + lam[:, None] * dev
                st.n_acc += acc
    st.mu, st.t2, st.s2 = mu, t2, s2
    return K


def _block_iterations(C: int, J: int) -> int:
    return int(max(1, min(_MAX_BLOCK_ITERATIONS, _BLOCK_ELEMENTS // (C * J))))


# --------------------------------------------------------------------------- numba back end


def numba_available() -> bool:
    """Whether the optional ``numba`` back end can be used."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


_NUMBA_KERNEL = None


def _numba_kernel() -> Callable[..., int]:  # pragma: no cover - needs numba
    """Compile (once per process) the numba kernel for a block of iterations.

    It runs the same updates as :func:`_numpy_iterations` on the same
    pre-drawn variates, one chain at a time except for the slice sampler's
    shrinkage rounds, which run in lockstep over chains so that the buffered
    uniforms are read in the same order as in numpy.
    """
    global _NUMBA_KERNEL
    if _NUMBA_KERNEL is not None:
        return _NUMBA_KERNEL
    try:
        import numba
    except ImportError:
        raise ConfigError(
            "gibbs_two_level: backend 'numba' needs the numba package; "
            "install it or use backend='numpy'"
        ) from None

    # error_model="numpy": float division by zero gives inf/nan as in numpy
    # instead of raising, so both back ends treat overflow the same way.
    njit = numba.njit(cache=False, fastmath=False, nogil=True, error_model="numpy")

    @njit
    def logpost(inv_ks, cnt, s1, s2tab, dc, c, tau, sigma, c0, dof, ssw, kc, which):
        # Same formula as collapsed_log_posterior for chain c (which: 0 = terms in
        # tau, 1 = terms in sigma, 2 = all); zero density off (0, inf).
        if not (tau > 0.0 and sigma > 0.0):
            return -math.inf, 1.0, 0.0
        tau_hc, t_ia2, t_beta, t_pow = kc[0], kc[1], kc[2], kc[3]
        sig_free, sig_hc, s_ia2, s_beta = kc[4], kc[5], kc[6], kc[7]
        mu_prec, s_pow = kc[8], kc[11]
        t2 = tau * tau
        s2 = sigma * sigma
        sw = 0.0
        s1w = 0.0
        s2w = 0.0
        slog = 0.0
        for q in range(inv_ks.shape[1]):
            V = s2 * inv_ks[dc, q] + t2
            w = 1.0 / V
            sw += w * cnt[dc, q]
            s1w += w * s1[dc, q]
            s2w += w * s2tab[dc, q]
            slog += math.log(V) * cnt[dc, q]
        P = sw
        m = s1w
        qq = s2w
        if mu_prec != 0.0:
            P = P + mu_prec
            m = m + mu_prec * c0[c]
            qq = qq + mu_prec * c0[c] * c0[c]
        f = -0.5 * (slog + math.log(P) + qq - m * (m / P))
        if which != 1:
            if tau_hc > 0.5:
                f = f - math.log1p(t2 * t_ia2)
            else:
                f = f - t_pow * math.log(tau) - t_beta / t2
        if sig_free > 0.5 and which != 0:
            f = f - dof[c] * math.log(sigma) - (0.5 * ssw[c]) / s2
            if sig_hc > 0.5:
                f = f - math.log1p(s2 * s_ia2)
            else:
                f = f - s_pow * math.log(sigma) - s_beta / s2
        return f, P, m

    @njit
    def slice_all(
        which,
        B,
        x_tau,
        x_sig,
        width,
        e,
        u,
        v,
        ubuf,
        pos,
        max_rounds,
        slice_m,
        inv_ks,
        cnt,
        s1,
        s2tab,
        c0,
        dof,
        ssw,
        kc,
        left,
        right,
        level,
        newx,
        newP,
        newm,
        active,
        n_eval,
    ):
        # Slice update of tau (which == 0, sigma held at x_sig) or sigma (which == 1).
        C = x_tau.shape[0]
        for c in range(C):
            dc = c if B > 1 else 0
            x0 = x_tau[c] if which == 0 else x_sig[c]
            tau = x_tau[c]
            sig = x_sig[c]
            f0, _, _ = logpost(inv_ks, cnt, s1, s2tab, dc, c, tau, sig, c0, dof, ssw, kc, which)
            n_eval[c] += 1.0
            level[c] = f0 - e[c]
            lo = x0 - width[c] * u[c]
            hi = lo + width[c]
            nl = math.floor(slice_m * v[c])
            nr = (slice_m - 1) - nl
            while nl > 0:
                if which == 0:
                    tau = lo
                else:
                    sig = lo
                f, _, _ = logpost(inv_ks, cnt, s1, s2tab, dc, c, tau, sig, c0, dof, ssw, kc, which)
                n_eval[c] += 1.0
                if not f > level[c]:
                    break
                lo = lo - width[c]
                nl -= 1
            while nr > 0:
                if which == 0:
                    tau = hi
                else:
                    sig = hi
                f, _, _ = logpost(inv_ks, cnt, s1, s2tab, dc, c, tau, sig, c0, dof, ssw, kc, which)
                n_eval[c] += 1.0
                if not f > level[c]:
                    break
                hi = hi + width[c]
                nr -= 1
            left[c] = lo
            right[c] = hi
            active[c] = True
        n_active = C
        rounds = 0
        while n_active > 0:
            if rounds >= max_rounds or pos + C > ubuf.shape[0]:
                return -1
            for c in range(C):
                if not active[c]:
                    continue
                dc = c if B > 1 else 0
                x = left[c] + ubuf[pos + c] * (right[c] - left[c])
                tau = x if which == 0 else x_tau[c]
                sig = x if which == 1 else x_sig[c]
                f, P, m = logpost(inv_ks, cnt, s1, s2tab, dc, c, tau, sig, c0, dof, ssw, kc, which)
                n_eval[c] += 1.0
                if f > level[c]:
                    newx[c] = x
                    newP[c] = P
                    newm[c] = m
                    active[c] = False
                    n_active -= 1
                elif x < (x_tau[c] if which == 0 else x_sig[c]):
                    left[c] = x
                else:
                    right[c] = x
            pos += C
            rounds += 1
        return pos

    @njit
    def softplus(x):
        return max(x, 0.0) + math.log1p(math.exp(-abs(x)))

    @njit
    def multi_all(
        B, x_tau, x_sig, loc, chol, zp, gp, u, M, df, inv_ks, cnt, s1, s2tab, c0, dof, ssw, kc,
        log_nh, newx, newy, newP, newm, moved,
    ):  # fmt: skip
        # Same as multi_proposal_update, chain by chain.
        sig_free = kc[4] > 0.5
        dim = 2.0 if sig_free else 1.0
        C = x_tau.shape[0]
        lw = np.empty(M + 1)
        ts = np.empty(M + 1)
        ss = np.empty(M + 1)
        Ps = np.empty(M + 1)
        ms = np.empty(M + 1)
        for c in range(C):
            dc = c if B > 1 else 0
            lt = math.log(x_tau[c])
            ls = math.log(x_sig[c])
            for i in range(M + 1):
                if i == 0:
                    tau = x_tau[c]
                    sig = x_sig[c]
                    jac = lt + ls if sig_free else lt
                    if sig_free:
                        la = 2.0 * lt
                        lb = 2.0 * ls - log_nh[c]
                        y0 = max(la, lb) + math.log1p(math.exp(-abs(la - lb)))
                        y1 = la - lb
                        r0 = (y0 - loc[c, 0]) / chol[c, 0, 0]
                        r1 = ((y1 - loc[c, 1]) - chol[c, 1, 0] * r0) / chol[c, 1, 1]
                        qq = r0 * r0 + r1 * r1
                    else:
                        r0 = (lt - loc[c, 0]) / chol[c, 0, 0]
                        qq = r0 * r0
                else:
                    sc = math.sqrt(gp[i - 1, c] / df)
                    t0 = zp[i - 1, c, 0] / sc
                    t1 = zp[i - 1, c, 1] / sc
                    y0 = loc[c, 0] + (chol[c, 0, 0] * t0 + chol[c, 0, 1] * t1)
                    if sig_free:
                        y1 = loc[c, 1] + (chol[c, 1, 0] * t0 + chol[c, 1, 1] * t1)
                        la = y0 - softplus(-y1)
                        lb = y0 - softplus(y1)
                        tau = math.exp(0.5 * la)
                        sig = math.exp(0.5 * (lb + log_nh[c]))
                        jac = 0.5 * la + 0.5 * (lb + log_nh[c])
                        qq = t0 * t0 + t1 * t1
                    else:
                        tau = math.exp(y0)
                        sig = x_sig[c]
                        jac = y0
                        qq = t0 * t0
                f, P, m = logpost(inv_ks, cnt, s1, s2tab, dc, c, tau, sig, c0, dof, ssw, kc, 2)
                w = f + jac + 0.5 * (df + dim) * math.log1p(qq / df)
                if w != w:
                    w = -math.inf
                lw[i] = w
                ts[i] = tau
                ss[i] = sig
                Ps[i] = P
                ms[i] = m
            mx = lw[0]
            for i in range(1, M + 1):
                if lw[i] > mx:
                    mx = lw[i]
            total = 0.0
            for i in range(M + 1):
                total += math.exp(lw[i] - mx)
                lw[i] = total  # cumulative sums, as numpy.cumsum
            target = u[c] * total
            idx = 0
            for i in range(M + 1):
                if lw[i] < target:
                    idx += 1
            moved[c] = idx > 0
            newx[c] = ts[idx]
            newy[c] = ss[idx] if sig_free else x_sig[c]
            newP[c] = Ps[idx]
            newm[c] = ms[idx]

    @njit
    def kernel(
        n,
        ybar,
        nybar,
        N,
        Y,
        ssw,
        y0,
        c0,
        dof,
        inv_ks,
        cnt,
        s1,
        s2tab,
        kc,
        b0,
        K,
        it0,
        i_first,
        warmup,
        thin,
        mu,
        t2,
        s2,
        width,
        z_theta,
        z,
        g_tau,
        g_sigma,
        e,
        u,
        ubuf,
        upos,
        reserve,
        theta,
        dev,
        x_tau,
        x_sig,
        left,
        right,
        level,
        newx,
        newP,
        newm,
        active,
        o_mu,
        o_t2,
        o_s2,
        o_theta,
        trace,
        n_acc,
        n_eval,
        slice_m,
        max_rounds,
        multi,
        loc,
        chol,
        zp,
        gp,
        n_prop,
        df,
        newy,
        moved,
        n_moved,
        log_nh,
    ):
        tau_hc, t_ia2, t_beta, t_pow = kc[0], kc[1], kc[2], kc[3]
        sig_free, sig_hc, s_ia2, s_beta = kc[4], kc[5], kc[6], kc[7]
        mu_prec, mu_pm, scheme = kc[8], kc[9], int(kc[10])
        C = mu.shape[0]
        J = n.shape[1]
        B = n.shape[0]
        pos = upos[0]
        for b in range(b0, K):
            it = it0 + b
            rec = it - warmup
            keep = rec >= 0 and rec % thin == 0
            i = rec // thin if rec >= 0 else 0
            if scheme == 2:
                if multi:
                    for c in range(C):
                        x_tau[c] = math.sqrt(t2[c])
                        x_sig[c] = math.sqrt(s2[c])
                    # fmt: off
                    multi_all(
                        B, x_tau, x_sig, loc, chol, zp[b], gp[b], u[b, :, 4], n_prop, df,
                        inv_ks, cnt, s1, s2tab, c0, dof, ssw, kc, log_nh, newx, newy, newP,
                        newm, moved,
                    )
                    # fmt: on
                    for c in range(C):
                        n_eval[c] += n_prop + 1.0
                        if moved[c]:
                            x_tau[c] = newx[c]
                            x_sig[c] = newy[c]
                            if keep:
                                n_moved[c] += 1.0
                else:
                    if ubuf.shape[0] - pos < reserve:
                        upos[0] = pos
                        return b
                    for c in range(C):
                        x_tau[c] = math.sqrt(t2[c])
                        x_sig[c] = math.sqrt(s2[c])
                    pos = slice_all(
                        0,
                        B,
                        x_tau,
                        x_sig,
                        width[0],
                        e[b, :, 0],
                        u[b, :, 0],
                        u[b, :, 1],
                        ubuf,
                        pos,
                        max_rounds,
                        slice_m,
                        inv_ks,
                        cnt,
                        s1,
                        s2tab,
                        c0,
                        dof,
                        ssw,
                        kc,
                        left,
                        right,
                        level,
                        newx,
                        newP,
                        newm,
                        active,
                        n_eval,
                    )
                    if pos < 0:
                        return -1 - b
                    for c in range(C):
                        x_tau[c] = newx[c]
                    if sig_free > 0.5:
                        pos = slice_all(
                            1,
                            B,
                            x_tau,
                            x_sig,
                            width[1],
                            e[b, :, 1],
                            u[b, :, 2],
                            u[b, :, 3],
                            ubuf,
                            pos,
                            max_rounds,
                            slice_m,
                            inv_ks,
                            cnt,
                            s1,
                            s2tab,
                            c0,
                            dof,
                            ssw,
                            kc,
                            left,
                            right,
                            level,
                            newx,
                            newP,
                            newm,
                            active,
                            n_eval,
                        )
                        if pos < 0:
                            return -1 - b
                        for c in range(C):
                            x_sig[c] = newx[c]
                for c in range(C):
                    dc = c if B > 1 else 0
                    if multi and not moved[c]:
                        tt = t2[c]
                        ss = s2[c]
                    else:
                        tt = x_tau[c] * x_tau[c]
                        ss = x_sig[c] * x_sig[c]
                    t2[c] = tt
                    s2[c] = ss
                    if it < warmup:
                        trace[it, 0, c] = tt
                        trace[it, 1, c] = ss
                    if keep:
                        P = newP[c]
                        m = y0[c] + newm[c] / P + z[b, c, 0] / math.sqrt(P)
                        mu[c] = m
                        inv_s2 = 1.0 / ss
                        inv_t2 = 1.0 / tt
                        mt = m * inv_t2
                        il = i - i_first
                        for j in range(J):
                            vj = 1.0 / (n[dc, j] * inv_s2 + inv_t2)
                            zj = z_theta[il, c, j]
                            o_theta[c, i, j] = vj * (nybar[dc, j] * inv_s2 + mt) + zj * math.sqrt(
                                vj
                            )
                        o_mu[c, i] = m
                        o_t2[c, i] = tt
                        o_s2[c, i] = ss
                continue
            for c in range(C):
                dc = c if B > 1 else 0
                inv_s2 = 1.0 / s2[c]
                inv_t2 = 1.0 / t2[c]
                mt = mu[c] * inv_t2
                sw = 0.0
                tsum = 0.0
                for j in range(J):
                    vj = 1.0 / (n[dc, j] * inv_s2 + inv_t2)
                    th = vj * (nybar[dc, j] * inv_s2 + mt) + z_theta[b, c, j] * math.sqrt(vj)
                    theta[c, j] = th
                    r = ybar[dc, j] - th
                    sw += n[dc, j] * (r * r)
                    tsum += th
                if sig_free > 0.5:
                    if sig_hc > 0.5:
                        extra = e[b, c, 1] / (inv_s2 + s_ia2)
                    else:
                        extra = s_beta
                    s2[c] = (0.5 * (ssw[c] + sw) + extra) / g_sigma[b, c]
                # centred mu | theta, tau
                if mu_prec != 0.0:
                    prec = J * inv_t2 + mu_prec
                    m = (tsum * inv_t2 + mu_pm) / prec + z[b, c, 0] / math.sqrt(prec)
                else:
                    m = tsum / J + z[b, c, 0] * math.sqrt(t2[c] / J)
                # centred tau^2 | theta, mu
                st = 0.0
                for j in range(J):
                    dv = theta[c, j] - m
                    dev[c, j] = dv
                    st += dv * dv
                if tau_hc > 0.5:
                    extra = e[b, c, 0] / (inv_t2 + t_ia2)
                else:
                    extra = t_beta
                tt = (0.5 * st + extra) / g_tau[b, c]
                lam = 1.0
                if scheme == 1:
                    # ancillary (non-centred) step
                    m12 = 0.0
                    m22 = 0.0
                    r2 = 0.0
                    for j in range(J):
                        nd = n[dc, j] * dev[c, j]
                        m12 += nd
                        m22 += nd * dev[c, j]
                        r2 += nybar[dc, j] * dev[c, j]
                    ss = s2[c]
                    m11 = N[c] + ss * mu_prec
                    r1 = Y[c] + ss * mu_pm
                    xbar = m12 / m11
                    s_xx = m22 - xbar * m12
                    lp = (r2 - xbar * r1) / s_xx + z[b, c, 1] * math.sqrt(ss / s_xx)
                    mp = (r1 - m12 * lp) / m11 + z[b, c, 2] * math.sqrt(ss / m11)
                    tp2 = lp * lp * tt
                    if tau_hc > 0.5:
                        logr = math.log1p(tt * t_ia2) - math.log1p(tp2 * t_ia2)
                    elif lp != 0.0:
                        logr = -t_pow * math.log(abs(lp)) - t_beta * (1.0 / tp2 - 1.0 / tt)
                    else:
                        logr = -math.inf
                    if math.log(u[b, c, 0]) < logr:
                        m = mp
                        tt = tp2
                        lam = lp
                        if keep:
                            n_acc[c] += 1.0
                mu[c] = m
                t2[c] = tt
                if it < warmup:
                    trace[it, 0, c] = tt
                    trace[it, 1, c] = s2[c]
                if keep:
                    o_mu[c, i] = m
                    o_t2[c, i] = tt
                    o_s2[c, i] = s2[c]
                    for j in range(J):
                        o_theta[c, i, j] = m + lam * dev[c, j]
        upos[0] = pos
        return K

    _NUMBA_KERNEL = kernel
    return kernel


def _numba_iterations(
    d: _Data,
    k: _Consts,
    st: _State,
    v: dict[str, np.ndarray],
    b0: int,
    K: int,
    it0: int,
    i_first: int,
    warmup: int,
    thin: int,
    shrink: _UniformBuffer,
) -> int:
    """Numba counterpart of :func:`_numpy_iterations`; may stop early to refill uniforms."""
    kernel = _numba_kernel()
    C, J = st.mu.shape[0], d.J
    work = [np.empty((C, J)), np.empty((C, J))] + [np.empty(C) for _ in range(8)]
    active = np.zeros(C, dtype=np.bool_)
    upos = np.array([shrink.pos], dtype=np.int64)
    ret = kernel(
        d.n, d.ybar, d.nybar, d.N, d.Y, d.ssw, d.y0, d.c0, d.dof, d.inv_ks, d.cnt, d.s1,
        d.s2, k.kernel_array(), b0, K, it0, i_first, warmup, thin, st.mu, st.t2, st.s2,
        st.width, v["z_theta"], v["z"], v["g_tau"], v["g_sigma"], v["e"], v["u"],
        shrink.buf, upos, shrink.reserve, *work, active, st.o_mu, st.o_t2, st.o_s2,
        st.o_theta, st.trace, st.n_acc, st.n_eval, float(_SLICE_M), _SLICE_MAX_ROUNDS,
        st.multi, st.prop_loc, st.prop_chol, v["zp"], v["gp"], _MP_M, _MP_DF, np.empty(C),
        np.zeros(C, dtype=np.bool_), st.n_moved, d.log_nh,
    )  # fmt: skip
    shrink.pos = int(upos[0])
    if ret < 0:
        raise RuntimeError(
            "gibbs_two_level: slice sampler did not terminate (non-finite log density?)"
        )
    if ret < K:
        shrink.refill()
    return int(ret)


# --------------------------------------------------------------------------- driver


def _adapt_points(warmup: int) -> list[int]:
    """Warm-up iterations at which the collapsed scheme adapts: 25, 50, 100, ..., warmup."""
    pts = []
    p = _ADAPT_FIRST
    while p < warmup:
        pts.append(p)
        p *= 2
    if warmup >= _ADAPT_FIRST:
        pts.append(warmup)
    return pts


def _kept_range(it0: int, K: int, warmup: int, thin: int) -> tuple[int, int]:
    """Index of the first kept draw at or after iteration ``it0`` and how many in ``K``."""
    first = max(0, -(-(it0 - warmup) // thin))
    last = (it0 + K - 1 - warmup) // thin  # floor; negative if none kept
    return first, max(0, last - first + 1)


def _gibbs_core(
    n: np.ndarray,
    ybar: np.ndarray,
    ssw: np.ndarray,
    priors: Priors,
    settings: GibbsSettings,
    rng: np.random.Generator,
) -> TwoLevelDraws:
    """Run the sampler on data with a leading axis of length 1 or ``chains``.

    With ``n``, ``ybar`` of shape ``(C, J)`` and ``ssw`` of shape ``(C,)``, chain
    ``c`` samples the posterior of data set ``c``: independent replications
    (e.g. simulation-based calibration) advance together in one vectorised run.
    The data are trusted (validated by the public entry point or the caller).
    """
    _validate_config(priors, settings)
    C = int(settings.chains)
    d = _Data(np.atleast_2d(n), np.atleast_2d(ybar), ssw, C)
    if d.B not in (1, C):
        raise ConfigError("gibbs_two_level: the data axis must have length 1 or chains")
    if isinstance(priors.b_Intercept, Normal):
        d.c0 = priors.b_Intercept.mean - d.y0
    k = _consts(priors, settings)
    g_init, g_var = rng.spawn(2)
    mu, t2, s2, widths = _initial_values(d, C, settings.sigma_fixed, g_init)
    shape_tau, shape_sigma = _gamma_shapes(d, priors, settings, C)
    var = _Variates(g_var, C, d.J, shape_tau, shape_sigma, k.scheme)
    warmup, thin, D = settings.warmup, settings.thin, settings.draws
    total = warmup + D * thin
    st = _State(
        mu=mu,
        t2=t2,
        s2=s2,
        width=widths,
        o_mu=np.empty((C, D)),
        o_t2=np.empty((C, D)),
        o_s2=np.empty((C, D)),
        o_theta=np.empty((C, D, d.J)),
        trace=np.empty((warmup, 2, C)),
        n_acc=np.zeros(C),
        n_eval=np.zeros(C),
        prop_loc=np.zeros((C, 2)),
        prop_chol=np.tile(np.eye(2), (C, 1, 1)),
        n_moved=np.zeros(C),
    )
    run = _numba_iterations if settings.backend == "numba" else _numpy_iterations
    adapt = _adapt_points(warmup) if k.scheme == 2 else []
    K_max = _block_iterations(C, d.J)
    it = 0
    prev = 0
    for stop in sorted({*adapt, total}):
        while it < stop:
            K = min(K_max, stop - it)
            i_first, n_rec = _kept_range(it, K, warmup, thin)
            v = var.block(K, n_rec)
            b = 0
            while b < K:
                b = run(d, k, st, v, b, K, it, i_first, warmup, thin, var.shrink)
            it += K
        if stop in adapt:
            sd = np.sqrt(st.trace[prev:stop]).std(axis=0)
            ok = np.isfinite(sd) & (sd > 0)
            st.width = np.where(ok, _SLICE_WIDTH_FACTOR * sd, st.width)
            prev = stop
            if stop >= _MP_START:
                st.prop_loc, st.prop_chol = _fit_proposal(
                    st.trace[stop // 2 : stop], k.sigma_free, d.log_nh
                )
                st.multi = True
    stats: dict[str, Any] = {"scheme": settings.scheme}
    if k.scheme == 2:
        stats["update"] = "multiple-proposal" if st.multi else "slice"
        if st.multi:
            stats["proposal_moved_rate"] = [float(a) for a in st.n_moved / D]
        stats["log_density_evaluations_per_iteration"] = float(st.n_eval.sum() / (C * total))
    if k.scheme == 1:
        stats["ancillary_accept_rate"] = [float(a) for a in st.n_acc / D]
    return TwoLevelDraws(
        b_Intercept=st.o_mu,
        sd=np.sqrt(st.o_t2),
        sigma=np.sqrt(st.o_s2),
        theta=st.o_theta,
        settings=settings,
        priors=priors,
        stats=stats,
    )


def gibbs_two_level_batch(
    n: Any,
    ybar: Any,
    ssw: Any,
    priors: Priors,
    settings: GibbsSettings,
    rng: np.random.Generator,
) -> TwoLevelDraws:
    r"""Sample many two-level data sets at once, one a chain, from sufficient statistics.

    The model and schemes are those of :func:`gibbs_two_level`; here the
    statistics carry a leading data axis of length 1 (every chain samples the
    same posterior, as :func:`gibbs_two_level`) or ``settings.chains`` (chain
    :math:`c` samples the posterior of data set :math:`c`). Independent
    replications, e.g. of simulation-based calibration
    (:mod:`hierpipe.sbc.two_level`), then advance together in one vectorised run.

    Parameters
    ----------
    n : array ``(B, J)``
        Group sizes :math:`n_{cj}` (positive integers), :math:`J \ge 2`.
    ybar : array ``(B, J)``
        Group means :math:`\bar y_{cj}`.
    ssw : array ``(B,)``
        Pooled within-group sums of squares, each :math:`\ge 0`.
    priors, settings : :class:`Priors` and :class:`GibbsSettings`.
    rng : generator; the draws are a pure function of its state and the inputs.

    Returns
    -------
    TwoLevelDraws
        Chain :math:`c`'s draws belong to data set :math:`c` (when ``B > 1``).

    Raises
    ------
    InputError
        Shapes disagree, ``B`` is neither 1 nor ``settings.chains``, or values
        are not finite, sizes not positive integers, or an SSW negative.
    ConfigError
        Bad priors or settings.
    """
    n_f = np.atleast_2d(np.asarray(n, dtype=np.float64))
    y_f = np.atleast_2d(np.asarray(ybar, dtype=np.float64))
    ssw_f = np.asarray(ssw, dtype=np.float64).reshape(-1)
    if n_f.ndim != 2 or n_f.shape != y_f.shape or ssw_f.shape != n_f.shape[:1]:
        raise InputError(
            f"gibbs_two_level_batch: n {n_f.shape}, ybar {y_f.shape} and ssw {ssw_f.shape} "
            "must be (B, J), (B, J) and (B,)"
        )
    if n_f.shape[0] not in (1, settings.chains) or n_f.shape[1] < 2:
        raise InputError(
            f"gibbs_two_level_batch: need B = 1 or {settings.chains} data sets of J >= 2 "
            f"groups, got {n_f.shape}"
        )
    bad_n = ~np.isfinite(n_f) | (n_f < 1) | (n_f != np.round(n_f))
    if bad_n.any() or not np.isfinite(y_f).all() or not (np.isfinite(ssw_f) & (ssw_f >= 0)).all():
        raise InputError(
            "gibbs_two_level_batch: sizes must be positive integers, means finite and "
            "ssw finite and >= 0"
        )
    return _gibbs_core(n_f, y_f, ssw_f, priors, settings, rng)


def gibbs_two_level(
    n: Any,
    ybar: Any,
    ssw: float,
    *,
    priors: Priors,
    rng: np.random.Generator,
    chains: int = 4,
    warmup: int = 1000,
    draws: int = 1000,
    thin: int = 1,
    scheme: Scheme = "collapsed",
    sigma_fixed: float | None = None,
    backend: Backend = "numpy",
) -> TwoLevelDraws:
    r"""Sample the two-level varying-intercept model from sufficient statistics.

    Parameters
    ----------
    n : group sizes :math:`n_j` (positive integers), length :math:`J \ge 2`.
    ybar : group means :math:`\bar y_j`.
    ssw : pooled within-group sum of squares :math:`\sum_{ij}(y_{ij} - \bar y_j)^2`.
    priors : :class:`Priors`; scales are the caller's (data-scaled) choice.
    rng : generator, e.g. ``hierpipe.seeds.derive_rng(seed, study, fit)``; the
        draws are a pure function of its state and the inputs.
    chains, warmup, draws, thin, scheme, sigma_fixed, backend : see
        :class:`GibbsSettings`.

    Returns
    -------
    TwoLevelDraws
        Arrays ``b_Intercept``, ``sd``, ``sigma`` of shape ``(chains, draws)``,
        ``theta`` and ``r`` of shape ``(chains, draws, J)``; ``info()`` gives the
        settings, priors and sampler statistics for ``fit.json``.

    Raises
    ------
    InputError
        Bad sufficient statistics (non-finite, non-integer sizes, < 2 groups).
    ConfigError
        Bad priors or settings, or ``backend='numba'`` without numba.

    Notes
    -----
    One iteration costs :math:`O(J)` per chain (the collapsed scheme's slice
    sampler :math:`O(K)` per density evaluation, :math:`K` distinct group sizes);
    see the module docstring for the conditionals.

    Examples
    --------
    >>> import numpy as np
    >>> fit = gibbs_two_level(
    ...     [50, 50, 50], [70.1, 64.2, 73.0], 14000.0,
    ...     priors=Priors(sd=HalfCauchy(25.0), sigma=HalfCauchy(25.0)),
    ...     rng=np.random.default_rng(1), warmup=200, draws=200,
    ... )
    >>> fit.theta.shape
    (4, 200, 3)
    """
    n_f, y_f, ssw_f = _validate(n, ybar, ssw)
    settings = GibbsSettings(
        chains=chains,
        warmup=warmup,
        draws=draws,
        thin=thin,
        scheme=scheme,
        sigma_fixed=None if sigma_fixed is None else float(sigma_fixed),
        backend=backend,
    )
    return _gibbs_core(n_f[None, :], y_f[None, :], np.array([ssw_f]), priors, settings, rng)
