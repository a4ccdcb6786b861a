"""What the kernel's display path adds to a result, so results look as E2B Code Interpreter's.

Registered by the IPython extension (ipython_ext.py) in the kernel:
  CHART_MIME   a matplotlib Figure's chart (charts.py), next to its PNG in the same bundle
  DATA_MIME    a pandas DataFrame's columns: {column: [values]} (NaN/inf as null, timestamps ISO)
  application/json  a dict or list result, when it is plain JSON (numpy values allowed)
  PIL images   Image.show() displays the image (no viewer in a VM); Image.save(path) displays it
               too, as E2B's template does (only for a path: a file object is left alone)

Every formatter gives up quietly (no MIME entry) on anything odd or too large: a result never
fails because of this module. The host checks all of it again (interpreter/kernel/charts.py).
"""

from __future__ import annotations

import math
import sys

from .charts import CHART_MIME, DATA_MIME, figure_to_chart

MAX_DATA_CELLS = 100_000  # a larger DataFrame has no DATA_MIME entry (its html and text remain)
MAX_JSON_BYTES = 1024 * 1024
MAX_CHART_BYTES = 2 * 1024 * 1024


def _scalar(value):
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    item = getattr(value, "item", None)  # numpy scalars
    if item is not None and not hasattr(value, "__len__"):
        try:
            return _scalar(item())
        except (TypeError, ValueError):
            pass
    try:
        if value != value:  # NaN-like: NaT is not equal to itself
            return None
    except (TypeError, ValueError):  # pandas.NA
        return None
    isoformat = getattr(value, "isoformat", None)
    if isoformat is not None:
        try:
            return isoformat()
        except (TypeError, ValueError):
            return None
    return str(value)


def dataframe_data(frame) -> dict | None:
    if frame.size > MAX_DATA_CELLS:
        return None
    return {str(column): [_scalar(v) for v in values] for column, values in frame.to_dict(orient="list").items()}


def _fits(value, limit: int) -> bool:
    import json

    try:
        return len(json.dumps(value, allow_nan=False)) <= limit
    except (TypeError, ValueError):
        return False


def register(ip) -> None:
    """Adds the formatters to this kernel's display formatter (in the kernel, once)."""
    from IPython.core.formatters import BaseFormatter, JSONFormatter
    from traitlets import ObjectName, Unicode

    class ChartFormatter(BaseFormatter):
        format_type = Unicode(CHART_MIME)
        print_method = ObjectName("_repr_vmcell_chart_")
        _return_type = (dict,)

        def __call__(self, obj):
            figure_module = sys.modules.get("matplotlib.figure")
            if figure_module is None or not isinstance(obj, figure_module.Figure):
                return None
            try:
                chart = figure_to_chart(obj)
            except Exception:  # an axes we cannot read: no chart, the PNG still goes
                return None
            return chart if chart is not None and _fits(chart, MAX_CHART_BYTES) else None

    class DataFormatter(BaseFormatter):
        format_type = Unicode(DATA_MIME)
        print_method = ObjectName("_repr_vmcell_data_")
        _return_type = (dict,)

        def __call__(self, obj):
            pandas = sys.modules.get("pandas")
            if pandas is None or not isinstance(obj, pandas.DataFrame):
                return None
            try:
                data = dataframe_data(obj)
            except Exception:
                return None
            return data if data is not None and _fits(data, MAX_JSON_BYTES * 16) else None

    class PlainJSONFormatter(JSONFormatter):
        """dict and list results as JSON too (E2B's `json`), when they are plain JSON."""

        def __call__(self, obj):
            if isinstance(obj, (dict, list)):
                try:
                    import orjson

                    text = orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
                    if len(text) <= MAX_JSON_BYTES:
                        return orjson.loads(text), {"expanded": True}
                except (TypeError, ValueError, ImportError):
                    pass
            return super().__call__(obj)

    formatters = ip.display_formatter.formatters
    formatters[CHART_MIME] = ChartFormatter(parent=ip.display_formatter)
    formatters[DATA_MIME] = DataFormatter(parent=ip.display_formatter)
    formatters["application/json"] = PlainJSONFormatter(parent=ip.display_formatter)
    _hook_pil()


def _hook_pil() -> None:
    """PIL's Image.show() looks for a desktop viewer; in the kernel it displays the image instead.
    Image.save(path) displays it as well (E2B does). Hooked when PIL.Image is (or gets) imported."""
    image_module = sys.modules.get("PIL.Image")
    if image_module is not None:
        _patch(image_module)
        return
    import builtins

    real_import = builtins.__import__

    def watching_import(name, *args, **kwargs):
        module = real_import(name, *args, **kwargs)
        if name.startswith("PIL") and "PIL.Image" in sys.modules:
            builtins.__import__ = real_import
            _patch(sys.modules["PIL.Image"])
        return module

    builtins.__import__ = watching_import


def _patch(image_module) -> None:
    image_class = image_module.Image
    if getattr(image_class, "_vmcell_display", False):
        return
    from IPython.display import display

    real_save = image_class.save

    def show(self, title=None, **options):
        display(self)

    def save(self, fp, format=None, **params):
        result = real_save(self, fp, format, **params)
        if isinstance(fp, (str, bytes)) or hasattr(fp, "__fspath__"):
            try:
                display(self)
            except Exception:
                pass
        return result

    image_class.show = show
    image_class.save = save
    image_class._vmcell_display = True
