"""Named options defined once, for Python and for the command line.

A :class:`Preset` is a callable target with some keyword arguments fixed (``Preset(ImageScale, b_factor=True)``).
Python code builds the object from it (:meth:`Preset.build`); the Hydra configuration is generated from it
(:meth:`Preset.config`, through hydra-zen's ``builds`` with the target's full signature), so a config node holds
every argument with the default that the target's signature (or the preset) gives it, and no value lives twice.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping

__all__ = ["Preset", "resolve_named", "signature_defaults", "call_accepting"]


class Preset:
    """``target`` with ``kwargs`` fixed.

    ``partial=True``: the preset stands for a factory (``functools.partial``) that is completed later with
    arguments only known from the data (e.g. a scale model's ``n_images``); otherwise for the object itself.
    Values in ``kwargs`` may be Presets themselves (nested parts). ``exclude`` names arguments that only the data
    can supply: they are left out of the config.
    """

    def __init__(self, target: Callable, partial: bool = False, exclude: tuple[str, ...] = (), **kwargs: Any):
        if not callable(target):
            raise TypeError(f"Preset: {target!r} is not callable")
        self.target = target
        self.partial = bool(partial)
        self.exclude = tuple(exclude)  # arguments the caller supplies (from the data): not in the config
        self.kwargs = kwargs

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"Preset({getattr(self.target, '__qualname__', self.target)}{', ' if args else ''}{args})"

    @staticmethod
    def _build(value: Any) -> Any:
        if isinstance(value, Preset):
            return value.build()
        if isinstance(value, (list, tuple)):
            return type(value)(Preset._build(v) for v in value)
        if isinstance(value, dict):
            return {k: Preset._build(v) for k, v in value.items()}
        return value

    def build(self, **overrides: Any) -> Any:
        """The object (or, for a partial preset, the factory) with ``overrides`` on top of the preset's values."""
        kwargs = {k: self._build(v) for k, v in {**self.kwargs, **overrides}.items()}
        if self.partial:
            return functools.partial(self.target, **kwargs)
        return self.target(**kwargs)

    __call__ = build

    @staticmethod
    def _config(value: Any) -> Any:
        if isinstance(value, Preset):
            return value.config()
        if isinstance(value, (list, tuple)):
            return [Preset._config(v) for v in value]
        if isinstance(value, dict):
            return {k: Preset._config(v) for k, v in value.items()}
        return value

    def config(self) -> Any:
        """A Hydra structured config (hydra-zen ``builds``) of this preset with the target's full signature."""
        from hydra_zen import builds

        kwargs = {k: self._config(v) for k, v in self.kwargs.items()}
        return builds(self.target, zen_partial=True if self.partial else None, populate_full_signature=True,
                      hydra_convert="all", zen_exclude=self.exclude, **kwargs)


def resolve_named(value: Any, choices: Mapping[str, Preset | Callable], what: str) -> Any:
    """``value`` itself, or the choice it names (a :class:`Preset` built, a callable returned as it is)."""
    if not isinstance(value, str):
        return value
    key = value.strip().lower()
    if key not in choices:
        raise ValueError(f"unknown {what} {value!r}: choose one of {', '.join(choices)}, or pass your own object")
    choice = choices[key]
    return choice.build() if isinstance(choice, Preset) else choice


def signature_defaults(fn: Callable, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keyword arguments of ``fn`` that have defaults, with those defaults."""
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        if name in exclude or p.default is inspect.Parameter.empty or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        out[name] = p.default
    return out


def call_accepting(factory: Callable, *args: Any, **options: Any) -> Any:
    """``factory(*args, **options)`` with only the ``options`` its signature names: a user's factory need not take
    the optional starting values a built-in one does (none are passed when the signature cannot be read)."""
    try:
        accepts = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        accepts = {}
    return factory(*args, **{k: v for k, v in options.items() if k in accepts})
