"""Stage ``uncertainty``: replicate weights and the standard errors / margins of error they give.

After the main fit, each replicate perturbs the households (a survey bootstrap within state
strata) and repeats the minimum-distance calibration on the main weights' nonzero pattern
(:mod:`calibrate.uncertainty.replicates`); the spread of the replicate estimates is the
standard error (:mod:`calibrate.uncertainty.variance`). See docs/uncertainty.md.
"""

from calibrate.uncertainty.config import METHODS, UncertaintyConfig, UncertaintyConfigError, validate_uncertainty
from calibrate.uncertainty.variance import MOE90_Z, replicate_se

__all__ = ["METHODS", "MOE90_Z", "UncertaintyConfig", "UncertaintyConfigError", "replicate_se",
           "validate_uncertainty"]
