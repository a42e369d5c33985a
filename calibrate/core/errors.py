"""User-facing errors. The CLI prints these as one line and exits non-zero."""


class CalibrateError(ValueError):
    """Bad input or configuration: the message names the offending key, file or value."""
