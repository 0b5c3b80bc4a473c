# grad kernel driver: runs inside a session's Python interpreter (started by
# grad-runner as `python -u -c <this file>`) and speaks JSON lines with it.
#
#   fd 0  requests   {"n": count, "code": "...", "params": {...}}
#   fd 3  replies    {"t":"s"} stream text, {"t":"d"} display data,
#                    {"t":"e"} error, {"t":"r"} "read fd 1/2 now",
#                    and last {"t":"done","n":count,"ok":bool}
#   fd 4  lifeline   EOF means grad-runner is gone: kill the process group
#   fd 1, fd 2       raw output of C code and subprocesses, read by grad-runner
#
# SIGINT becomes KeyboardInterrupt only while user code runs. Keep the imports
# light (they delay every interpreter start) and the per-call path lean.
import ast
import binascii
import builtins
import faulthandler
import fcntl
import io
import json
import linecache
import os
import signal
import sys
import termios
import threading
import time
import warnings
from _thread import get_ident as _get_ident

_DRIVER_CODES = set()  # id() of every code object of this file, filled at the end
_MAIN = _get_ident()
_OUTPUTS = os.environ.get("GRAD_OUTPUTS", "")
_CHUNK = 32768  # characters per stream message
_BURST = 32.0  # lines sent at once before output counts as dense ...
_RATE = 1000.0  # ... and how many more per second
_CO_COROUTINE = 0x0080
_PARSE_FLAGS = ast.PyCF_ONLY_AST | getattr(ast, "PyCF_ALLOW_TOP_LEVEL_AWAIT", 0)
_COMPILE_FLAGS = getattr(ast, "PyCF_ALLOW_TOP_LEVEL_AWAIT", 0)

# Move the protocol descriptors out of the way: dup() makes them
# non-inheritable, so subprocesses of user code never hold them, and user code
# reading stdin gets EOF instead of our requests.
_REQ = os.dup(0)
_REP = os.dup(3)
_LIFE = os.dup(4)
os.close(3)
os.close(4)
_null = os.open(os.devnull, os.O_RDONLY)
os.dup2(_null, 0)
os.close(_null)
del _null

# --- sending ------------------------------------------------------------------

_lock = threading.Lock()  # guards _pend and writes to _REP
_pend = []  # [(stream name, text)] written but not yet sent
_pend_size = 0
_scheduled = False  # the flusher has been woken for _pend
_tokens = _BURST  # lines that may still be sent at once (a token bucket)
_refilled = 0.0
_wake = threading.Event()
_monotonic = time.monotonic

_running = False  # a call is running: SIGINT means KeyboardInterrupt
_in_io = 0  # >0 while the main thread writes to _REP
_deferred = False  # a SIGINT arrived during that write

# CPython runs signal handlers only at calls and backward jumps, which is
# what makes the two rules below sound: a handler cannot run between a
# statement like `_in_io -= 1` and the next line, nor between entering an
# `except` clause and its first assignment (`_running = False`).


def _on_sigint(signum, frame):
    global _deferred
    if not _running:
        return
    if _in_io:
        # Never cut a message in half; _send raises once it is out.
        _deferred = True
        return
    raise KeyboardInterrupt


def _encode(msg):
    return (json.dumps(msg, ensure_ascii=False, separators=(",", ":")) + "\n").encode(
        "utf-8", "replace"
    )


def _take_streams():
    # Called with _lock held.
    global _pend, _pend_size, _scheduled
    out = []
    name = None
    parts = []
    for n, s in _pend:
        if n != name and parts:
            out.append(_stream_msgs(name, "".join(parts)))
            parts = []
        name = n
        parts.append(s)
    if parts:
        out.append(_stream_msgs(name, "".join(parts)))
    _pend = []
    _pend_size = 0
    _scheduled = False
    return b"".join(out)


