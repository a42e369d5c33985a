"""Lazy, once-per-process access to policyengine-us (its import takes tens of seconds)."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def tax_benefit_system():
    """The shared policyengine-us ``CountryTaxBenefitSystem`` (imported on first use)."""
    from policyengine_us import CountryTaxBenefitSystem

    return CountryTaxBenefitSystem()


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
