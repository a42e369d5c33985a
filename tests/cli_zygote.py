"""Test helper: a process that imports policyengine-us once and forks CLI runs from it.

``python -m calibrate`` pays the policyengine-us import (30-100 s on 2 busy cores) before its
first simulation; the fault tests need about ten runs that simulate. This process imports
it (and runs one small simulation to pay policyengine's first-simulation warm-up) and then,
for each request read from stdin as one JSON line ``{"module", "args", "env", "log"}``,
forks a child that runs ``python -m <module> <args>`` in-process: ``runpy.run_module(module,
run_name="__main__")`` with ``sys.argv`` and the environment set as given, stdout and stderr
to ``log``. The child is a real process (it can SIGKILL itself); the reply is one JSON line
``{"pid", "returncode"}`` with ``returncode = -signal`` when it was killed, as ``subprocess``
reports it. The matrix build forks its workers the same way (after the import in the parent).
JAX is not imported here, so each child sets its device up as a fresh process does.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _child(request: dict) -> int:
    os.setsid()  # its own process group: the test can clean up anything it leaves
    with open(request["log"], "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ.update(request.get("env", {}))
    sys.argv = [request["module"], *request["args"]]
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except BaseException:  # noqa: BLE001 - report like the interpreter would
        traceback.print_exc()
        return 1
    return 0


def main() -> None:
    sys.path.insert(0, str(REPO_ROOT))
    os.chdir(REPO_ROOT)
    from calibrate.core import paths, pe

    pe.tax_benefit_system()
    pe.microsimulation(paths.FIXTURE_DATASET).calculate("snap", 2024)  # first-simulation warm-up
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(request)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        try:
            os.killpg(pid, signal.SIGKILL)  # leftovers of the child's group (none with workers=1)
        except (ProcessLookupError, PermissionError):
            pass
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"pid": pid, "returncode": code}), flush=True)


if __name__ == "__main__":
    main()
