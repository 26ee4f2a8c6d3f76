r"""Gibbs sampler for the two-level varying-intercept model, from sufficient statistics.

Model (brms names in brackets)
------------------------------
.. math::

    y_{ij} \mid \theta_j, \sigma &\sim \mathcal N(\theta_j, \sigma^2),
        \qquad i = 1..n_j,\ j = 1..J, \\
    \theta_j &= \mu + r_j, \qquad r_j \mid \tau \sim \mathcal N(0, \tau^2), \\
    \mu &\sim \text{flat} \ \text{or}\ \mathcal N(m_0, s_0^2), \\
    \tau,\ \sigma &\sim \text{half-Cauchy}(A_\tau),\ \text{half-Cauchy}(A_\sigma)
        \ \text{or}\ \tau^2, \sigma^2 \sim \text{Inv-Gamma}(\alpha, \beta),

with :math:`\mu` = ``b_Intercept``, :math:`\tau` = ``sd_<group>__Intercept``,
:math:`\sigma` = ``sigma``, :math:`\theta_j` = ``coef_<group>[j,Intercept]`` and
:math:`r_j` = ``r_<group>[j,Intercept]``. The likelihood depends on the data only
through :math:`n_j`, :math:`\bar y_j` and :math:`SSW = \sum_{ij} (y_{ij} - \bar
y_j)^2`:

.. math::

    p(y \mid \theta, \sigma) \propto \sigma^{-N}
    \exp\Big\{-\frac{SSW + \sum_j n_j (\bar y_j - \theta_j)^2}{2\sigma^2}\Big\},

so one iteration costs :math:`O(J)` whatever :math:`N = \sum_j n_j` is.

Half-Cauchy priors use the auxiliary-variable representation of Makalic &
Schmidt (2016): :math:`\tau^2 \mid a \sim \text{IG}(1/2, 1/a)`, :math:`a \sim
\text{IG}(1/2, 1/A^2)` gives :math:`\tau \sim C^+(0, A)`, and every full
conditional is inverse-gamma.

One iteration (all chains at once; chains are the leading array axis)
---------------------------------------------------------------------
1. :math:`\theta_j \mid \mu,\tau,\sigma,y \sim \mathcal N(v_j (n_j \bar y_j/\sigma^2
   + \mu/\tau^2), v_j)`, :math:`v_j = (n_j/\sigma^2 + 1/\tau^2)^{-1}`.
2. :math:`b \mid \sigma \sim \text{IG}(1, 1/A_\sigma^2 + 1/\sigma^2)`, then
   :math:`\sigma^2 \mid \theta, b \sim \text{IG}((N+1)/2, S_w/2 + 1/b)` with
   :math:`S_w = SSW + \sum_j n_j(\bar y_j - \theta_j)^2` (inverse-gamma prior:
   :math:`\text{IG}(\alpha + N/2, \beta + S_w/2)`).
3. Sufficient-augmentation (centred) step for :math:`(\mu, \tau)` given
   :math:`\theta`: :math:`\mu \mid \theta, \tau` normal; :math:`a \mid \tau`, then
   :math:`\tau^2 \mid \theta, \mu, a \sim \text{IG}((J+1)/2, S_\theta/2 + 1/a)`.
4. Ancillary-augmentation (non-centred) step: with :math:`\eta_j = (\theta_j -
   \mu)/\tau` held fixed, :math:`\bar y_j \sim \mathcal N(\mu + \tau\eta_j,
   \sigma^2/n_j)` is a linear regression in :math:`(\mu, \tau)`. Propose
   :math:`(\mu', \tau')` from its Gaussian posterior under the :math:`\mu` prior and
   a flat prior on a *signed* :math:`\tau` (an independence proposal), accept with
   probability :math:`\min\{1, p_\tau(|\tau'|)/p_\tau(\tau)\}`, and map back by
   :math:`\theta' = \mu' + \tau'\eta`, :math:`\tau \leftarrow |\tau'|`.

Steps 3 and 4 are the ancillarity-sufficiency interweaving strategy (ASIS) of
Yu & Meng (2011): the centred step mixes well when the data are strong (large
:math:`n_j\tau^2/\sigma^2`), the non-centred one when they are weak (small
:math:`\tau`, small groups), and interweaving them is at least as good as the
better of the two (Papaspiliopoulos, Roberts & Sköld 2007). Step 4 samples in the
sign-symmetric extension of the non-centred model, :math:`\tau \in \mathbb R` with
:math:`p(\tau) = p(-\tau)`, in which :math:`(\tau, \eta) \mapsto (-\tau, -\eta)`
leaves the posterior unchanged (Frühwirth-Schnatter & Wagner 2010). Because the
proposal and the acceptance ratio are equivariant under that flip, folding
:math:`\tau' \mapsto |\tau'|` (with :math:`\eta \mapsto \text{sign}(\tau')\eta`)
after the Metropolis-Hastings step leaves the original posterior invariant; it
needs no truncated-normal draw, and the acceptance ratio involves only the
prior of :math:`\tau`, which is bounded for the half-Cauchy, so acceptance is
close to one unless the prior scale is small compared with the posterior of
:math:`\tau`.

The auxiliaries :math:`a, b` are redrawn from their full conditionals right
before each use, so they are not part of the state and the MH step in 4 targets
the half-Cauchy marginal directly.

Random numbers are drawn in blocks, one child generator per stream (theta
normals, scalar normals, the two gamma streams, exponentials, uniforms), so the
draws do not depend on the block size (memory), and the pure-numpy and numba
back ends consume identical variates and agree up to rounding.

References
----------
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
    "numba_available",
]

# Target size (float64 elements) of one block of pre-drawn theta normals; the
# draws do not depend on it, only memory and speed do.
_BLOCK_ELEMENTS = 1 << 18
_MAX_BLOCK_ITERATIONS = 1024


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
    r"""Half-Cauchy prior :math:`C^+(0, \text{scale})` on a standard deviation.

    Sampled through the Makalic & Schmidt (2016) inverse-gamma mixture.
    """

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
    """Priors of the two-level model; the scales are chosen by the caller.

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
    interweave : run the ancillary (non-centred) step 4 (ASIS); ``False`` gives
        the plain centred Gibbs sampler (for comparison only).
    sigma_fixed : if given, ``sigma`` is known and held at this value (the
        known-standard-error model with ``se_j = sigma / sqrt(n_j)``).
    backend : ``"numpy"`` (default, no extra dependency) or ``"numba"`` (a
        compiled kernel; same variates, same draws up to rounding).
    """

    chains: int = 4
    warmup: int = 1000
    draws: int = 1000
    thin: int = 1
    interweave: bool = True
    sigma_fixed: float | None = None
    backend: Literal["numpy", "numba"] = "numpy"

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
    accept_rate : acceptance rate of the ancillary MH step per chain over the
        kept iterations, shape ``(C,)`` (NaN without interweaving).
    settings, priors : what produced the draws.
    """

    b_Intercept: np.ndarray
    sd: np.ndarray
    sigma: np.ndarray
    theta: np.ndarray
    accept_rate: np.ndarray
    settings: GibbsSettings
    priors: Priors

    @cached_property
    def r(self) -> np.ndarray:
        """Group deviations ``theta - b_Intercept`` (``r``), shape ``(C, D, J)``."""
        return self.theta - self.b_Intercept[:, :, None]

    def info(self) -> dict[str, Any]:
        """JSON-able facts for ``fit.json``: sampler, settings, priors, acceptance."""
        return {
            "sampler": "gibbs_two_level",
            "scheme": "ASIS (centred + non-centred interweaving)"
            if self.settings.interweave
            else "centred Gibbs",
            "settings": self.settings.to_dict(),
            "priors": self.priors.to_dict(),
            "ancillary_accept_rate": [float(a) for a in self.accept_rate],
        }


