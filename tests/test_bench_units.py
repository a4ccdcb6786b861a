"""Pure logic of the benchmarks (bench_load's cell mix and answer check) and of the guest's lean
stream flush (lean_flush.py, with a stand-in for ipykernel's IOPub thread: its ordering promise is
what is tested here; the real kernel's output order is tested through VMs in test_kernel.py) and
lean execute (lean_execute.py; through VMs in test_kernel.py too)."""

import ast
import base64
import threading
from collections import defaultdict, deque
from io import StringIO

import pytest

from interpreter.bench_load import PNG_MAGIC, Cell, cell_mix, check_answer
from vmcell_guest import lean_execute, lean_flush

PNG = base64.b64encode(PNG_MAGIC + b"rest of the image").decode()


def _answer(cell: Cell) -> dict:
    """What a correct ExecutionResult for `cell` looks like (the server's JSON shape)."""
    results = []
    if cell.text is not None:
        results.append({"text": cell.text, "is_main_result": True})
    if cell.png:
        results.append({"png": PNG, "text": "<Figure size 300x200 with 1 Axes>", "is_main_result": False})
    return {"results": results, "logs": {"stdout": [cell.stdout] if cell.stdout else [], "stderr": []},
            "error": None}


def test_cell_mix_is_valid_python_with_answers_unique_per_session_and_round():
    seen = {}
    for session in range(50):
        for round_no in range(5):
            cells = cell_mix(session, round_no)
            assert [c.kind for c in cells] == ["trivial", "pandas", "plot"]
            for cell in cells:
                ast.parse(cell.code)
                assert check_answer(cell, _answer(cell)) is None
                expected = (cell.text, cell.stdout)
                # No other session's or round's cell of this kind expects the same answer: a reply
                # delivered to the wrong session is caught as garbled, not counted as right.
                assert seen.setdefault((cell.kind, expected), (session, round_no)) == (session, round_no)
    trivial, pandas, plot = cell_mix(3, 2)
    assert eval(trivial.code) == int(trivial.text)  # noqa: S307 - our own literal arithmetic
    assert pandas.text == str(sum(range(10 + 15 + 2)))
    assert plot.png and plot.stdout == "plot-3-2\n" and plot.text is None


def test_check_answer_names_what_is_wrong():
    trivial, pandas, plot = cell_mix(1, 0)
    error = {"results": [], "logs": {"stdout": [], "stderr": []},
             "error": {"name": "NameError", "value": "name 'pd' is not defined", "traceback": []}}
    assert check_answer(pandas, error).startswith("error NameError")
    wrong = _answer(trivial) | {"results": [{"text": "41", "is_main_result": True}]}
    assert "main result ['41']" in check_answer(trivial, wrong)
    # A display_data with the right text is not the main result.
    shown = _answer(trivial) | {"results": [{"text": trivial.text, "is_main_result": False}]}
    assert "main result []" in check_answer(trivial, shown)
    other_stdout = _answer(plot) | {"logs": {"stdout": ["plot-2-0\n"], "stderr": []}}
    assert "stdout" in check_answer(plot, other_stdout)
    split_stdout = _answer(plot) | {"logs": {"stdout": ["plot-1", "-0\n"], "stderr": []}}
    assert check_answer(plot, split_stdout) is None  # stream chunks join up
    assert "0 PNG" in check_answer(plot, _answer(plot) | {"results": []})
    two = _answer(plot) | {"results": [{"png": PNG}, {"png": PNG}]}
    assert "2 PNG" in check_answer(plot, two)
    not_png = _answer(plot) | {"results": [{"png": base64.b64encode(b"GIF89a...").decode()}]}
    assert "expected one PNG" in check_answer(plot, not_png)
    assert check_answer(plot, _answer(plot) | {"results": [{"png": "***not base64***"}]}) == \
        "a PNG result that is not base64"


# ---- lean_flush ----------------------------------------------------------------------------------


class _FakeIOPubThread:
    """ipykernel's IOPubThread in miniature: schedule() queues, the test runs the queue (the thread)."""

    def __init__(self):
        self.events = deque()
        self.sent: list[str] = []
        self.thread = threading.Thread(target=lambda: None)  # never run: ident differs from ours
        self.wakeups = 0
        self.alive = True
        self.thread.is_alive = lambda: self.alive

    def schedule(self, f):
        self.wakeups += 1
        self.events.append(f)

    def run_pending(self):
        while self.events:
            self.events.popleft()()


class _FakeStream:
    echo = None
    flush_timeout = 0.5
    after_taking_buffers = staticmethod(lambda: None)

    def __init__(self, pub, name):
        self.pub_thread, self.name = pub, name
        self._buffers = defaultdict(StringIO)

    def write(self, text):
        self._buffers["parent"].write(text)

    def _flush(self):
        buffers, self._buffers = self._buffers, defaultdict(StringIO)
        self.after_taking_buffers()
        for buffer in buffers.values():
            data = buffer.getvalue()
            self.pub_thread.schedule(lambda data=data: self.pub_thread.sent.append(f"{self.name}:{data}"))


def _flush_in_background(stream, pub) -> threading.Thread:
    """stream.flush() on another thread, with `pub`'s queue run until it returns (the IOPub thread)."""
    flusher = threading.Thread(target=stream.flush)
    flusher.start()
    while flusher.is_alive():
        pub.run_pending()
        flusher.join(0.001)
    return flusher


