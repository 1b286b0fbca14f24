"""The lesson's code, from the notebook cells that teach it; its fingerprint names every file it makes."""

import ast
import hashlib
import json
import linecache
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .settings import ShortError, project_root

LESSONS = {  # name -> (notebook, tag of the cell that defines it)
    "pretrain": ("02_pretrain", "pretrain-loop"),
    "LoRAParametrization": ("03_parametrize", "lora-class"),
    "finetune_lora": ("05_finetune", "finetune-loop"),
}
_loaded: dict[tuple[str, str], dict[str, Any]] = {}  # (notebook, source) -> the namespace it made
_SKIP = {"__module__", "__qualname__", "__dict__", "__weakref__", "__firstlineno__", "__static_attributes__"}

class LessonError(ShortError, RuntimeError):
    """A lesson cell is missing, or its code does not run."""

def notebooks_folder() -> Path:
    return project_root() / "notebooks"

def lesson_source(notebook: str, tag: str, folder: Path | None = None) -> str:
    """The source of the cell tagged `tag` in `notebook` (as saved on disk)."""
    path = (folder or notebooks_folder()) / f"{notebook}.ipynb"
    if not path.is_file():
        raise LessonError(f"{notebook}.ipynb is not in {path.parent}: the lesson's code is read from it. "
                          "Run from a clone of the project (pip install -e .).")
    cells = json.loads(path.read_text())["cells"]
    tagged = [c for c in cells if tag in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise LessonError(f"{notebook}.ipynb has {len(tagged)} cells tagged {tag!r}, expected one: "
                          "restore the tag on the cell that defines the lesson's code.")
    return "".join(tagged[0]["source"])  # a string, or a list of lines

def lesson(name: str, fallback: Any = None) -> Any:
    """The function or class `name` as its notebook cell defines it now (see LESSONS); `fallback`, when
    given, where that notebook is not here (an installed wheel, not a clone)."""
    notebook, tag = LESSONS[name]
    if fallback is not None and not (notebooks_folder() / f"{notebook}.ipynb").is_file():
        return fallback
    source = lesson_source(notebook, tag)
    key = (notebook, source)
    if key not in _loaded:
        filename = f"<{notebook}.ipynb, cell {tag}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # tracebacks
        namespace: dict[str, Any] = {"__name__": f"lesson_{notebook}"}
        try:  # one statement at a time, as IPython runs a cell: the same code, the same fingerprint
            for statement in ast.parse(source, filename).body:
                module = ast.Module(body=[statement], type_ignores=[])
                exec(compile(module, filename, "exec", dont_inherit=True), namespace)
        except Exception as err:
            raise LessonError(f"The cell tagged {tag!r} in {notebook}.ipynb fails: {type(err).__name__}: "
                              f"{err}. Fix the cell (or restore it with git) and save the notebook.") from err
        _loaded[key] = namespace
    if name not in _loaded[key]:
        raise LessonError(f"The cell tagged {tag!r} in {notebook}.ipynb no longer defines {name}: "
                          "keep that name, the later notebooks call it.")
    return _loaded[key][name]

def _parts(obj: Any) -> list[str]:
    """What a code object or function computes, without where it was written (file, lines)."""
    if isinstance(obj, types.CodeType):
        return [obj.co_code.hex(), repr(obj.co_names), repr(obj.co_varnames), repr(obj.co_freevars),
                *(_constant(c) for c in obj.co_consts)]
    kwdefaults = repr(sorted((obj.__kwdefaults__ or {}).items()))  # defaults live outside the code
    return [*_parts(obj.__code__), _constant(obj.__defaults__ or ()), kwdefaults]

def _constant(value: Any) -> str:
    if isinstance(value, types.CodeType):
        return "code(" + ",".join(_parts(value)) + ")"
    if isinstance(value, frozenset):  # its order changes with the hash seed
        return "frozenset(" + ",".join(sorted(_constant(v) for v in value)) + ")"
    if isinstance(value, tuple):
        return "(" + ",".join(_constant(v) for v in value) + ")"
    return repr(value)

def code_fingerprint(obj: Callable | type) -> str:
    """A short hash of what a function or class computes, the same in a kernel and through `lesson`."""
    if isinstance(obj, type):
        parts = [obj.__name__, *(base.__name__ for base in obj.__bases__)]
        for attr, value in sorted(vars(obj).items()):
            if attr not in _SKIP:
                function = getattr(value, "__func__", value)
                body = _parts(function) if hasattr(function, "__code__") else [repr(value)]
                parts.append(f"{attr}:{','.join(body)}")
    elif getattr(obj, "__code__", None) is None:
        raise TypeError(f"{obj!r} is not a Python function or class: no code to fingerprint.")
    else:
        parts = [obj.__name__, *_parts(obj)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]