def _stream_msgs(name, text):
    if len(text) <= _CHUNK:
        return _encode({"t": "s", "n": name, "x": text})
    return b"".join(
        _encode({"t": "s", "n": name, "x": text[i : i + _CHUNK]})
        for i in range(0, len(text), _CHUNK)
    )


_NOTHING = bytes(4)
_RAW_FIRST = _encode({"t": "r"})


def _raw_pending():
    """Whether fd 1 or fd 2 hold bytes grad-runner has not read yet."""
    try:
        return (
            fcntl.ioctl(1, termios.FIONREAD, _NOTHING) != _NOTHING
            or fcntl.ioctl(2, termios.FIONREAD, _NOTHING) != _NOTHING
        )
    except OSError:
        return False  # fd 1 or 2 closed or not a pipe


def _send(data):
    """Sends pending stream text, then `data`, to grad-runner (any thread)."""
    global _in_io, _deferred
    main = _get_ident() == _MAIN
    if main:
        _in_io += 1
    try:
        with _lock:
            if _pend:
                data = _take_streams() + data
            if not data:
                return
            if _raw_pending():
                # Those bytes were written before this message: have them
                # read first, so that subprocess output keeps its place. (Never
                # on its own: a stale mark would pull later output forward.)
                data = _RAW_FIRST + data
            view = memoryview(data)
            while view:
                view = view[os.write(_REP, view) :]
    except OSError:
        os._exit(1)  # grad-runner is gone
    finally:
        if main:
            _in_io -= 1
            if _deferred and not _in_io:
                _deferred = False
                if _running:
                    raise KeyboardInterrupt


class _Stream(io.TextIOBase):
    """sys.stdout / sys.stderr: text goes to grad-runner in order with results.

    A completed line goes out at once while output is sparse, so that it
    precedes whatever a subprocess started next writes to fd 1; dense output
    (more than _BURST lines, then _RATE per second) is batched and sent by
    the flusher thread within about one switch interval (5 ms).
    """

    encoding = "utf-8"
    errors = "strict"

    def __init__(self, name, fd):
        self._name = name
        self._fd = fd

    @property
    def name(self):
        return "<%s>" % self._name

    def writable(self):
        return True

    def isatty(self):
        return False

    def fileno(self):
        return self._fd

    def write(self, s):
        global _pend_size, _scheduled, _tokens, _refilled
        if not isinstance(s, str):
            raise TypeError("write() argument must be str, not %s" % type(s).__name__)
        n = len(s)
        if not n:
            return 0
        with _lock:
            _pend.append((self._name, s))
            _pend_size += n
            now = _pend_size >= _CHUNK
            if not now and "\n" in s:
                t = _monotonic()
                _tokens = min(_BURST, _tokens + (t - _refilled) * _RATE)
                _refilled = t
                if _tokens >= 1.0:
                    _tokens -= 1.0
                    now = True
            wake = not now and not _scheduled
            if wake:
                _scheduled = True
        if now:
            _send(b"")
        elif wake:
            _wake.set()
        return n

    def flush(self):
        if _pend:
            _send(b"")


def _flusher():
    # Sends buffered text soon after it is written. While user code computes
    # it holds the GIL, so this gets to run about once per switch interval
    # (5 ms), which batches many small writes into one message.
    while True:
        _wake.wait()
        _wake.clear()
        _send(b"")


def _lifeline():
    try:
        while os.read(_LIFE, 4096):
            pass
    except OSError:
        pass
    try:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    finally:
        os._exit(1)


# --- display ------------------------------------------------------------------

_PLAIN_TYPES = (int, float, complex, bool, str, bytes, list, tuple, dict, set, frozenset, range)
_REPR_METHODS = (
    ("_repr_html_", "text/html"),
    ("_repr_markdown_", "text/markdown"),
    ("_repr_svg_", "image/svg+xml"),
    ("_repr_png_", "image/png"),
    ("_repr_jpeg_", "image/jpeg"),
    ("_repr_latex_", "text/latex"),
    ("_repr_json_", "application/json"),
)