# --------------------------------------------------------------------------- data


class _Data:
    """Sufficient statistics with a leading data axis of length 1 or C.

    With one data set (``B == 1``) the weighted sums over groups are matrix-vector
    products against stacked ``(J, 2)`` weight matrices (one BLAS call for two
    sums); with one data set a chain (``B == C``) they are row-wise ``einsum``.
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
        if self.B == 1:
            self._n = self.n[0]
            self._ones_n = np.stack([np.ones(self.J), self.n[0]], axis=1)
            self._n_nybar = np.stack([self.n[0], self.nybar[0]], axis=1)

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
        raise InputError(
            f"gibbs_two_level: n has {n_arr.size} groups but ybar has {y_arr.size}"
        )
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
            f"gibbs_two_level: group count n must be a positive integer; group index {j} "
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


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ConfigError(f"gibbs_two_level: {name} must be a positive finite number, got {value!r}")


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
    for name in ("chains", "draws", "thin"):
        v = getattr(settings, name)
        if not isinstance(v, int | np.integer) or v < 1:
            raise ConfigError(f"gibbs_two_level: {name} must be an integer >= 1, got {v!r}")
    if not isinstance(settings.warmup, int | np.integer) or settings.warmup < 0:
        raise ConfigError(f"gibbs_two_level: warmup must be an integer >= 0, got {settings.warmup!r}")
    if settings.sigma_fixed is not None:
        _check_positive("sigma_fixed", settings.sigma_fixed)
    if settings.backend not in ("numpy", "numba"):
        raise ConfigError(
            f"gibbs_two_level: backend must be 'numpy' or 'numba', got {settings.backend!r}"
        )


# --------------------------------------------------------------------------- initial values


def _initial_values(
    d: _Data, chains: int, sigma_fixed: float | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dispersed starting values ``(mu, tau^2, sigma^2)``, each of shape ``(C,)``.

    ``mu`` starts at the weighted grand mean plus one between-group SD times a
    standard normal (about sqrt(J) posterior SDs), ``tau`` at the between-group
    SD of the means times a log-uniform factor in [e^-2.5, e^1] (so some chains
    start near zero, the centred sampler's sticking point) and ``sigma`` at the
    pooled within-group SD times a log-uniform factor in [1/2, 2].
    """
    z = rng.standard_normal(chains)
    u = rng.random((chains, 2))
    J = d.J
    grand = d.Y / d.N
    spread = np.sqrt(np.sum((d.ybar - d.ybar.mean(axis=1, keepdims=True)) ** 2, axis=1) / (J - 1))
    dof = d.N - J
    with np.errstate(divide="ignore", invalid="ignore"):
        within = np.where((dof > 0) & (d.ssw > 0), np.sqrt(d.ssw / np.maximum(dof, 1)), np.nan)
    # Fallbacks keep every start positive and finite for degenerate inputs
    # (all groups of size one, or identical means).
    within = np.where(np.isfinite(within), within, np.where(spread > 0, spread, 1.0))
    scale = np.where(spread > 0, spread, within / np.sqrt(d.N / J))
    mu0 = grand + scale * z
    tau0 = scale * np.exp(-2.5 + 3.5 * u[:, 0])
    if sigma_fixed is None:
        sigma0 = within * np.exp(math.log(2.0) * (2.0 * u[:, 1] - 1.0))
    else:
        sigma0 = np.full(chains, float(sigma_fixed))
    shape = (chains,)
    return (
        np.broadcast_to(mu0, shape).astype(np.float64),
        np.broadcast_to(tau0**2, shape).astype(np.float64),
        np.broadcast_to(sigma0**2, shape).astype(np.float64),
    )


