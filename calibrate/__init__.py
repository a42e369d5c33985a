"""calibrate: geo-stacked L0 calibration of US household weights to congressional-district targets."""

__version__ = "0.1.0"
