"""E2B Code Interpreter's own test behaviours (its python/tests: basic, statefulness, callbacks,
streaming, display data, data, custom repr, execution count, bash `!pwd`, interrupt, kill,
reconnect, env vars, images, charts, json), ported to vmcell's SDK with only the import changed,
against a real server with real microVMs. Each test runs with the sync Sandbox (in a thread) and
the AsyncSandbox, written once: `sbx` awaits either.

Where vmcell differs on purpose the assertion says so (README "E2B -> vmcell"): `!pwd` is /root
(E2B: /home/user); a cell past its `timeout` ends with error CellTimeout instead of raising
TimeoutException; a sandbox killed mid-cell raises SessionClosedError (E2B: TimeoutException).
Code contexts, `test_cwd` and the bash kernel's env vars are here too (E2B's contexts and
env-var tests); tests/test_contexts.py covers contexts further. Left out: the JS/R/Java/Deno
kernels (vmcell's default template has python and bash) and systemd/supervisord supervision of
E2B's own server.
"""

import asyncio
import base64
import io
import json

import pytest
from PIL import Image

from interpreter.client import (  # was: from e2b_code_interpreter import ...
    AsyncSandbox,
    BarChart,
    BoxAndWhiskerChart,
    Chart,
    ChartType,
    LineChart,
    PieChart,
    Sandbox,
    ScatterChart,
    NotFoundError,
    SessionClosedError,
    SuperChart,
)
from tests.conftest import TOKEN

pytestmark = pytest.mark.vm


class InThread:
    """The sync Sandbox behind the async interface of these tests: every call runs in a thread
    (the server runs on this test's event loop)."""

    def __init__(self, target):
        self._target = target

    def __getattr__(self, name):
        attr = getattr(self._target, name)
        if name in ("files", "commands"):
            return InThread(attr)
        if callable(attr):
            return lambda *args, **kwargs: asyncio.to_thread(attr, *args, **kwargs)
        return attr


async def open_sandbox(kind: str, api, **kwargs):
    if kind == "sync":
        return InThread(await asyncio.to_thread(Sandbox.create, base_url=api.url, token=TOKEN, **kwargs))
    return await AsyncSandbox.create(base_url=api.url, token=TOKEN, **kwargs)


@pytest.fixture(params=["sync", "async"])
async def sbx(request, api):
    sandbox = await open_sandbox(request.param, api)
    sandbox.kind = request.param
    yield sandbox
    await sandbox.kill()


@pytest.fixture
async def async_sandbox(api):
    sandbox = await AsyncSandbox.create(base_url=api.url, token=TOKEN)
    yield sandbox
    await sandbox.kill()


def appender(items, kind):
    """A callback as each SDK takes it: plain for sync, a coroutine for async (E2B's async tests do that)."""
    if kind == "sync":
        return items.append

    async def append(item):
        items.append(item)

    return append


# ---- basic, statefulness, callbacks, streaming -------------------------------------------------


async def test_basic(sbx):
    result = await sbx.run_code("x =1; x")
    assert result.text == "1"


async def test_stateful(sbx):
    await sbx.run_code("x = 1")
    result = await sbx.run_code("x+=1; x")
    assert result.text == "2"


async def test_callbacks(sbx):
    results, errors, stdout, stderr = [], [], [], []
    execution = await sbx.run_code("x = 1;x", on_result=appender(results, sbx.kind))
    assert len(results) == 1 and execution.results[0].text == "1"
    execution = await sbx.run_code("xyz", on_error=appender(errors, sbx.kind))
    assert len(errors) == 1 and execution.error.name == "NameError"
    execution = await sbx.run_code("print('Hello from e2b')", on_stdout=appender(stdout, sbx.kind))
    assert len(stdout) == 1 and execution.logs.stdout == ["Hello from e2b\n"]
    execution = await sbx.run_code('import sys;print("This is an error message", file=sys.stderr)',
                                   on_stderr=appender(stderr, sbx.kind))
    assert len(stderr) == 1 and execution.logs.stderr == ["This is an error message\n"]


async def test_streaming(sbx):
    out, err, results = [], [], []
    await sbx.run_code("print(1)", on_stdout=out.append)
    assert len(out) == 1 and out[0].line == "1\n"
    await sbx.run_code("import sys;print(1, file=sys.stderr)", on_stderr=err.append)
    assert len(err) == 1 and err[0].line == "1\n"
    code = """
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.linspace(0, 20, 100)
    y = np.sin(x)

    plt.plot(x, y)
    plt.show()

    x
    """
    await sbx.run_code(code, on_result=results.append)
    assert len(results) == 2