_count = 0  # execution count of the current call
_fig_k = 0  # figures saved in the current call
_shown = set()  # ids of figures already displayed in the current call


def _b64(data):
    return binascii.b2a_base64(bytes(data), newline=False).decode("ascii")


def _plain(obj):
    try:
        return repr(obj)
    except Exception as e:
        return "<%s object (repr failed: %s)>" % (type(obj).__name__, type(e).__name__)


def _call(obj, name, *args):
    try:
        method = getattr(obj, name, None)
        if method is None or not callable(method):
            return None
        return method(*args)
    except Exception:
        return None  # a broken rich repr must not break the call


def _mime_value(mime, value):
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict):
        value = value[0]  # (data, metadata)
    if value is None:
        return None
    if mime == "application/json" or mime.endswith("+json"):
        if isinstance(value, str):
            return value
        try:
            return json.dumps(value)
        except Exception:
            return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        if mime.startswith("text/") or mime == "image/svg+xml":
            return bytes(value).decode("utf-8", "replace")
        return _b64(value)
    if isinstance(value, str):
        return value
    return None


def _bundle(obj):
    if type(obj) in _PLAIN_TYPES or isinstance(obj, type):
        return {"text/plain": _plain(obj)}
    data = {}
    bundle = _call(obj, "_repr_mimebundle_", None, None)
    if isinstance(bundle, tuple) and bundle:
        bundle = bundle[0]
    if isinstance(bundle, dict):
        for mime, value in bundle.items():
            value = _mime_value(mime, value)
            if isinstance(mime, str) and value is not None:
                data[mime] = value
    for method, mime in _REPR_METHODS:
        if mime not in data:
            value = _mime_value(mime, _call(obj, method))
            if value is not None:
                data[mime] = value
    if "text/plain" not in data:
        data["text/plain"] = _plain(obj)
    return data


def _is_figure(obj):
    figure = sys.modules.get("matplotlib.figure")
    return figure is not None and isinstance(obj, figure.Figure)


def _save_figure(fig):
    global _fig_k
    _fig_k += 1
    _shown.add(id(fig))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    png = buf.getvalue()
    files = []
    if _OUTPUTS:
        name = "figure-%d-%d.png" % (_count, _fig_k)
        try:
            os.makedirs(_OUTPUTS, exist_ok=True)
            with open(os.path.join(_OUTPUTS, name), "wb") as f:
                f.write(png)
            files.append("outputs/" + name)
        except OSError as e:
            sys.stderr.write("grad: could not save %s: %s\n" % (name, e))
    return {"image/png": _b64(png), "text/plain": _plain(fig)}, files


def _display(obj, result):
    if _is_figure(obj):
        data, files = _save_figure(obj)
    else:
        data, files = _bundle(obj), []
    _send(_encode({"t": "d", "data": data, "r": result, "f": files}))


def display(*objs, **kwargs):
    """Shows each object in the client as rich output (HTML, images, text)."""
    for obj in objs:
        _display(obj, False)


def _flush_figures():
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return
    nums = plt.get_fignums()
    if not nums:
        return
    try:
        for num in nums:
            fig = plt.figure(num)
            if id(fig) not in _shown:
                _display(fig, False)
    finally:
        plt.close("all")


# --- errors -------------------------------------------------------------------

_PIP_NAMES = {
    "PIL": "Pillow",
    "bs4": "beautifulsoup4",
    "cv2": "opencv-python",
    "dateutil": "python-dateutil",
    "dotenv": "python-dotenv",
    "skimage": "scikit-image",
    "sklearn": "scikit-learn",
    "yaml": "PyYAML",
}