# --------------------------------------------------------------------------- variates


class _Variates:
    """Pre-drawn random variates in blocks, one child generator per stream."""

    def __init__(
        self,
        rng: np.random.Generator,
        chains: int,
        J: int,
        shape_tau: np.ndarray,
        shape_sigma: np.ndarray | None,
    ) -> None:
        (
            self._g_theta,
            self._g_normal,
            self._g_gamma_tau,
            self._g_gamma_sigma,
            self._g_exp,
            self._g_unif,
        ) = rng.spawn(6)
        self.C = chains
        self.J = J
        self.shape_tau = shape_tau
        self.shape_sigma = shape_sigma

    def block(self, K: int) -> dict[str, np.ndarray]:
        C, J = self.C, self.J
        out = {
            "z_theta": self._g_theta.standard_normal((K, C, J)),
            # columns: mu (centred step), tau (ancillary), mu (ancillary)
            "z": self._g_normal.standard_normal((K, C, 3)),
            "g_tau": self._g_gamma_tau.standard_gamma(self.shape_tau, size=(K, C)),
            # columns: a (tau auxiliary), b (sigma auxiliary)
            "e": self._g_exp.standard_exponential((K, C, 2)),
            "logu": np.log(self._g_unif.random((K, C))),
        }
        if self.shape_sigma is not None:
            out["g_sigma"] = self._g_gamma_sigma.standard_gamma(self.shape_sigma, size=(K, C))
        else:
            out["g_sigma"] = np.ones((K, C))
        return out


