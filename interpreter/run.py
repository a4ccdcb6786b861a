"""`vmcell run 'CODE' ...`: cells in one fresh session, printed as they stream.

Streams go to stdout/stderr as they arrive; results print their text; images (PNG, JPEG, SVG, PDF)
are written to files whose paths are printed instead, because a terminal cannot show them.
Without --url the session is a VM started right here; with --url it is one on a vmcell server.
"""

from __future__ import annotations

import base64
import binascii
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .kernel.results import ExecutionError, Result
from .progress import Progress

# Result fields written to files, with their extension; base64 for binary formats, as Jupyter sends them.
IMAGE_FORMATS = {"png": ("png", True), "jpeg": ("jpg", True), "svg": ("svg", False), "pdf": ("pdf", True)}
# What a result prints when it has no file to write, best first.
TEXT_FORMATS = ("text", "markdown", "latex", "html", "json")


@dataclass
class CellPrinter:
    """Prints one session's cells; remembers the files it wrote and whether any cell failed."""

    out_dir: Path
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)
    written: list[Path] = field(default_factory=list)
    failed: bool = False

    def on_stdout(self, text) -> None:
        self.stdout.write(str(text))
        self.stdout.flush()

    def on_stderr(self, text) -> None:
        self.stderr.write(str(text))
        self.stderr.flush()

    def on_result(self, result: Result) -> None:
        images = [(name, *IMAGE_FORMATS[name]) for name in IMAGE_FORMATS if getattr(result, name) is not None]
        for name, extension, is_base64 in images:
            value = getattr(result, name)
            try:  # the guest is untrusted: its "base64" may not be
                data = base64.b64decode(value, validate=True) if is_base64 else value.encode()
            except (binascii.Error, ValueError):
                print(f"[{name}: not valid base64, not written]", file=self.stdout, flush=True)
                continue
            path = self._new_file(extension)
            path.write_bytes(data)
            self.written.append(path)
            print(f"[{name}] {path}", file=self.stdout, flush=True)
        if images:
            return  # the text of an image result is only its repr ("<Figure size ...>")
        for name in TEXT_FORMATS:
            value = getattr(result, name)
            if value is not None:
                print(value if isinstance(value, str) else repr(value), file=self.stdout, flush=True)
                return
        if result.extra:
            print(f"[result in {', '.join(result.extra)}: not printable]", file=self.stdout, flush=True)

    def on_error(self, error: ExecutionError) -> None:
        self.failed = True
        print("\n".join(error.traceback) if error.traceback else f"{error.name}: {error.value}",
              file=self.stderr, flush=True)

    def _new_file(self, extension: str) -> Path:
        """output-N.ext with the first N not taken: never overwrite a file the user already has."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        n = len(self.written) + 1
        while (path := self.out_dir / f"output-{n}.{extension}").exists():
            n += 1
        return path


async def run_cells_locally(cells: list[str], printer: CellPrinter, template: str, env: dict[str, str],
                            timeout: float | None, progress: Progress) -> None:
    """Each cell in turn in one session of a VM started here (the template is built first if missing)."""
    from .sessions import SessionManager
    from .templates import build_template
    from .vm import QemuBackend

    backend = QemuBackend()
    await build_template(template, backend, progress)  # builds only what is missing
    async with SessionManager(backend) as manager:
        session = await manager.create(template, env=env)
        handlers = {"stdout": printer.on_stdout, "stderr": printer.on_stderr, "result": printer.on_result,
                    "error": printer.on_error}
        for code in cells:
            async for event in session.stream(code, timeout=timeout):
                if event.type in handlers:
                    handlers[event.type](event.data)
            if printer.failed:
                return  # like a notebook run: later cells may depend on the one that failed


def run_cells_on_server(cells: list[str], printer: CellPrinter, template: str, env: dict[str, str],
                        timeout: float | None, url: str, token: str | None) -> None:
    from .client import Sandbox

    with Sandbox.create(template=template, envs=env, base_url=url, token=token) as sandbox:
        for code in cells:
            sandbox.run_code(code, on_stdout=printer.on_stdout, on_stderr=printer.on_stderr,
                             on_result=printer.on_result, on_error=printer.on_error, timeout=timeout)
            if printer.failed:
                return
