"""Report sections: each module's ``build(ctx)`` returns the template's data or None.

A section renders ``templates/sections/<name>.html.j2`` with ``s`` (what
``build`` returned) and ``ctx`` (the :class:`~hierpipe.report.context.StudyContext`).
Returning None leaves the section out (e.g. convergence for a study without
samplers). ``SECTIONS`` is the page order.
"""

SECTIONS = (
    "overview",
    "forest",
    "meta_estimators",
    "meta_tau",
    "meta_funnel",
    "meta_influence",
    "estimates",
    "fixed_effects",
    "varying_slopes",
    "shrinkage",
    "variance",
    "variance_decomposition",
    "omitted_level",
    "convergence",
    "ppc",
    "residuals",
    "cv",
    "recovery",
    "provenance",
)