def _error_msg(e):
    import traceback  # only on errors: it costs a few ms to import

    tb = e.__traceback__
    while tb is not None and id(tb.tb_frame.f_code) in _DRIVER_CODES:
        tb = tb.tb_next
    try:
        lines = "".join(traceback.format_exception(type(e), e, tb)).splitlines()
    except Exception:
        lines = ["%s: <traceback unavailable>" % type(e).__name__]
    if isinstance(e, ModuleNotFoundError) and e.name:
        top = e.name.split(".")[0]
        lines.append(
            "hint: the runner's Python (%s) has no module '%s'; install it there "
            "(pip install %s) or pick another interpreter with --python / GRAD_PYTHON"
            % (sys.executable, top, _PIP_NAMES.get(top, top))
        )
    try:
        evalue = str(e)
    except Exception:
        evalue = "<unprintable %s>" % type(e).__name__
    return _encode({"t": "e", "ename": type(e).__name__, "evalue": evalue, "tb": lines})


# --- running a cell -----------------------------------------------------------

_main_mod = type(sys)("__main__")  # pickle finds user classes in __main__
_ns = _main_mod.__dict__
_ns["__builtins__"] = builtins
_ns["display"] = display
builtins.display = display  # as in IPython, modules in code/ can call it too
_aloop = None


def _run_code(code):
    global _aloop
    if code.co_flags & _CO_COROUTINE:  # top-level await
        if _aloop is None:
            import asyncio

            _aloop = asyncio.new_event_loop()
            asyncio.set_event_loop(_aloop)
        return _aloop.run_until_complete(eval(code, _ns))
    return eval(code, _ns)


def _execute(source, filename):
    tree = compile(source, filename, "exec", _PARSE_FLAGS, True)
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    if tree.body:
        _run_code(compile(tree, filename, "exec", _COMPILE_FLAGS, True))
    if last is not None:
        value = _run_code(compile(last, filename, "eval", _COMPILE_FLAGS, True))
        if value is not None and not source.rstrip().endswith(";"):
            _ns["_"] = value
            _display(value, True)


def _run(req):
    """Runs one request; returns the exception that ended it, or None."""
    global _running, _deferred, _count, _fig_k, _tokens
    _tokens = _BURST
    _count = req["n"]
    _fig_k = 0
    _shown.clear()
    source = req["code"]
    filename = "<cell-%d>" % _count
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    _ns["params"] = req.get("params") or {}
    failed = None
    _deferred = False
    try:
        _running = True
        _execute(source, filename)
    except BaseException as e:
        _running = False
        failed = e
    try:
        _running = True
        _flush_figures()
    except BaseException as e:
        _running = False
        if failed is None:
            failed = e
    _running = False
    return failed


def _main():
    global _running
    requests = os.fdopen(_REQ, "rb")
    while True:
        line = requests.readline()
        if not line:
            os._exit(0)  # grad-runner closed the session
        req = json.loads(line)
        ok = False
        try:
            failed = _run(req)
            if failed is None:
                ok = True
            else:
                _send(_error_msg(failed))
        except BaseException as e:  # the driver itself failed; stay alive
            _running = False
            try:
                _send(_error_msg(e))
            except BaseException:
                pass
        _send(_encode({"t": "done", "n": req["n"], "ok": ok}))


def _collect_codes(code):
    _DRIVER_CODES.add(id(code))
    for const in code.co_consts:
        if isinstance(const, type(code)):
            _collect_codes(const)


_collect_codes(sys._getframe().f_code)
faulthandler.enable()  # a crash in C code prints Python stacks to fd 2
warnings.filterwarnings("ignore", message=".*non-interactive, and thus cannot be shown")
signal.signal(signal.SIGINT, _on_sigint)
threading.Thread(target=_lifeline, name="grad-lifeline", daemon=True).start()
threading.Thread(target=_flusher, name="grad-flusher", daemon=True).start()
sys.stdout = _Stream("stdout", 1)
sys.stderr = _Stream("stderr", 2)
sys.modules["__main__"] = _main_mod
_main()
