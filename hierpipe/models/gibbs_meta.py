r"""Gibbs sampler for the random-effects meta-analysis with known sampling variances.

Model (brms names in brackets)
------------------------------
.. math::

    y_j \mid \theta_j \sim N(\theta_j, v_j), \qquad
    \theta_j = \mu + \tau\eta_j, \quad \eta_j \sim N(0, 1), \qquad j = 1..k,

with :math:`v_j = \mathrm{se}_j^2` known, a flat prior on :math:`\mu`
(``b_Intercept``) and one of three priors on :math:`\tau` (``sd_<g>__Intercept``):
``uniform`` on :math:`[0, U]` (:math:`U = \infty` when no bound is given: the flat
prior of BDA3 section 5.4, proper posterior for :math:`k \ge 3`),
``half_cauchy`` :math:`p(\tau) \propto 1/(1 + \tau^2/s^2)` (Gelman 2006) and
``half_normal`` :math:`p(\tau) \propto \exp(-\tau^2/2s^2)`. These are the model and
priors of :mod:`hierpipe.models.meta_bayes`, whose exact posterior is the
reference the sampler is tested against. :math:`\theta_j` is
``coef_<g>[j,Intercept]`` and :math:`\theta_j - \mu` is ``r_<g>[j,Intercept]``.

Scheme: ancillarity-sufficiency interweaving (ASIS; Yu & Meng 2011)
-------------------------------------------------------------------
All chains advance together (chains are the leading array axis); an iteration
costs :math:`O(k)` per chain. With state :math:`(\mu, \tau, \theta)`:

1. **Study effects.** :math:`\theta_j \mid \mu, \tau, y \sim N((1-B_j) y_j + B_j\mu,
   (1-B_j) v_j)`, :math:`B_j = v_j/(v_j + \tau^2)` (BDA3 eq. 5.17).
2. **Centred (sufficient) update.** :math:`\tau \mid \theta, \mu` has density
   :math:`\propto p(\tau)\,\tau^{-k} e^{-S/2\tau^2}`, :math:`S = \sum_j (\theta_j -
   \mu)^2`. Independence Metropolis-Hastings: propose from the flat-prior
   conditional, :math:`\tau'^2 \sim \text{IG}((k-1)/2, S/2)`, and accept with
   probability :math:`\min\{1, p(\tau')/p(\tau)\}` (the likelihood parts cancel
   against the proposal). Then :math:`\mu \mid \theta, \tau \sim N(\bar\theta, \tau^2/k)`.
3. **Non-centred (ancillary) update.** Fix :math:`\eta_j = (\theta_j - \mu)/\tau`;
   then :math:`y_j = \mu + \tau\eta_j + e_j` is a weighted linear regression in
   :math:`(\mu, \tau)`. With a flat prior on :math:`\mu` and on a *signed*
   :math:`\tau`, :math:`\tau` has the Gaussian conditional :math:`N(m_\tau, V_\tau)`
   (:math:`\mu` integrated out); propose from it and accept with probability
   :math:`\min\{1, p(|\tau'|)/p(|\tau|)\}`, draw :math:`\mu \mid \tau, \eta, y` from its
   normal conditional, set :math:`\theta = \mu + \tau\eta` and fold
   :math:`\tau \leftarrow |\tau|` (:math:`\eta \leftarrow -\eta`, so :math:`\theta`
   is unchanged). The fold is valid because the sign-symmetric extension leaves
   the posterior invariant under :math:`(\tau, \eta) \mapsto (-\tau, -\eta)`
   (Frühwirth-Schnatter & Wagner 2010) and the kernel is equivariant under it.

The centred update mixes well when the studies are informative
(:math:`\tau^2 \gg v_j`), the non-centred one when they are not (:math:`\tau` near
0, as for the eight schools, where a centred sampler sticks at small
:math:`\tau`: Gelman et al. 2008); interweaving the two is at least as good as the
better of them (Yu & Meng 2011, theorem 1), whichever regime the data are in.
``scheme="centred"`` and ``"noncentred"`` run steps 1-2 or 1 and 3 alone, for
comparison (tests and ``benchmarks/``).

Every step leaves the posterior invariant, so no step is tuned and warm-up only
forgets the starting values. Random numbers are consumed in a fixed order, so a
generator state gives one answer.

References
----------
Yu, Y. & Meng, X.-L. (2011). To center or not to center: that is not the
question. An ancillarity-sufficiency interweaving strategy (ASIS) for boosting
MCMC efficiency. *J. Comput. Graph. Stat.* 20, 531-570.
Frühwirth-Schnatter, S. & Wagner, H. (2010). Stochastic model specification
search for Gaussian and partial non-Gaussian state space models. *J. Econometrics*
154, 85-100.
Gelman, A., van Dyk, D. A., Huang, Z. & Boscardin, W. J. (2008). Using redundant
parameterizations to fit hierarchical models. *J. Comput. Graph. Stat.* 17, 95-122.
Gelman, A. (2006). Prior distributions for variance parameters in hierarchical
models. *Bayesian Analysis* 1, 515-534.
Gelman, A. et al. (2013). *Bayesian Data Analysis* (3rd ed.), sections 5.4-5.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from hierpipe.errors import ConfigError, InputError
from hierpipe.models.gibbs_twolevel import Normal
from hierpipe.models.meta import _check_inputs

__all__ = [
    "SCHEMES",
    "MetaGibbsDraws",
    "TauPrior",
    "gibbs_meta",
    "gibbs_meta_batch",
    "tau_prior_from_config",
]

FloatArray = NDArray[np.float64]

SCHEMES: tuple[str, ...] = ("asis", "centred", "noncentred")
FAMILIES: tuple[str, ...] = ("uniform", "half_cauchy", "half_normal")


@dataclass(frozen=True)
class TauPrior:
    """Prior on :math:`\\tau`: ``family`` and ``scale`` (the upper bound for uniform).

    ``scale=None`` is allowed only for ``uniform`` and means no upper bound.
    """

    family: str
    scale: float | None = None

    def log_density(self, tau: FloatArray) -> FloatArray:
        """Unnormalised log density at :math:`|\\tau|` (``-inf`` outside the support)."""
        a = np.abs(tau)
        if self.family == "half_cauchy":
            assert self.scale is not None
            return -np.log1p((a / self.scale) ** 2)
        if self.family == "half_normal":
            assert self.scale is not None
            return -0.5 * (a / self.scale) ** 2
        if self.scale is None:
            return np.zeros_like(a)
        return np.where(a <= self.scale, 0.0, -np.inf)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"family": self.family}
        if self.scale is not None:
            out["scale"] = float(self.scale)
        return out


def tau_prior_from_config(spec: dict[str, Any] | None, k: int) -> TauPrior:
    """The prior on :math:`\\tau` from a config mapping ``{family:, scale:}``.

    Default: ``uniform`` without bound (BDA3's choice for the eight schools), as
    :func:`hierpipe.models.meta_bayes.posterior_tau_grid`.

    Raises
    ------
    ConfigError
        Unknown family, a missing or non-positive scale, or an unbounded
        uniform prior with :math:`k = 2` (improper posterior).
    """
    spec = dict(spec or {"family": "uniform"})
    family = str(spec.get("family", "uniform"))
    if family not in FAMILIES:
        raise ConfigError(f"prior on tau: unknown family '{family}' (choose {', '.join(FAMILIES)})")
    unknown = set(spec) - {"family", "scale"}
    if unknown:
        raise ConfigError(f"prior on tau: unknown key '{sorted(unknown)[0]}' (family, scale)")
    scale = spec.get("scale")
    if scale is not None:
        scale = float(scale)
        if not (np.isfinite(scale) and scale > 0):
            raise ConfigError(f"prior on tau: scale must be finite and > 0, got {scale!r}")
    elif family != "uniform":
        raise ConfigError(f"prior on tau: {family} needs a scale")
    elif k < 3:
        raise ConfigError(
            "prior on tau: a uniform prior without upper bound gives an improper posterior "
            f"with k = {k} studies; give scale (the upper bound of tau)"
        )
    return TauPrior(family, scale)


@dataclass(frozen=True, eq=False)
class MetaGibbsDraws:
    """Draws after warm-up; chains are the leading axis.

    Attributes
    ----------
    mu, tau : arrays (chains, draws)
    theta : array (chains, draws, k)
    acceptance : dict
        Mean acceptance rate of the centred and non-centred :math:`\\tau` moves.
    thin : every ``thin``-th iteration after warm-up was kept.
    mu_prior : the normal prior on :math:`\\mu`, or None for flat.
    """

    mu: FloatArray
    tau: FloatArray
    theta: FloatArray
    prior: TauPrior
    scheme: str
    warmup: int
    acceptance: dict[str, float]
    thin: int = 1
    mu_prior: Normal | None = None

    @property
    def r(self) -> FloatArray:
        """Study deviations :math:`\\theta_j - \\mu` (chains, draws, k)."""
        return self.theta - self.mu[..., None]

    def info(self) -> dict[str, Any]:
        chains, draws = self.mu.shape
        settings: dict[str, Any] = {
            "chains": chains,
            "warmup": self.warmup,
            "draws": draws,
            "scheme": self.scheme,
        }
        if self.thin != 1:
            settings["thin"] = self.thin
        mu_prior = {"family": "flat"} if self.mu_prior is None else self.mu_prior.to_dict()
        return {
            "sampler": "meta Gibbs (ASIS interweaving)" if self.scheme == "asis" else self.scheme,
            "settings": settings,
            "priors": {"b_Intercept": mu_prior, "sd": self.prior.to_dict()},
            "acceptance": dict(self.acceptance),
        }


def _initial(
    y: FloatArray, v: FloatArray, chains: int, rng: np.random.Generator
) -> tuple[FloatArray, FloatArray]:
    """Over-dispersed starts: mu about the weighted mean, tau spread over the data scale.

    ``y`` is ``(k,)`` or one data set a chain, ``(chains, k)``.
    """
    w = 1.0 / v
    if y.ndim == 2:
        spread = np.sqrt(np.var(y, axis=1) + np.median(v))
        mu = np.einsum("ck,k->c", y, w) / np.sum(w) + spread * rng.standard_normal(chains)
        tau = spread * np.exp(rng.standard_normal(chains) - 1.0)
        return mu, tau
    spread = float(np.sqrt(np.var(y) + np.median(v)))
    mu = float(np.sum(w * y) / np.sum(w)) + spread * rng.standard_normal(chains)
    tau = spread * np.exp(rng.standard_normal(chains) - 1.0)
    return mu, tau


def _draw_theta(
    y: FloatArray, v: FloatArray, mu: FloatArray, tau: FloatArray, z: FloatArray
) -> FloatArray:
    """Step 1: theta | mu, tau, y, one row a chain."""
    t2 = tau[:, None] ** 2
    b = v / (v + t2)
    return (1.0 - b) * y + b * mu[:, None] + np.sqrt((1.0 - b) * v) * z


def _centred(
    theta: FloatArray,
    mu: FloatArray,
    tau: FloatArray,
    prior: TauPrior,
    gen: np.random.Generator,
    mu_prior: Normal | None = None,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Step 2: tau | theta, mu by independence MH, then mu | theta, tau.

    With a normal prior :math:`N(m_0, s_0^2)` on mu, mu | theta, tau is normal
    with precision :math:`k/\\tau^2 + 1/s_0^2` (conjugate update).
    """
    chains, k = theta.shape
    s = np.einsum("ck,ck->c", theta - mu[:, None], theta - mu[:, None])
    prop = np.sqrt(0.5 * s / gen.standard_gamma(0.5 * (k - 1), size=chains))
    log_u = np.log(gen.random(chains))
    accept = log_u < prior.log_density(prop) - prior.log_density(tau)
    tau = np.where(accept, prop, tau)
    if mu_prior is None:
        mu = theta.mean(axis=1) + tau / np.sqrt(k) * gen.standard_normal(chains)
    else:
        p0 = 1.0 / mu_prior.sd**2
        prec = k / tau**2 + p0
        mean = (theta.sum(axis=1) / tau**2 + mu_prior.mean * p0) / prec
        mu = mean + gen.standard_normal(chains) / np.sqrt(prec)
    return mu, tau, accept.astype(np.float64)


def _noncentred(
    y: FloatArray,
    w: FloatArray,
    theta: FloatArray,
    mu: FloatArray,
    tau: FloatArray,
    prior: TauPrior,
    gen: np.random.Generator,
    mu_prior: Normal | None = None,
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Step 3: (tau, mu) | eta, y with eta = (theta - mu)/tau held fixed; then fold.

    A normal prior :math:`N(m_0, s_0^2)` on mu enters the regression as one
    more observation :math:`m_0` of :math:`\\mu` (regressors :math:`[1, 0]`,
    weight :math:`1/s_0^2`), which is exactly its conjugate contribution.
    """
    chains = theta.shape[0]
    eta = (theta - mu[:, None]) / tau[:, None]
    # normal equations of y on [1, eta] with weights w = 1/v
    s0 = float(np.sum(w))
    # einsum, not BLAS: sums then do not depend on the BLAS thread count
    s1 = np.einsum("ck,k->c", eta, w)
    s2 = np.einsum("ck,ck,k->c", eta, eta, w)
    if y.ndim == 2:
        b0 = np.einsum("ck,k->c", y, w)
        b1 = np.einsum("ck,ck,k->c", eta, y, w)
    else:
        b0 = float(np.dot(w, y))
        b1 = np.einsum("ck,k->c", eta, w * y)
    if mu_prior is not None:
        s0 += 1.0 / mu_prior.sd**2
        b0 = b0 + mu_prior.mean / mu_prior.sd**2
    det = s0 * s2 - s1 * s1
    m_tau = (s0 * b1 - s1 * b0) / det
    v_tau = s0 / det
    prop = m_tau + np.sqrt(v_tau) * gen.standard_normal(chains)
    log_u = np.log(gen.random(chains))
    accept = log_u < prior.log_density(prop) - prior.log_density(tau)
    signed = np.where(accept, prop, tau)
    # mu | tau, eta, y: y - tau eta ~ N(mu, v)
    mu = (b0 - signed * s1) / s0 + gen.standard_normal(chains) / np.sqrt(s0)
    theta = mu[:, None] + signed[:, None] * eta
    return mu, np.abs(signed), theta, accept.astype(np.float64)


def gibbs_meta(
    y: ArrayLike,
    v: ArrayLike,
    *,
    prior: TauPrior,
    chains: int = 4,
    warmup: int = 1000,
    draws: int = 1000,
    rng: np.random.Generator,
    scheme: str = "asis",
) -> MetaGibbsDraws:
    r"""Sample the posterior of :math:`(\mu, \tau, \theta)` (see the module docstring).

    Parameters
    ----------
    y, v : arrays (k,)
        Effect sizes and their known sampling variances (:math:`\mathrm{se}^2 > 0`).
    prior : TauPrior
        Prior on :math:`\tau` (:func:`tau_prior_from_config`).
    chains, warmup, draws : int
        Number of chains, warm-up iterations discarded, and draws kept per chain.
    rng : numpy.random.Generator
        The job's generator (:func:`hierpipe.seeds.derive_rng`).
    scheme : {"asis", "centred", "noncentred"}
        Update scheme; ``"asis"`` is the one to use.

    Returns
    -------
    MetaGibbsDraws

    Raises
    ------
    InputError
        Bad ``y`` or ``v`` (as :func:`hierpipe.models.meta.meta_fit`).
    ConfigError
        Bad settings or scheme.
    """
    y_, v_, _ = _check_inputs(y, v, None)
    return _run(y_, v_, prior, None, chains, warmup, draws, 1, rng, scheme)


def gibbs_meta_batch(
    y: ArrayLike,
    v: ArrayLike,
    *,
    prior: TauPrior,
    mu_prior: Normal | None = None,
    chains: int,
    warmup: int = 1000,
    draws: int = 1000,
    thin: int = 1,
    rng: np.random.Generator,
    scheme: str = "asis",
) -> MetaGibbsDraws:
    r"""Sample many meta-analyses with one set of known variances at once, one a chain.

    The model and scheme are those of :func:`gibbs_meta` (module docstring),
    with two additions that simulation-based calibration
    (:mod:`hierpipe.sbc.meta`) needs: ``y`` may hold one data set a chain, and
    :math:`\mu` may have a proper normal prior :math:`N(m_0, s_0^2)` (flat when
    ``mu_prior`` is None). With it, step 2 draws :math:`\mu \mid \theta, \tau`
    from its conjugate normal and step 3 adds :math:`m_0` as one more weighted
    observation of :math:`\mu`; both stay exact.

    Parameters
    ----------
    y : array ``(k,)`` or ``(chains, k)``
        Effect sizes; with two axes chain :math:`c` samples the posterior of row :math:`c`.
    v : array ``(k,)``
        Known sampling variances (:math:`\mathrm{se}^2 > 0`), shared by every data set.
    prior : TauPrior
        Prior on :math:`\tau`.
    mu_prior : Normal or None
        Prior on :math:`\mu`; None for flat.
    chains, warmup, draws, thin : int
        Chains; iterations discarded; draws kept per chain, every ``thin``-th
        iteration after warm-up.
    rng : numpy.random.Generator
    scheme : {"asis", "centred", "noncentred"}

    Returns
    -------
    MetaGibbsDraws

    Raises
    ------
    InputError
        Shapes disagree, or values are not finite, or a variance is not positive.
    ConfigError
        Bad settings, scheme or prior.
    """
    y_arr = np.asarray(y, dtype=np.float64)
    if y_arr.ndim == 2 and y_arr.shape[0] != chains:
        raise InputError(f"y has {y_arr.shape[0]} data sets for {chains} chains")
    if y_arr.ndim not in (1, 2):
        raise InputError(f"y must be (k,) or (chains, k), got shape {y_arr.shape}")
    first = y_arr if y_arr.ndim == 1 else y_arr[0]
    _, v_, _ = _check_inputs(first, v, None)
    bad = np.argwhere(~np.isfinite(y_arr))
    if bad.size:
        raise InputError(f"y: effect size at index {tuple(bad[0])} is not finite")
    if mu_prior is not None and not (np.isfinite(mu_prior.mean) and mu_prior.sd > 0):
        raise ConfigError(f"prior on b_Intercept: needs a finite mean and sd > 0, got {mu_prior}")
    if thin < 1:
        raise ConfigError(f"gibbs needs thin >= 1, got {thin}")
    return _run(y_arr, v_, prior, mu_prior, chains, warmup, draws, thin, rng, scheme)


def _run(
    y_: FloatArray,
    v_: FloatArray,
    prior: TauPrior,
    mu_prior: Normal | None,
    chains: int,
    warmup: int,
    draws: int,
    thin: int,
    rng: np.random.Generator,
    scheme: str,
) -> MetaGibbsDraws:
    """The sampler loop on validated inputs; ``y_`` is (k,) or (chains, k)."""
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown Gibbs scheme '{scheme}' (choose {', '.join(SCHEMES)})")
    if chains < 1 or warmup < 0 or draws < 1:
        raise ConfigError("gibbs needs chains >= 1, warmup >= 0 and draws >= 1")
    k = y_.shape[-1]
    if prior.family == "uniform" and prior.scale is None and k < 3:
        raise ConfigError("a uniform prior on tau without upper bound needs k >= 3 studies")
    w = 1.0 / v_
    mu, tau = _initial(y_, v_, chains, rng)
    if prior.family == "uniform" and prior.scale is not None:
        tau = np.minimum(tau, 0.5 * prior.scale)
    out_mu = np.empty((chains, draws))
    out_tau = np.empty((chains, draws))
    out_theta = np.empty((chains, draws, k))
    acc_c = np.zeros(chains)
    acc_n = np.zeros(chains)
    for it in range(warmup + draws * thin):
        theta = _draw_theta(y_, v_, mu, tau, rng.standard_normal((chains, k)))
        if scheme != "noncentred":
            mu, tau, a = _centred(theta, mu, tau, prior, rng, mu_prior)
            if it >= warmup:
                acc_c += a
        if scheme != "centred":
            mu, tau, theta, a = _noncentred(y_, w, theta, mu, tau, prior, rng, mu_prior)
            if it >= warmup:
                acc_n += a
        d, rem = divmod(it - warmup, thin)
        if it >= warmup and rem == thin - 1:
            out_mu[:, d] = mu
            out_tau[:, d] = tau
            out_theta[:, d] = theta
    acceptance = {}
    kept = draws * thin
    if scheme != "noncentred":
        acceptance["centred_tau"] = float(acc_c.mean() / kept)
    if scheme != "centred":
        acceptance["noncentred_tau"] = float(acc_n.mean() / kept)
    return MetaGibbsDraws(
        out_mu, out_tau, out_theta, prior, scheme, warmup, acceptance, thin, mu_prior
    )