# ---- display data, data, custom repr, execution count, bash ------------------------------------


async def test_display_data(sbx):
    result = await sbx.run_code("""
        import matplotlib.pyplot as plt
        import numpy as np

        x = np.linspace(0, 20, 100)
        y = np.sin(x)

        plt.plot(x, y)
        plt.show()
        """)
    data = result.results[0]
    assert data.png
    assert data.text
    assert Image.open(io.BytesIO(base64.b64decode(data.png))).format == "PNG"


async def test_data(sbx):
    result = await sbx.run_code("""
        import pandas as pd
        pd.DataFrame({"a": [1, 2, 3]})
        """)
    data = result.results[0]
    assert data.data
    assert "a" in data.data
    assert len(data.data["a"]) == 3
    assert data.data == {"a": [1, 2, 3]} and "data" in data.formats() and data["data"] is data.data


async def test_custom_repr_object(sbx):
    execution = await sbx.run_code("""
from IPython.display import display

display({'text/latex': r'\\text{CustomReprObject}'}, raw=True)
""")
    assert execution.results[0].formats() == ["latex"]


async def test_execution_count(sbx):
    await sbx.run_code("echo 'E2B is awesome!'")
    result = await sbx.run_code("!pwd")
    assert result.execution_count == 2


async def test_bash_in_python(sbx):
    result = await sbx.run_code("!pwd")
    assert "".join(result.logs.stdout).strip() == "/root"  # E2B: /home/user


# ---- interrupt, kill, reconnect ------------------------------------------------------------------


async def test_subsequent_execution_works_after_timeout(sbx):
    late = await sbx.run_code("import time; time.sleep(30)", timeout=3)
    assert late.error.name == "CellTimeout"  # E2B raises TimeoutException; the cell is interrupted either way
    result = await sbx.run_code("1 + 1", timeout=10)
    assert result.text == "2"


async def test_run_code_raises_when_sandbox_is_killed_during_execution(sbx):
    execution = asyncio.ensure_future(sbx.run_code("import time; time.sleep(60)"))
    await asyncio.sleep(2)
    await sbx.kill()
    with pytest.raises(SessionClosedError):  # E2B: TimeoutException
        await execution


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_reconnect(api, kind):
    first = await open_sandbox(kind, api)
    try:
        if kind == "sync":
            again = InThread(await asyncio.to_thread(Sandbox.connect, first.sandbox_id, base_url=api.url, token=TOKEN))
        else:
            again = await AsyncSandbox.connect(first.sandbox_id, base_url=api.url, token=TOKEN)
        result = await again.run_code("x =1; x")
        assert result.text == "1"
    finally:
        await first.kill()


# ---- env vars ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_env_vars(api, kind):
    sandbox = await open_sandbox(kind, api, envs={"FOO": "bar", "SBX": "value"})
    try:
        assert (await sandbox.run_code("import os; os.getenv('FOO')")).text == "bar"
        assert (await sandbox.run_code("import os; os.getenv('ONCE')", envs={"ONCE": "bar"})).text == "bar"
        assert (await sandbox.run_code("import os; os.getenv('ONCE')")).text is None
        await sandbox.run_code("import os; os.environ['FOO'] = 'bar'; os.environ['RUNTIME_ENV'] = 'value'")
        assert (await sandbox.run_code("import os; os.getenv('FOO')", envs={"FOO": "baz"})).text == "baz"
        assert (await sandbox.run_code("import os; os.getenv('RUNTIME_ENV')")).text == "value"
        assert (await sandbox.run_code("import os; os.getenv('SBX')")).text == "value"
        assert (await sandbox.run_code("import os; os.getenv('FOO')")).text == "bar"
    finally:
        await sandbox.kill()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_env_vars_in_bash(api, kind):
    sandbox = await open_sandbox(kind, api, envs={"SBX": "value"})
    try:
        result = await sandbox.run_code("echo $SBX", language="bash")
        assert result.logs.stdout == ["value\n"]
        result = await sandbox.run_code("echo $ONCE", language="bash", envs={"ONCE": "it's \"quoted\" $HOME"})
        assert result.logs.stdout == ["it's \"quoted\" $HOME\n"]  # values are data, never code
        assert (await sandbox.run_code("echo \"[$ONCE]\"", language="bash")).logs.stdout == ["[]\n"]
    finally:
        await sandbox.kill()


