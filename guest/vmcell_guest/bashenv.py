"""Env variables for the bash kernel as data (bashkernel.py): bash commands that set, save and restore
them without splicing a raw value into code. Stdlib only (the host's tests import it).

Values go through bash's ANSI-C quoting (`$'...'`): every byte outside printable ASCII, and every
quote or backslash, as a `\\xHH` escape, so the word expands to exactly the value's UTF-8 bytes.
Names must be shell identifiers (others are skipped: bash cannot hold them); a value with a NUL is
skipped (bash cannot hold it either).
"""

from __future__ import annotations

import re

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SAFE = frozenset(range(0x20, 0x7F)) - {ord("\\"), ord("'")}
_SAVED = "__vmcell_saved_"  # prefix of the shell variables that hold a per-cell variable's old value


def bash_quote(value: str) -> str:
    """`value` as one bash word that expands to exactly its UTF-8 bytes (no NUL: bash cannot hold it)."""
    if "\0" in value:
        raise ValueError("a bash variable cannot hold a NUL byte")
    return "$'" + "".join(chr(b) if b in _SAFE else f"\\x{b:02x}"
                          for b in value.encode("utf-8", "surrogateescape")) + "'"


def export_commands(env: dict) -> list[str]:
    """Commands that export (or unset, for None) each variable; bad names and values are skipped."""
    commands = []
    for name, value in env.items():
        if not isinstance(name, str) or not NAME.match(name):
            continue
        if value is None:
            commands.append(f"unset {name}")
        elif isinstance(value, str) and "\0" not in value:
            commands.append(f"export {name}={bash_quote(value)}")
    return commands


def save_commands(names: list[str]) -> list[str]:
    """Before a cell's per-cell variables are set: remember whether each was set, and its value."""
    return [f'{_SAVED}set_{name}="${{{name}+x}}"; {_SAVED}{name}="${{{name}-}}"' for name in names]


def restore_commands(names: list[str]) -> list[str]:
    return [f'if [ -n "${_SAVED}set_{name}" ]; then export {name}="${_SAVED}{name}"; else unset {name}; fi; '
            f'unset {_SAVED}set_{name} {_SAVED}{name}' for name in names]
