"""User-facing errors. The CLI prints these as one line and exits 2; anything else is a bug
(traceback, exit 1, ``error.json`` with ``"kind": "bug"``).

``CalibrateError`` is deliberately not a ``ValueError``: an ``except ValueError`` written for
a parse (``float(text)``) must never swallow a user error, nor a user-error handler a bug.
"""

EXIT_BAD_INPUT = 2  # the user can fix it: one error line
EXIT_BUG = 1  # a defect of the program: traceback


class CalibrateError(Exception):
    """Bad input or configuration: the message names the offending key, file or value."""