# --------------------------------------------------------------------------- prior codes


@dataclass(frozen=True)
class _Consts:
    """Scalar prior constants, in the form both back ends use.

    ``tau_hc``: 1 for half-Cauchy (extra = e / (1/t2 + inv_A2)), 0 for inverse
    gamma (extra = beta). ``tau_logw_pow``/``tau_logw_beta``: log prior density of
    tau (w.r.t. d tau) is ``-pow * log(tau) - beta / tau^2`` (inverse gamma) or
    ``-log1p(tau^2 * inv_A2)`` (half-Cauchy).
    """

    tau_hc: int
    tau_inv_A2: float
    tau_beta: float
    tau_pow: float
    sigma_free: int
    sigma_hc: int
    sigma_inv_A2: float
    sigma_beta: float
    mu_prec: float  # 1/s0^2, 0 for flat
    mu_prec_mean: float  # m0/s0^2, 0 for flat
    interweave: int


def _consts(priors: Priors, settings: GibbsSettings) -> _Consts:
    def parts(p: ScalePrior) -> tuple[int, float, float, float]:
        if isinstance(p, HalfCauchy):
            return 1, 1.0 / p.scale**2, 0.0, 0.0
        return 0, 0.0, float(p.scale), 2.0 * p.shape + 1.0

    t_hc, t_ia2, t_beta, t_pow = parts(priors.sd)
    s_hc, s_ia2, s_beta, _ = parts(priors.sigma)
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
        interweave=int(settings.interweave),
    )


def _gamma_shapes(d: _Data, priors: Priors, settings: GibbsSettings, chains: int):
    J = d.J
    if isinstance(priors.sd, HalfCauchy):
        shape_tau = np.full(chains, (J + 1) / 2.0)
    else:
        shape_tau = np.full(chains, priors.sd.shape + J / 2.0)
    if settings.sigma_fixed is not None:
        return shape_tau, None
    if isinstance(priors.sigma, HalfCauchy):
        shape_sigma = (d.N + 1.0) / 2.0
    else:
        shape_sigma = priors.sigma.shape + d.N / 2.0
    return shape_tau, np.broadcast_to(shape_sigma, (chains,)).astype(np.float64)


# --------------------------------------------------------------------------- conditionals
# Pure functions of the state and the pre-drawn standard variates; the tests
# check each against its closed form.


