"""`key=value` command lines parsed into a dataclass, and the wrapper that turns errors into one line.

Hydra-style arguments without Hydra: the entry points here are small tools that write into
folders the user names, so they must not create Hydra's output directories or change the
working directory. A field's annotation gives its type; an unknown key or an unparsable value
is a one-line `DataError` naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from collections.abc import Callable, Sequence

from .errors import EXIT_USER_ERROR, DataError, UserError

EXIT_INTERRUPTED = 130

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _convert(key: str, raw: str, kind: type):
    if kind is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise DataError(f"{key}={raw!r}: expected true or false")
    if kind is int:
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            raise DataError(f"{key}={raw!r}: expected an integer") from None
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            raise DataError(f"{key}={raw!r}: expected a number") from None
    return raw


def parse_args(argv: Sequence[str], schema: type, positional: str | None = None):
    """Build `schema` (a dataclass) from `key=value` strings.

    `positional` names the field that a single bare argument fills (e.g. `verify PATH`).
    Fields without a default are required.
    """
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    values: dict[str, object] = {}
    for arg in argv:
        if "=" not in arg:
            if positional and positional not in values:
                values[positional] = arg
                continue
            raise DataError(f"{arg!r}: arguments are key=value pairs (keys: {', '.join(fields)})")
        key, raw = arg.split("=", 1)
        key = key.strip().lstrip("+")
        if key not in fields:
            raise DataError(f"{key}: unknown key (known: {', '.join(fields)})")
        if key in values:
            raise DataError(f"{key}: given twice")
        values[key] = _convert(key, raw, hints[key])
    for name, f in fields.items():
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default and name not in values:
            raise DataError(f"{name}: required (e.g. {name}=…)")
    return schema(**values)


def usage(doc: str | None, schema: type) -> str:
    """The module docstring and each key with its default, for `--help`."""
    lines = [(doc or "").strip(), "", "keys:"]
    for f in dataclasses.fields(schema):
        default = "(required)" if f.default is dataclasses.MISSING else repr(f.default)
        lines.append(f"  {f.name}={default}")
    return "\n".join(lines)


def start(argv: Sequence[str], doc: str | None, schema: type):
    """Common start of a data CLI: quiet `datasets` (no torch import, errors as our one line); the
    parsed config, or None after printing usage for -h/--help."""
    os.environ.setdefault("USE_TORCH", "0")  # keep `datasets` from importing torch (2 s) for nothing
    os.environ.setdefault("DATASETS_VERBOSITY", "critical")
    if any(a in ("-h", "--help") for a in argv):
        print(usage(doc, schema))
        return None
    return parse_args(argv, schema)


def run(main: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)`; a UserError or an OS error becomes `error: …` on stderr and exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # disk full, permission denied, … : the user's environment, not a bug
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted; re-run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
