"""The one exception type the data package raises for a user's mistake.

Library code raises `DataError` with a one-line message that names the file, key or value at
fault; the command-line entry points (`python -m data.prepare`, `python -m data.train_tokenizer`,
`python -m data.verify`) print it as `error: <message>` and exit with code 2, and the trainer
does the same before any process group exists. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DataError(ValueError):
    """A user's data mistake (bad input, bad option, damaged dataset). Its message is one line."""

    def __init__(self, message: str):
        # One line, always: a multi-line message from a third-party library is cut to its first line.
        lines = [s for s in str(message).strip().splitlines() if s.strip()]
        super().__init__(lines[0] if lines else "data error")
