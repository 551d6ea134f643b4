"""The one base class for a user's mistake, and the exit code that reports it.

Library code anywhere in moeforge raises a `UserError` subclass (`DataError` here,
`ConfigError` in model/config.py, `CheckpointError`, `StateError`, …) with a one-line message
that names the file, key or value at fault. Every command-line entry point (`python -m train`,
`python -m train.plan`, `python -m data.prepare`, …) catches `UserError`, prints it as
`error: <message>` and exits with `EXIT_USER_ERROR`. Anything else is a bug and keeps its
traceback. The class lives in data/, the package with no heavy imports, so every other
package (model/, parallel/, train/) can import it without pulling in torch or DeepSpeed.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A user's mistake (bad input, option, configuration or file). Its message is one line."""

    default = "error"

    def __init__(self, message: str):
        # One line, always: a multi-line message from a third-party library is cut to its first line.
        lines = [s for s in str(message).strip().splitlines() if s.strip()]
        super().__init__(lines[0] if lines else self.default)


class DataError(UserError):
    """A user's data mistake (bad input, bad option, damaged dataset)."""

    default = "data error"
