"""The bash code context's kernel: bash_kernel's BashKernel, with vmcell's per-cell settings.

The host puts `{"vmcell": {...}}` in an execute_request's metadata, as for the Python kernel
(ipython_ext.py): `session_env` (kept) and `env` (this cell only; null unsets). Values are never
spliced into code as they came: each is exported through bash's ANSI-C quoting (`$'...'`, every
byte outside printable ASCII, and every quote or backslash, as a `\\xHH` escape), and names must be
shell identifiers (others are skipped: bash cannot hold them). Per-cell ones are restored after the
cell from shell variables, whatever the cell did (an error, an interrupt).

`reseed` and `output_cap` mean nothing here (the host enforces its own output cap).
The fork server forks this kernel like the Python one (`"kernel": "bash"` in its spawn request);
`python -m vmcell_guest.bashkernel -f CONNECTION_FILE` is the exec path.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

import bash_kernel.kernel
from bash_kernel.display import build_cmds
from bash_kernel.kernel import BashKernel

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
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
        if not isinstance(name, str) or not _NAME.match(name):
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


def _display_commands_sourced() -> str:
    """bash_kernel defines its display helpers by typing them into bash line by line, each line
    waiting for the next prompt (~2.2 s under TCG, most of a context's start): written to a file
    and sourced instead, one command."""
    fd, path = tempfile.mkstemp(prefix="vmcell-bash-", suffix=".sh")
    with os.fdopen(fd, "w") as f:
        f.write(build_cmds() + "\n")
    return f"source {path}; rm -f {path}"  # mkstemp's names need no quoting


bash_kernel.kernel.build_cmds = _display_commands_sourced  # what BashKernel._start_bash runs


class VmcellBashKernel(BashKernel):
    implementation = "vmcell_bash_kernel"

    def _settings(self) -> dict:
        try:
            parent = self.get_parent("shell")
        except TypeError:  # ipykernel < 6: no channel argument
            parent = self.get_parent()
        settings = (parent or {}).get("metadata", {}).get("vmcell")
        return settings if isinstance(settings, dict) else {}

    def _run(self, commands: list[str]) -> None:
        for command in commands:
            self.bashwrapper.run_command(command)

    def do_execute(self, code, silent, store_history=True, user_expressions=None, allow_stdin=False):
        settings = self._settings()
        session_env = settings.get("session_env")
        if isinstance(session_env, dict):
            self._run(export_commands(session_env))
        cell_env = settings.get("env") if isinstance(settings.get("env"), dict) else {}
        names = [n for n in cell_env if isinstance(n, str) and _NAME.match(n)]
        if names:
            self._run(save_commands(names))
            self._run(export_commands(cell_env))
        try:
            return super().do_execute(code, silent, store_history, user_expressions, allow_stdin)
        finally:
            if names:
                try:
                    self._run(restore_commands(names))
                except Exception as exc:  # bash restarted meanwhile: its variables went with it
                    print(f"vmcell: restoring per-cell variables failed: {exc!r}", file=sys.__stderr__)


if __name__ == "__main__":
    from ipykernel.kernelapp import IPKernelApp

    IPKernelApp.launch_instance(kernel_class=VmcellBashKernel)
