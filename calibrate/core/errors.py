"""User-facing errors. The CLI prints these as one line and exits 2; anything else is a bug
(traceback, exit 1, ``error.json`` with ``"kind": "bug"``).

``CalibrateError`` is deliberately not a ``ValueError``: an ``except ValueError`` written for
a parse (``float(text)``) must never swallow a user error, nor a user-error handler a bug.
"""

EXIT_BAD_INPUT = 2  # the user can fix it: one error line
EXIT_BUG = 1  # a defect of the program: traceback


class CalibrateError(Exception):
    """Bad input or configuration: the message names the offending key, file or value."""


def hydra_error_line(exc: Exception) -> str:
    """A Hydra/OmegaConf composition error (several lines, plus its cause) as one line:
    option lists comma-separated, ``full_key`` kept, search paths and type internals dropped."""
    segments: list[list[str]] = []  # [head, listed item, ...]
    for source in (exc, exc.__cause__):
        if source is None:
            continue
        listing = False
        for line in (raw.strip() for raw in str(source).splitlines()):
            if not line or line.startswith(("reference_type=", "object_type=", "See https://", "To append")):
                continue
            if line.startswith("Config search path"):
                break
            if line.startswith("full_key:"):
                segments.append(["key " + line.removeprefix("full_key:").strip()])
                listing = False
            elif listing and not line.endswith(":"):
                segments[-1].append(line)
            else:
                listing = line.endswith(":")
                segments.append([line.rstrip(":") if listing else line])
    text = "; ".join(head + (": " + ", ".join(items) if items else "") for head, *items in segments)
    return text or type(exc).__name__
