"""Errors of the command line: one line naming the argument, exit status 2, never a traceback.

:class:`CLIError` carries a message that already names the argument (``--vmin``, ``CKPT_A``);
:func:`condense` turns jsonargparse's multi-line parse errors into such a line.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping

#: The exit status of every usage error, as argparse uses.
USAGE_ERROR = 2

#: jsonargparse lines that explain its own machinery rather than what to fix.
_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Expected a <class 'NoneType'>",
)


_CLASS_PROBLEM = r"Problem with given class_path '([^']+)':[ \t]*\n(.*?)(?=\n\s*- Expected a <class 'NoneType'>|\Z)"


class CLIError(Exception):
    """A usage error: the message names the argument, the value and what is accepted.

    Example:
        >>> str(CLIError("--levels=1 is not valid; expected an integer >= 2."))
        '--levels=1 is not valid; expected an integer >= 2.'
    """


def _type_name(text: str) -> str:
    # "<class 'float'>" reads better as "float".
    return re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text)


def _flag(key: str, flags: Mapping[str, str]) -> str:
    head = key.split(".")[0]
    return flags.get(key) or flags.get(head) or key


def _strip_command(text: str, command: str | None) -> str:
    return text if command is None else re.sub(rf"\b{re.escape(command)}\.", "", text)


def _meaningful(text: str) -> list[str]:
    lines = [line.strip().lstrip("-").strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith(_NOISE)]


def _key_error(key: str, body: str, flags: Mapping[str, str], flag: str | None = None) -> str:
    flag = flag or _flag(key, flags)
    # The class's own complaint sits between this line and jsonargparse's "or None" alternative.
    problem = re.search(_CLASS_PROBLEM, body, flags=re.DOTALL)
    if problem:
        inner = textwrap.dedent(problem.group(2)).strip()
        nested = re.match(r'Parser key "([^"]+)":\s*(.*)', inner, flags=re.DOTALL)
        if nested:  # an init argument of the class: name it as the user typed it
            return _key_error(nested.group(1), nested.group(2), flags, f"{flag}.{nested.group(1)}")
        return f"{flag}: cannot use {problem.group(1)!r}: {_type_name((_meaningful(inner) or ['invalid'])[0])}"
    given_match = re.findall(r"(?:Given|Got) value: (.*)", body)
    given = given_match[-1].strip() if given_match else None
    literal = re.search(r"Expected a (?:typing\.)?Literal\[(.*?)\]", body)
    if given is not None and literal:
        return f"{flag}={given!r} is not valid; accepted values: {literal.group(1)}."
    expected = [t for t in re.findall(r"Expected a (<class '[^']+'>)", body) if "NoneType" not in t]
    if given is not None and expected:
        return f"{flag}={given!r} is not valid; expected {_type_name(expected[0])}."
    reasons = [x for x in _meaningful(body) if not x.startswith(("Given value", "Got value", "Expected a path but"))]
    reason = _type_name(reasons[0]) if reasons else "invalid value"
    return f"{flag}={given!r}: {reason}" if given is not None else f"{flag}: {reason}"


def first_reason(message: str) -> str:
    """The first line of a (jsonargparse) error message that says what is wrong, not how it was checked.

    Example:
        >>> first_reason("Does not validate against any of the Union subtypes\\nErrors:\\n  - negative dimension -3")
        'negative dimension -3'
    """
    lines = _meaningful(str(message))
    return lines[0] if lines else str(message).strip()


def condense(message: str, flags: Mapping[str, str], command: str | None = None) -> str:
    """One line from a jsonargparse error message, with parser keys shown as the flags a user types.

    ``flags`` maps a parser key (``num_batches``) to its flag (``--num-batches``); ``command`` is
    the subcommand whose keys carry its name as a prefix in some messages (``plot.files``).

    Example:
        >>> condense('Parser key "levels":\\n  Expected a <class \\'int\\'>. Got value: x', {"levels": "--levels"})
        "--levels='x' is not valid; expected int."
        >>> condense("the following arguments are required: plot.files", {"files": "FILE"}, "plot")
        'missing required argument: FILE'
    """
    message = _strip_command(str(message).strip(), command)
    header = re.match(r'Parser key "([^"]+)":\s*(.*)', message, flags=re.DOTALL)
    if header:
        return _key_error(header.group(1), header.group(2), flags)
    required = re.match(r"the following arguments are required: (.*)", message)
    if required:
        names = [_flag(k.strip(), flags) for k in required.group(1).split(",")]
        return f"missing required argument{'s' if len(names) > 1 else ''}: {', '.join(names)}"
    return " ".join(line.strip() for line in message.splitlines() if line.strip())
