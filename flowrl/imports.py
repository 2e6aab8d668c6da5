"""Objects named by import strings, so that the command line can point at user code.

    load_object("examples/custom_env.py:SimpleCorridor")   # a file, by path
    load_object("my_package.envs:SimpleCorridor")          # an importable module

Modules loaded from a file path are shipped by value to Ray workers and Tune trials
(which cannot import a file by path from their own working directory).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any


def is_import_string(value: Any) -> bool:
    """``"path/file.py:Name"`` or ``"package.module:Name"``."""
    if not isinstance(value, str) or value.count(":") != 1:
        return False
    where, name = value.split(":")
    return bool(where) and name.isidentifier() and (
        where.endswith(".py") or all(part.isidentifier() for part in where.split(".")))


def absolute_import_string(value: str) -> str:
    """Makes a file path in an import string absolute (other strings unchanged)."""
    if is_import_string(value) and value.split(":")[0].endswith(".py"):
        where, name = value.split(":")
        return f"{os.path.abspath(os.path.expanduser(where))}:{name}"
    return value


def load_module(where: str, spec: str) -> Any:
    if where.endswith(".py"):
        path = os.path.abspath(os.path.expanduser(where))
        if not os.path.isfile(path):
            raise ValueError(f"{spec!r}: no such file {path!r}")
        module_name = os.path.splitext(os.path.basename(path))[0]
        existing = sys.modules.get(module_name)
        if existing is not None and getattr(existing, "__file__", None) == path:
            return existing
        file_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[module_name] = module
        file_spec.loader.exec_module(module)
        import ray.cloudpickle
        ray.cloudpickle.register_pickle_by_value(module)
        return module
    try:
        return importlib.import_module(where)
    except ImportError as e:
        raise ValueError(f"{spec!r}: cannot import {where!r} ({e})") from e


def load_object(spec: str) -> Any:
    """The object of ``"where:Name"`` (``where`` a file path or a module; ``Name`` may be
    dotted, ``Outer.Inner``) or of ``"package.module.Name"``; a clear ``ValueError``
    if it does not resolve."""
    if is_import_string(spec) or (isinstance(spec, str) and ":" in spec):
        where, _, attrs = spec.partition(":")
    elif isinstance(spec, str):
        where, _, attrs = spec.rpartition(".")
    else:
        where = attrs = ""
    if not where or not attrs:
        raise ValueError(f"{spec!r} is not an import path; expected 'path/to/file.py:Name', "
                         "'package.module:Name' or 'package.module.Name'")
    obj = load_module(where, spec)
    try:
        for attr in attrs.split("."):
            obj = getattr(obj, attr)
    except AttributeError as e:
        hint = (" Classes defined inside functions cannot be named by path: pass the "
                "object itself." if "<locals>" in attrs else "")
        raise ValueError(f"{spec!r}: {where} has no {attrs!r}.{hint}") from e
    return obj