# ---- code contexts (E2B's test_contexts, test_cwd) ---------------------------------------------------


async def test_create_context_with_no_options(sbx):
    context = await sbx.create_code_context()
    contexts = await sbx.list_code_contexts()
    last = contexts[-1]
    assert (last.id, last.language, last.cwd) == (context.id, context.language, context.cwd)
    assert context.language == "python"


async def test_create_context_with_options_and_cwd(sbx):
    context = await sbx.create_code_context(language="python", cwd="/tmp")
    assert (context.language, context.cwd) == ("python", "/tmp")
    result = await sbx.run_code("import os; os.getcwd()", context=context)
    assert result.text == "/tmp"


async def test_contexts_keep_their_own_state(sbx):
    context = await sbx.create_code_context()
    await sbx.run_code("x = 'in the context'", context=context)
    assert (await sbx.run_code("x", context=context)).text == "in the context"
    assert (await sbx.run_code("x")).error.name == "NameError"  # the default context is another kernel


async def test_remove_context(sbx):
    context = await sbx.create_code_context()
    await sbx.remove_code_context(context)
    assert context.id not in [c.id for c in await sbx.list_code_contexts()]
    with pytest.raises(NotFoundError):
        await sbx.run_code("1", context=context)


async def test_restart_context(sbx):
    context = await sbx.create_code_context()
    await sbx.run_code("x = 1", context=context)
    await sbx.restart_code_context(context)
    assert (await sbx.run_code("x", context=context)).error.name == "NameError"


async def test_language_and_context_together_are_an_error(sbx):
    context = await sbx.create_code_context()
    with pytest.raises(ValueError):
        await sbx.run_code("1", language="python", context=context)


async def test_bash_context(sbx):
    context = await sbx.create_code_context(language="bash", cwd="/tmp")
    result = await sbx.run_code("pwd; echo hello", context=context)
    assert "".join(result.logs.stdout) == "/tmp\nhello\n"


# ---- images -----------------------------------------------------------------------------------------

_IMAGE = """
import numpy
from PIL import Image

imarray = numpy.random.rand(16,16,3) * 255
image = Image.fromarray(imarray.astype('uint8')).convert('RGBA')
"""


async def test_show_image(sbx):
    execution = await sbx.run_code(_IMAGE + "\nimage.show()\nprint('Image shown.')")
    assert execution.results[0].png and execution.logs.stdout == ["Image shown.\n"]


async def test_image_as_last_command(sbx):
    execution = await sbx.run_code(_IMAGE + "\nimage")
    assert execution.results[0].png


async def test_get_image_on_save(sbx):
    execution = await sbx.run_code(_IMAGE + "\nimage.save('test.png')\nprint('Image saved.')")
    assert execution.results[0].png
    assert await sbx.files.exists("test.png")  # saved as well as shown


# ---- json -----------------------------------------------------------------------------------------


async def test_json(sbx):
    execution = await sbx.run_code("import numpy as np\nprint('hi')\n{'a': np.int64(1), 'b': [1.5, 'x']}")
    assert execution.results[0].json == {"a": 1, "b": [1.5, "x"]}
    data = json.loads(execution.to_json())
    assert data["results"][0]["json"] == {"a": 1, "b": [1.5, "x"]} and data["error"] is None
    assert json.loads(data["logs"]) == {"stdout": ["hi\n"], "stderr": []}
    failed = await sbx.run_code("1/0")
    error = json.loads(json.loads(failed.to_json())["error"])
    assert error["name"] == "ZeroDivisionError" and "ZeroDivisionError" in error["traceback"]


# ---- charts (async only, as E2B's chart tests) ----------------------------------------------------