def draw_theta(
    d: _Data, mu: np.ndarray, t2: np.ndarray, s2: np.ndarray, z: np.ndarray
) -> np.ndarray:
    r"""Step 1: :math:`\theta_j \mid \mu, \tau, \sigma, y`, shape ``(C, J)``.

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
    r"""Step 2: :math:`\sigma^2 \mid \theta, y` (after :math:`b \mid \sigma` for half-Cauchy).

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
    r"""Step 3a: :math:`\mu \mid \theta, \tau` from ``theta_sum`` :math:`= \sum_j \theta_j`.

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
    r"""Step 3b: :math:`\tau^2 \mid \theta, \mu` from :math:`S_\theta = \sum_j(\theta_j - \mu)^2`.

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
    r"""Step 4 proposal: :math:`(\mu', \lambda)` with :math:`\eta \propto \text{dev}` fixed.

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
    r"""Step 4 acceptance: :math:`\log p_\tau(|\lambda|\tau) - \log p_\tau(\tau)`.

    Densities w.r.t. :math:`d\tau`: half-Cauchy :math:`\propto (1 +
    \tau^2/A^2)^{-1}`; inverse gamma on :math:`\tau^2` :math:`\propto
    \tau^{-2\alpha-1}e^{-\beta/\tau^2}`. ``t2`` is :math:`\tau^2`.
    """
    tp2 = lam * lam * t2
    if k.tau_hc:
        return np.log1p(t2 * k.tau_inv_A2) - np.log1p(tp2 * k.tau_inv_A2)
    with np.errstate(divide="ignore"):
        return -k.tau_pow * np.log(np.abs(lam)) - k.tau_beta * (1.0 / tp2 - 1.0 / t2)


# --------------------------------------------------------------------------- numpy back end


def _run_numpy(
    d: _Data,
    k: _Consts,
    var: _Variates,
    mu: np.ndarray,
    t2: np.ndarray,
    s2: np.ndarray,
    settings: GibbsSettings,
    out: dict[str, np.ndarray],
) -> None:
    J = d.J
    warmup, thin = settings.warmup, settings.thin
    total = warmup + settings.draws * thin
    K_max = _block_iterations(mu.shape[0], J)
    n_acc = out["n_acc"]
    it = 0
    while it < total:
        K = min(K_max, total - it)
        v = var.block(K)
        z_theta, g_sigma, g_tau, logu = v["z_theta"], v["g_sigma"], v["g_tau"], v["logu"]
        z_mu, z_lam, z_mu2 = (np.ascontiguousarray(v["z"][:, :, i]) for i in range(3))
        e_a, e_b = (np.ascontiguousarray(v["e"][:, :, i]) for i in range(2))
        for b in range(K):
            theta = draw_theta(d, mu, t2, s2, z_theta[b])
            if k.sigma_free:
                s2 = draw_sigma2(d, theta, s2, g_sigma[b], e_b[b], k)
            mu = draw_mu_centred(theta.sum(axis=1), J, t2, z_mu[b], k)
            dev = theta - mu[:, None]
            s_theta, m22 = d.sum_and_ndot(dev * dev)
            t2 = draw_tau2_centred(s_theta, t2, g_tau[b], e_a[b], k)
            lam = None
            if k.interweave:
                m12, r2 = d.ndot_and_nybardot(dev)
                mu_p, lam = ancillary_proposal(d, m12, m22, r2, s2, z_lam[b], z_mu2[b], k)
                acc = logu[b] < log_prior_ratio_tau(lam, t2, k)
                mu = np.where(acc, mu_p, mu)
                lam = np.where(acc, lam, 1.0)
                t2 = lam * lam * t2
            rec = it + b - warmup
            if rec >= 0 and rec % thin == 0:
                i = rec // thin
                out["b_Intercept"][:, i] = mu
                out["sd"][:, i] = t2  # square roots taken once at the end
                out["sigma"][:, i] = s2
                if lam is None:
                    out["theta"][:, i, :] = theta
                else:
                    out["theta"][:, i, :] = mu[:, None] + lam[:, None] * dev
                    n_acc += acc
        it += K
    np.sqrt(out["sd"], out=out["sd"])
    np.sqrt(out["sigma"], out=out["sigma"])


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


def _numba_kernel():
    """Compile (once per process) the numba kernel for one block of iterations."""
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

    @numba.njit(cache=False, fastmath=False, nogil=True)
    def kernel(
        n, ybar, nybar, N, Y, ssw, kc, K, it0, warmup, thin, mu, t2, s2,
        z_theta, z, g_tau, g_sigma, e, logu, theta, dev,
        o_mu, o_sd, o_sigma, o_theta, n_acc,
    ):  # pragma: no cover - compiled
        tau_hc, t_ia2, t_beta, t_pow = kc[0], kc[1], kc[2], kc[3]
        sig_free, sig_hc, s_ia2, s_beta = kc[4], kc[5], kc[6], kc[7]
        mu_prec, mu_pm, interweave = kc[8], kc[9], kc[10]
        C = mu.shape[0]
        J = n.shape[1]
        B = n.shape[0]
        for b in range(K):
            rec = it0 + b - warmup
            keep = rec >= 0 and rec % thin == 0
            i = rec // thin
            for c in range(C):
                dc = c if B > 1 else 0
                inv_s2 = 1.0 / s2[c]
                inv_t2 = 1.0 / t2[c]
                mt = mu[c] * inv_t2
                # 1. theta | mu, tau, sigma; 2. residual sum of squares
                sw = 0.0
                tsum = 0.0
                for j in range(J):
                    v = 1.0 / (n[dc, j] * inv_s2 + inv_t2)
                    th = v * (nybar[dc, j] * inv_s2 + mt) + z_theta[b, c, j] * math.sqrt(v)
                    theta[c, j] = th
                    r = ybar[dc, j] - th
                    sw += n[dc, j] * r * r
                    tsum += th
                if sig_free > 0.5:
                    if sig_hc > 0.5:
                        extra = e[b, c, 1] / (inv_s2 + s_ia2)
                    else:
                        extra = s_beta
                    s2[c] = (0.5 * (ssw[dc] + sw) + extra) / g_sigma[b, c]
                # 3a. mu | theta, tau
                prec = J * inv_t2 + mu_prec
                m = (tsum * inv_t2 + mu_pm) / prec + z[b, c, 0] / math.sqrt(prec)
                # 3b. tau^2 | theta, mu
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
                if interweave > 0.5:
                    # 4. ancillary step
                    m12 = 0.0
                    m22 = 0.0
                    r2 = 0.0
                    for j in range(J):
                        nd = n[dc, j] * dev[c, j]
                        m12 += nd
                        m22 += nd * dev[c, j]
                        r2 += nybar[dc, j] * dev[c, j]
                    ss = s2[c]
                    m11 = N[dc] + ss * mu_prec
                    r1 = Y[dc] + ss * mu_pm
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
                    if logu[b, c] < logr:
                        m = mp
                        tt = tp2
                        lam = lp
                        if keep:
                            n_acc[c] += 1.0
                mu[c] = m
                t2[c] = tt
                if keep:
                    o_mu[c, i] = m
                    o_sd[c, i] = math.sqrt(tt)
                    o_sigma[c, i] = math.sqrt(s2[c])
                    for j in range(J):
                        o_theta[c, i, j] = m + lam * dev[c, j]

    _NUMBA_KERNEL = kernel
    return kernel


def _run_numba(
    d: _Data,
    k: _Consts,
    var: _Variates,
    mu: np.ndarray,
    t2: np.ndarray,
    s2: np.ndarray,
    settings: GibbsSettings,
    out: dict[str, np.ndarray],
) -> None:
    kernel = _numba_kernel()
    C, J = mu.shape[0], d.J
    kc = np.array(
        [
            k.tau_hc, k.tau_inv_A2, k.tau_beta, k.tau_pow, k.sigma_free, k.sigma_hc,
            k.sigma_inv_A2, k.sigma_beta, k.mu_prec, k.mu_prec_mean, k.interweave,
        ],
        dtype=np.float64,
    )
    total = settings.warmup + settings.draws * settings.thin
    K_max = _block_iterations(C, J)
    theta = np.empty((C, J))
    dev = np.empty((C, J))
    mu, t2, s2 = mu.copy(), t2.copy(), s2.copy()
    it = 0
    while it < total:
        K = min(K_max, total - it)
        v = var.block(K)
        kernel(
            d.n, d.ybar, d.nybar, d.N, d.Y, d.ssw, kc, K, it, settings.warmup,
            settings.thin, mu, t2, s2, v["z_theta"], v["z"], v["g_tau"], v["g_sigma"],
            v["e"], v["logu"], theta, dev, out["b_Intercept"], out["sd"], out["sigma"],
            out["theta"], out["n_acc"],
        )
        it += K


# --------------------------------------------------------------------------- driver


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
    Inputs are trusted (validated by the public entry point or the caller).
    """
    _validate_config(priors, settings)
    C = int(settings.chains)
    d = _Data(np.atleast_2d(n), np.atleast_2d(ybar), ssw, C)
    if d.n.shape[0] not in (1, C):
        raise ConfigError("gibbs_two_level: data axis must have length 1 or chains")
    k = _consts(priors, settings)
    g_init, g_var = rng.spawn(2)
    mu, t2, s2 = _initial_values(d, C, settings.sigma_fixed, g_init)
    shape_tau, shape_sigma = _gamma_shapes(d, priors, settings, C)
    var = _Variates(g_var, C, d.J, shape_tau, shape_sigma)
    D = settings.draws
    out = {
        "b_Intercept": np.empty((C, D)),
        "sd": np.empty((C, D)),
        "sigma": np.empty((C, D)),
        "theta": np.empty((C, D, d.J)),
        "n_acc": np.zeros(C),
    }
    run = _run_numba if settings.backend == "numba" else _run_numpy
    run(d, k, var, mu, t2, s2, settings, out)
    accept = out["n_acc"] / D if settings.interweave else np.full(C, np.nan)
    return TwoLevelDraws(
        b_Intercept=out["b_Intercept"],
        sd=out["sd"],
        sigma=out["sigma"],
        theta=out["theta"],
        accept_rate=accept,
        settings=settings,
        priors=priors,
    )


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
    interweave: bool = True,
    sigma_fixed: float | None = None,
    backend: Literal["numpy", "numba"] = "numpy",
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
    chains, warmup, draws, thin, interweave, sigma_fixed, backend : see
        :class:`GibbsSettings`.

    Returns
    -------
    TwoLevelDraws
        Arrays ``b_Intercept``, ``sd``, ``sigma`` of shape ``(chains, draws)``,
        ``theta`` and ``r`` of shape ``(chains, draws, J)``; ``info()`` gives the
        settings and priors for ``fit.json``.

    Raises
    ------
    InputError
        Bad sufficient statistics (non-finite, non-integer counts, < 2 groups).
    ConfigError
        Bad priors or settings, or ``backend='numba'`` without numba.

    Notes
    -----
    One iteration costs :math:`O(J)` per chain; see the module docstring for the
    full conditionals and the interweaving (ASIS) step.
    """
    n_f, y_f, ssw_f = _validate(n, ybar, ssw)
    settings = GibbsSettings(
        chains=chains,
        warmup=warmup,
        draws=draws,
        thin=thin,
        interweave=bool(interweave),
        sigma_fixed=None if sigma_fixed is None else float(sigma_fixed),
        backend=backend,
    )
    return _gibbs_core(n_f[None, :], y_f[None, :], np.array([ssw_f]), priors, settings, rng)
