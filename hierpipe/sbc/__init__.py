r"""Simulation-based calibration (SBC) of hierpipe's samplers.

SBC (Talts, Betancourt, Simpson, Vehtari & Gelman 2018) checks that a sampler
draws from the posterior it claims. Repeat: draw parameters
:math:`\tilde\theta \sim p(\theta)` from the prior, data
:math:`\tilde y \sim p(y \mid \tilde\theta)`, and :math:`L` (roughly independent)
posterior draws :math:`\theta_1..\theta_L \sim p(\theta \mid \tilde y)`; the rank
:math:`r = \#\{l : \theta_l < \tilde\theta\}` of every scalar parameter is then
uniform on :math:`\{0, \dots, L\}` exactly when the sampler is right, because
:math:`\tilde\theta` is itself a draw from :math:`p(\theta \mid \tilde y)`.
Deviations have shapes that say what is wrong (a U: posterior too narrow;
a hump: too wide; a slope: biased).

Layout
------
:mod:`hierpipe.sbc.core`
    :class:`SBCCase` (one model, one prior, one sampler configuration), the
    registry of cases and :func:`run_case`, which turns a case's replications
    into a table of ranks.
:mod:`hierpipe.sbc.uniformity`
    The tests of uniformity: a chi-square test on the binned rank histogram
    and the simultaneous ECDF band of Säilynoja, Bürkner & Vehtari (2022).
:mod:`hierpipe.sbc.two_level`
    Cases of the two-level Gibbs sampler
    (:mod:`hierpipe.models.gibbs_twolevel`).
:mod:`hierpipe.sbc.slopes`
    Cases of the correlated varying-coefficients sampler
    (:mod:`hierpipe.models.gibbs_lmm`).
:mod:`hierpipe.sbc.multilevel`
    Cases of the nested and crossed samplers
    (:mod:`hierpipe.models.gibbs_multilevel`).
:mod:`hierpipe.sbc.meta`
    Cases of the known-SE meta-analysis sampler
    (:mod:`hierpipe.models.gibbs_meta`).
:mod:`hierpipe.sbc.report`
    The ``results/sbc/report.html`` page of ``snakemake sbc``.

Adding a structure
------------------
Write a module ``hierpipe/sbc/<structure>.py`` that builds :class:`SBCCase`
objects and calls :func:`~hierpipe.sbc.core.register` on each at import, then
add the module's name to :data:`CASE_MODULES`. A case's ``replicate`` function
draws ``R`` parameter sets from the prior, one data set from each, and returns
the true values and ``L`` posterior draws per replication under brms names;
everything else (ranks, tests, the workflow target, the report, the CI test)
then covers it.

References
----------
Talts, S., Betancourt, M., Simpson, D., Vehtari, A. & Gelman, A. (2018).
Validating Bayesian inference algorithms with simulation-based calibration.
arXiv:1804.06788.

Säilynoja, T., Bürkner, P.-C. & Vehtari, A. (2022). Graphical test for discrete
uniformity and its applications in goodness-of-fit evaluation and multiple
sample comparison. *Statistics and Computing* 32, 32.
"""

from __future__ import annotations

# Modules that register SBC cases when imported; one a structure.
CASE_MODULES: tuple[str, ...] = (
    "hierpipe.sbc.two_level",
    "hierpipe.sbc.slopes",
    "hierpipe.sbc.multilevel",
    "hierpipe.sbc.meta",
)