async def test_chart_line(async_sandbox):
    result = await async_sandbox.run_code("""
import numpy as np
import matplotlib.pyplot as plt

x = np.linspace(0, 2*np.pi, 100)
plt.figure(figsize=(10, 6))
plt.plot(x, np.sin(x), label='sin(x)')
plt.plot(x, np.cos(x), label='cos(x)')
plt.xlabel("Time (s)")
plt.ylabel("Amplitude (Hz)")
plt.title('Plot of sin(x) and cos(x)')
plt.show()
""")
    chart = result.results[0].chart
    assert isinstance(chart, LineChart) and chart.type == ChartType.LINE
    assert result.results[0].png and "chart" in result.results[0].formats()
    assert chart.title == "Plot of sin(x) and cos(x)"
    assert (chart.x_label, chart.y_label, chart.x_unit, chart.y_unit) == ("Time (s)", "Amplitude (Hz)", "s", "Hz")
    assert chart.x_scale == "linear" and chart.y_scale == "linear"
    assert all(isinstance(x, float) for x in chart.x_ticks) and all(isinstance(y, float) for y in chart.y_ticks)
    assert all(isinstance(label, str) for label in chart.x_tick_labels + chart.y_tick_labels)
    first, second = chart.elements
    assert first.label == "sin(x)" and len(first.points) == 100 and second.label == "cos(x)"
    assert all(isinstance(p, tuple) and isinstance(p[0], float) and isinstance(p[1], float) for p in first.points)
    assert chart.to_dict()["type"] == "line"


async def test_chart_line_scales(async_sandbox):
    result = await async_sandbox.run_code("""
import datetime, numpy as np, matplotlib.pyplot as plt
fig, axs = plt.subplots(1, 3)
axs[0].plot([datetime.date(2023, 9, 1) + datetime.timedelta(days=i) for i in range(10)], np.arange(10))
axs[1].plot([1, 2, 3, 4, 5], ['A', 'B', 'C', 'D', 'E'])
x = np.linspace(0, 100, 100)
axs[2].plot(x, np.exp(x), label='y = e^x'); axs[2].set_yscale('log'); axs[2].set_ylabel('Y-axis (log scale)')
plt.show()
""")
    dates, categories, log = result.results[0].chart.elements
    assert (dates.x_scale, dates.y_scale) == ("datetime", "linear") and dates.elements[0].points[0][0] == "2023-09-01"
    assert (categories.x_scale, categories.y_scale) == ("linear", "categorical")
    assert log.y_scale == "log" and log.y_unit == "log scale" and log.elements[0].label == "y = e^x"


async def test_chart_scatter(async_sandbox):
    result = await async_sandbox.run_code("""
import matplotlib.pyplot as plt
import numpy as np
N = 5
plt.xlabel("A")
plt.ylabel("B")
plt.scatter(np.random.rand(N), np.random.rand(N), c='blue', label='Dataset 1')
plt.scatter(np.random.rand(2*N), np.random.rand(2*N), c='red', label='Dataset 2')
plt.show()
""")
    chart = result.results[0].chart
    assert isinstance(chart, ScatterChart) and chart.type == ChartType.SCATTER
    assert chart.title is None and (chart.x_label, chart.y_label) == ("A", "B")
    assert [(e.label, len(e.points)) for e in chart.elements] == [("Dataset 1", 5), ("Dataset 2", 10)]
    assert all(isinstance(p, tuple) for p in chart.elements[0].points)


async def test_chart_bar(async_sandbox):
    result = await async_sandbox.run_code("""
import matplotlib.pyplot as plt
authors = ['Author A', 'Author B', 'Author C', 'Author D']
sales = [100, 200, 300, 400]
plt.figure(figsize=(10, 6))
plt.bar(authors, sales)
plt.xlabel('Authors')
plt.ylabel('Number of Books Sold')
plt.title('Book Sales by Authors')
plt.tight_layout()
plt.show()
""")
    chart = result.results[0].chart
    assert isinstance(chart, BarChart) and chart.type == ChartType.BAR
    assert chart.title == "Book Sales by Authors"
    assert (chart.x_label, chart.y_label, chart.x_unit, chart.y_unit) == ("Authors", "Number of Books Sold", None, None)
    assert [bar.value for bar in chart.elements] == [100, 200, 300, 400]
    assert [bar.label for bar in chart.elements] == ["Author A", "Author B", "Author C", "Author D"]


async def test_chart_pie(async_sandbox):
    result = await async_sandbox.run_code("""
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(8, 8))
ax.pie([90, 10], labels=["No", "No, in blue"], autopct='%1.1f%%', startangle=90)
ax.axis('equal')
plt.title('Will I wake up early tomorrow?')
plt.show()
""")
    chart = result.results[0].chart
    assert isinstance(chart, PieChart) and chart.title == "Will I wake up early tomorrow?"
    assert [(e.label, e.angle, e.radius) for e in chart.elements] == [("No", 324, 1), ("No, in blue", 36, 1)]


