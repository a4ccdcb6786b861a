"""`vmcell bench contexts`: what a code context costs on this machine, in-process.

On one warm session, `--runs` times for each language (python, bash; interleaved): create a context
(`session.create_context`: the guest forks a kernel from its warm fork server, the host waits for
its kernel_info answer), run a first cell in it, remove it. Host-timed p50/p95 of each step.
"""

from __future__ import annotations

import time

from .bench import Stats
from .config import DEFAULT_TEMPLATE
from .errors import VmcellError

CELLS = {"python": ("1 + 1", "2"), "bash": ("echo $((1 + 1))", "2")}


class BenchError(VmcellError):
    pass


async def bench_contexts(runs: int, template: str = DEFAULT_TEMPLATE, progress=None) -> dict:
    from .sessions import SessionManager

    note = progress or (lambda line: None)
    samples: dict[str, list[float]] = {f"{lang}_{step}": [] for lang in CELLS for step in ("create", "first_cell",
                                                                                              "remove")}
    async with SessionManager(max_sessions=1) as manager:
        session = await manager.create(template)
        try:
            accel = session.template.accel.name
            languages = [lang for lang in CELLS if lang in session.template.spec.kernels]
            for run in range(runs + 1):  # the first round warms both paths (TCG translation) and is not kept
                for language in languages:
                    start = time.perf_counter()
                    context = await session.create_context(language)
                    created = time.perf_counter()
                    code, want = CELLS[language]
                    result = await session.execute(code, context=context.id)
                    answered = time.perf_counter()
                    text = result.text if language == "python" else "".join(result.logs.stdout).strip()
                    if result.error is not None or text != want:
                        raise BenchError(f"{language} context answered {text!r} / {result.error!r}, not {want!r}")
                    await session.remove_context(context.id)
                    removed = time.perf_counter()
                    if run:
                        samples[f"{language}_create"].append((created - start) * 1000)
                        samples[f"{language}_first_cell"].append((answered - created) * 1000)
                        samples[f"{language}_remove"].append((removed - answered) * 1000)
                    note(f"run {run}/{runs} {language}: create {(created - start) * 1000:.0f} ms, first cell "
                         f"{(answered - created) * 1000:.0f} ms{'' if run else ' (warm-up, not kept)'}")
        finally:
            await session.close("the bench is over")
    return {"accel": accel, "runs": runs, "template": template,
            **{name: Stats(values).summary() for name, values in samples.items() if values}}
