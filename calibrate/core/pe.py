"""Lazy, once-per-process access to policyengine-us (its import takes tens of seconds)."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def tax_benefit_system():
    """The policyengine-us ``CountryTaxBenefitSystem`` its simulations use (imported on first use).

    The instance policyengine-us builds at import, not a second one: another would cost about
    30 s and 0.6 GB more per process, and its parameter caches would not be the simulations'.
    """
    from policyengine_us.system import system

    return system


def microsimulation(dataset):
    """A policyengine-us ``Microsimulation`` over ``dataset`` (a path or Dataset)."""
    from policyengine_us import Microsimulation

    return Microsimulation(dataset=str(dataset) if not isinstance(dataset, type) else dataset)


def variable(name: str):
    """The policyengine-us variable ``name``, or ``None`` when it does not exist."""
    return tax_benefit_system().variables.get(name)


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour shapes a run's results."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("calibrate", "policyengine-us", "policyengine-core", "jax", "jaxlib", "numpy", "scipy", "hydra-core"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def target_variable(name: str):
    """A variable targets and constraints may name: policyengine-us's own, or a derived household
    variable (:mod:`calibrate.core.derived`); ``None`` when neither exists."""
    from calibrate.core.derived import derived

    return derived(name) or variable(name)
