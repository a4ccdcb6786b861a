"""Per-cell work ipykernel does twice, done once.

ipykernel 6.29's `do_execute` runs IPython's `transform_cell` on the code to ask `should_run_async`,
and then, for every cell without a top-level `await`, calls `run_cell(code)`, which transforms the
same code again. It also asks `inspect.signature` whether `run_cell` takes a `cell_id`, on every
cell. Under TCG these cost ~1.4 ms and ~0.6 ms of guest CPU per cell (docs/performance.md).

Here the shell's `transform_cell` keeps its last answer for the one call that repeats it: the
first call of an execution stores (code, result); the next call with the same code takes it (and
so the result is used at most twice, as ipykernel would have computed it twice); `post_execute`
drops whatever is left, so a result never outlives its execution (input transformers a cell adds
apply from the next cell, as before). A transform that raises stores nothing and raises again on
the repeat, as before. ipykernel's `_accepts_parameters` answers from a cache keyed by the
function (a method's signature does not change while the kernel runs).

Both are patched on the shell instance and ipykernel's module; `uninstall()` puts the originals back.
"""

from __future__ import annotations


class LeanExecute:
    def __init__(self, shell) -> None:
        self.shell = shell
        self._last: tuple[str, object] | None = None
        self._saved_accepts = None

    def install(self) -> None:
        real_transform = self.shell.transform_cell

        def transform_cell(raw_cell: str):
            last, self._last = self._last, None
            if last is not None and last[0] == raw_cell:
                return last[1]
            result = real_transform(raw_cell)
            self._last = (raw_cell, result)
            return result

        self.shell.transform_cell = transform_cell
        self.shell.events.register("post_execute", self.forget)
        try:
            from ipykernel import ipkernel
        except ImportError:
            return
        real_accepts = getattr(ipkernel, "_accepts_parameters", None)
        if real_accepts is None:
            return
        answers: dict[tuple, dict] = {}

        def accepts_parameters(meth, param_names):
            key = (getattr(meth, "__func__", meth), tuple(param_names))
            if key not in answers:
                answers[key] = real_accepts(meth, param_names)
            return dict(answers[key])

        self._saved_accepts = (ipkernel, real_accepts)
        ipkernel._accepts_parameters = accepts_parameters

    def forget(self) -> None:
        self._last = None

    def uninstall(self) -> None:
        self._last = None
        try:
            del self.shell.transform_cell  # the class's method again
        except AttributeError:
            pass
        try:
            self.shell.events.unregister("post_execute", self.forget)
        except ValueError:
            pass
        if self._saved_accepts is not None:
            module, real = self._saved_accepts
            module._accepts_parameters = real
            self._saved_accepts = None


def install(shell) -> LeanExecute:
    lean = LeanExecute(shell)
    lean.install()
    return lean