async def test_chart_box_and_whiskers(async_sandbox):
    result = await async_sandbox.run_code("""
import matplotlib.pyplot as plt
data = {'Class A': [85, 90, 78, 92, 88], 'Class B': [95, 89, 76, 91, 84, 87], 'Class C': [75, 82, 88, 79, 86]}
fig, ax = plt.subplots(figsize=(10, 6))
ax.boxplot(data.values(), tick_labels=data.keys(), patch_artist=True)
ax.set_title('Exam Scores Distribution')
ax.set_xlabel('Class')
ax.set_ylabel('Score')
plt.show()
""")
    chart = result.results[0].chart
    assert isinstance(chart, BoxAndWhiskerChart) and chart.type == ChartType.BOX_AND_WHISKER
    assert chart.title == "Exam Scores Distribution" and (chart.x_label, chart.y_label) == ("Class", "Score")
    assert [box.label for box in chart.elements] == ["Class A", "Class B", "Class C"]
    a = chart.elements[0]
    assert (a.min, a.first_quartile, a.median, a.third_quartile, a.max) == (78, 85, 88, 90, 92)
    assert all(isinstance(v, float) for box in chart.elements
               for v in (box.min, box.first_quartile, box.median, box.third_quartile, box.max))


async def test_chart_superchart(async_sandbox):
    result = await async_sandbox.run_code("""
import matplotlib.pyplot as plt
import numpy as np
fig, axs = plt.subplots(1, 2, figsize=(10, 8))
fig.suptitle('Multiple Charts Example', fontsize=16)
axs[0].plot(np.linspace(0, 10, 100), np.sin(np.linspace(0, 10, 100)), 'r')
axs[0].set_title('Sine Wave')
axs[0].grid(True)
axs[1].scatter(np.random.rand(5), np.random.rand(5), c='blue', label='Dataset 1')
axs[1].set_xlabel('X')
axs[1].set_ylabel('Y')
axs[1].set_title('Scatter Plot')
axs[1].grid(True)
plt.show()
""")
    chart = result.results[0].chart
    assert isinstance(chart, SuperChart) and chart.type == ChartType.SUPERCHART
    assert chart.title == "Multiple Charts Example"
    line, scatter = chart.elements
    assert isinstance(line, LineChart) and line.title == "Sine Wave" and line.x_label is None
    assert len(line.elements) == 1 and len(line.elements[0].points) == 100
    assert isinstance(scatter, ScatterChart) and (scatter.x_label, scatter.y_label) == ("X", "Y")
    assert len(scatter.elements[0].points) == 5


async def test_chart_unknown(async_sandbox):
    result = await async_sandbox.run_code("""
import matplotlib.pyplot as plt
fig, ax = plt.subplots()
ax.add_artist(plt.Circle((0, 0), 1, color='blue', fill=False, linewidth=2))
ax.add_artist(plt.Circle((0, 0), 2, color='red', fill=False, linewidth=2))
ax.grid(True)
plt.title('Two Concentric Circles')
plt.show()
""")
    chart = result.results[0].chart
    assert type(chart) is Chart and chart.type == ChartType.UNKNOWN
    assert chart.title == "Two Concentric Circles" and chart.elements == []


async def test_figure_as_last_expression_and_to_json(async_sandbox):
    execution = await async_sandbox.run_code("import matplotlib.pyplot as plt\nfig = plt.figure(); plt.bar([1, 2], [3, 4])"
                                             "\nplt.close(fig)\nfig")
    chart = execution.results[0].chart
    assert execution.results[0].is_main_result and isinstance(chart, BarChart)
    assert [b.value for b in chart.elements] == [3, 4]
    assert json.loads(execution.to_json())["results"][0]["chart"]["type"] == "bar"


async def test_the_readme_e2b_block_runs_as_written(api, monkeypatch):
    from tests.test_sdk import readme_block

    monkeypatch.setenv("VMCELL_URL", api.url)
    monkeypatch.setenv("VMCELL_TOKEN", TOKEN)
    namespace = {}
    code = readme_block("# was: from e2b_code_interpreter import AsyncSandbox, Sandbox")
    await asyncio.to_thread(exec, compile(code, "README.md", "exec"), namespace)
    assert isinstance(namespace["chart"], BarChart) and namespace["execution"].results[0].data == {"a": [1, 2, 3]}
    assert not api.manager.list()
