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
import sys
import tempfile

import bash_kernel.kernel
from bash_kernel.display import build_cmds
from bash_kernel.kernel import BashKernel

from .bashenv import NAME, export_commands, restore_commands, save_commands


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
        names = [n for n in cell_env if isinstance(n, str) and NAME.match(n)]
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