def test_lean_flush_skips_only_a_flush_that_cannot_change_anything():
    pub = _FakeIOPubThread()
    out, err = _FakeStream(pub, "stdout"), _FakeStream(pub, "stderr")
    lean = lean_flush.install([out, err])
    assert lean is not None
    out.flush()  # nothing written, nothing queued: no wake-up at all
    assert pub.wakeups == 0
    out.write("a")
    _flush_in_background(out, pub)
    assert pub.sent == ["stdout:a"]  # the data reached the socket before flush returned
    assert pub.wakeups == 2  # one flush event (not ipykernel's two), then the send it scheduled
    err.flush()
    assert pub.wakeups == 2
    # A message queued for the IOPub thread and not yet sent: a flush must wait for it.
    pub.schedule(lambda: pub.sent.append("execute_result"))
    assert not lean.idle(out)
    _flush_in_background(out, pub)
    assert pub.sent[-1] == "execute_result"
    assert lean.idle(out)


def test_lean_flush_sees_a_timed_flush_under_way_on_the_iopub_thread():
    """ipykernel's timer calls _flush on the IOPub thread: once it has taken the buffers they look
    empty, but its sends are not queued yet; a main-thread flush checking then must not skip."""
    pub = _FakeIOPubThread()
    out = _FakeStream(pub, "stdout")
    lean = lean_flush.install([out])
    checks = []
    out.after_taking_buffers = lambda: checks.append(lean.idle(out))
    out.write("x")
    out._flush()  # the timer's call (the wrapped _flush, as ipykernel looks it up on the instance)
    assert checks == [False]
    assert not lean.idle(out)  # its send is queued
    pub.run_pending()
    assert pub.sent == ["stdout:x"] and lean.idle(out)


def test_lean_flush_flushes_inline_without_a_live_iopub_thread_and_uninstalls():
    pub = _FakeIOPubThread()
    out = _FakeStream(pub, "stdout")
    lean = lean_flush.install([out])
    pub.alive = False  # a forked child, or shutdown: ipykernel flushes on the calling thread
    out.write("late")
    out.flush()
    pub.run_pending()
    assert pub.sent == ["stdout:late"]
    lean.uninstall()
    assert "flush" not in vars(out) and "_flush" not in vars(out) and "schedule" not in vars(pub)


def test_lean_flush_leaves_streams_it_does_not_know_alone():
    assert lean_flush.install([StringIO()]) is None


# ---- lean_execute ---------------------------------------------------------------------------------

class _CountingShell:
    """IPython's transform_cell and event manager, counted."""

    def __init__(self):
        from IPython.core.events import EventManager, available_events

        self.events = EventManager(self, available_events)
        self.transforms = []
        self.suffix = "\n"

    def transform_cell(self, raw_cell):
        self.transforms.append(raw_cell)
        if raw_cell == "bad":
            raise SyntaxError("no")
        return raw_cell + self.suffix


def test_lean_execute_transforms_each_execution_once_and_never_reuses_across_executions():
    shell = _CountingShell()
    lean = lean_execute.install(shell)
    # ipykernel's pattern: do_execute transforms, then run_cell transforms the same code again.
    assert shell.transform_cell("1+1") == "1+1\n" and shell.transform_cell("1+1") == "1+1\n"
    assert shell.transforms == ["1+1"]
    shell.transform_cell("1+1")  # a third call is a fresh one
    assert shell.transforms == ["1+1", "1+1"]
    shell.events.trigger("post_execute")
    # A transformer a cell added applies from the next execution, even for the same code.
    shell.suffix = "  # new\n"
    assert shell.transform_cell("1+1") == "1+1  # new\n"
    assert shell.transform_cell("2+2") == "2+2  # new\n" and shell.transforms[-2:] == ["1+1", "2+2"]
    shell.events.trigger("post_execute")
    for _ in range(2):  # an error is not remembered: the repeat raises again
        with pytest.raises(SyntaxError):
            shell.transform_cell("bad")
    assert shell.transforms.count("bad") == 2
    lean.uninstall()
    shell.transform_cell("x"), shell.transform_cell("x")
    assert shell.transforms[-2:] == ["x", "x"]


def test_lean_execute_caches_ipykernels_signature_check_per_function():
    from ipykernel import ipkernel

    real = ipkernel._accepts_parameters
    lean = lean_execute.install(_CountingShell())
    try:
        class A:
            def run(self, code, cell_id=None):
                pass

        class B:
            def run(self, code):
                pass

        assert ipkernel._accepts_parameters(A().run, ["cell_id"]) == {"cell_id": True}
        assert ipkernel._accepts_parameters(A().run, ["cell_id"]) == {"cell_id": True}
        assert ipkernel._accepts_parameters(B().run, ["cell_id"]) == {"cell_id": False}
    finally:
        lean.uninstall()
    assert ipkernel._accepts_parameters is real


# ---- bench ab ---------------------------------------------------------------------------------------

def test_bench_ab_pairs_rounds_and_gives_other_checkouts_their_own_home(tmp_path):
    from interpreter.bench_ab import check_checkout, checkout_home, paired
    from interpreter.bench_api import BenchError
    from interpreter.config import REPO_ROOT

    assert paired([0.10, 0.12, 0.09], [0.07, 0.13, 0.05]) == {"a_minus_b_median": 0.03, "b_cheaper_in": "2/3"}
    other = tmp_path / "old"
    (other / "interpreter").mkdir(parents=True)
    (other / "interpreter" / "cli.py").write_text("")
    (other / "guest").mkdir()
    assert check_checkout(other) == other.resolve()
    with pytest.raises(BenchError, match="not a vmcell checkout"):
        check_checkout(tmp_path / "nothing")
    home = tmp_path / "home"
    own = checkout_home(other, home)
    assert own.parent == home / "ab" and own == checkout_home(other, home)  # stable
    assert (own / "images").resolve() == (home / "images").resolve() and not (own / "templates").exists()
    assert checkout_home(REPO_ROOT, home) == home
