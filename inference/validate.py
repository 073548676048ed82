"""Check configuration values against the type hints of the function or class they configure, before any work.

Hydra types only what its structured configs declare; options whose hints it cannot represent (``float | None``,
``tuple[int, ...]``, ``Literal[...]``) reach the code as whatever the command line gave, and ``data.dmin=abc``
would fail deep inside numpy. :func:`check_options` turns that into one :class:`ConfigError` naming the key, the
value and what was expected. Hints it does not understand (classes, callables, ``Any``) are left alone.
"""
from __future__ import annotations

import collections.abc
import inspect
import numbers
import types
import typing
from typing import Any, Callable, Iterable, Literal, Mapping, Union

__all__ = ["ConfigError", "check_options", "check_node"]


_SEQUENCES = (tuple, list, collections.abc.Sequence)


class ConfigError(ValueError):
    """A configuration value of the wrong type; the message names the key."""


def _hints(target: Callable) -> dict[str, Any]:
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: check nothing rather than guess
        return {}


def _describe(hint: Any) -> str | None:
    """What ``hint`` accepts in words, or None when it is not a hint this module checks."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "None"
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        parts = [_describe(a) for a in args]
        return None if any(p is None for p in parts) else " or ".join(parts)
    if origin in _SEQUENCES and args:
        inner = _describe(args[0])
        return None if inner is None else f"a list of {inner.removeprefix('an ').removeprefix('a ')}s"
    return None


def _accepts(hint: Any, value: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is Literal:
        return value in args
    if origin in (Union, types.UnionType):
        return any(_accepts(a, value) for a in args)
    if origin in _SEQUENCES and args:
        items = list(value) if isinstance(value, (list, tuple)) or _is_sequence_config(value) else None
        return items is not None and all(_accepts(args[0], v) for v in items)
    return True


def _is_sequence_config(value: Any) -> bool:
    from omegaconf import ListConfig

    return isinstance(value, ListConfig)


def check_options(target: Callable, options: Mapping[str, Any], prefix: str = "",
                  skip: Iterable[str] = ()) -> None:
    """Raise :class:`ConfigError` for the first of ``options`` whose value ``target``'s hint for it rejects."""
    hints = _hints(target)
    skipped = set(skip)
    for name, value in options.items():
        if name in skipped or name.startswith("_") or name not in hints:
            continue
        want = _describe(hints[name])
        if want is not None and not _accepts(hints[name], value):
            raise ConfigError(f"{prefix}{name}={value!r}: expected {want}")


def check_node(node: Any, key: str) -> None:
    """:func:`check_options` on a config node with a ``_target_`` (and, recursively, on the nodes inside it)."""
    from hydra.utils import get_method
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(node, DictConfig):
        return
    values = {k: node[k] for k in node.keys() if not OmegaConf.is_missing(node, k)}
    for name, value in values.items():
        if isinstance(value, DictConfig):
            check_node(value, f"{key}.{name}")
    target = values.get("_target_")
    if not isinstance(target, str):
        return
    try:
        fn = get_method(target)
    except Exception:  # hydra names an unknown target itself when it instantiates
        return
    plain = {k: v for k, v in values.items() if not isinstance(v, DictConfig)}
    check_options(fn, plain, prefix=f"{key}.")
