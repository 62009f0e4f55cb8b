"""Model registry: every teacher and student is built here from its config group entry.

A model config is a mapping with `name` (a registered builder, or `custom` with `_target_`)
plus constructor keyword arguments. Keys that describe where weights come from
(`checkpoint`, `weights`) are not passed to the constructor.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any, Callable

from torch import nn

from kdtrain.errors import UserError

Builder = Callable[..., nn.Module]
MODELS: dict[str, Builder] = {}

# Config keys that are not constructor arguments.
NON_MODEL_KEYS = {"name", "checkpoint", "weights", "_target_"}


def register(name: str) -> Callable[[Builder], Builder]:
    """Register `fn(num_classes, in_shape, **kwargs) -> nn.Module` under `name`."""

    def wrap(fn: Builder) -> Builder:
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        MODELS[name] = fn
        return fn

    return wrap


def _import_builtin_models() -> None:
    # Importing the modules runs their @register decorators.
    from kdtrain.models import small  # noqa: F401

    try:
        from kdtrain.models import cifar  # noqa: F401
    except ImportError:  # pragma: no cover - the zoo is optional while it is being built
        pass


def known_models() -> list[str]:
    _import_builtin_models()
    return sorted(MODELS) + ["custom"]


def _import_target(path: str, role: str) -> Callable[..., nn.Module]:
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(
            f"{role}._target_={path!r} cannot be imported ({e}); give a dotted path to a class "
            "or function on PYTHONPATH, e.g. my_pkg.nets.Tiny"
        ) from None


def _call(fn: Callable[..., nn.Module], kwargs: dict[str, Any], role: str, label: str) -> nn.Module:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if params and not accepts_any and k not in params]
    if unknown:
        accepted = sorted(k for k in params if k not in ("num_classes", "in_shape", "self"))
        raise UserError(
            f"{role}.{unknown[0]} is not an option of model {label!r}; its options are: "
            f"{', '.join(accepted) or '(none)'}"
        )
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise UserError(f"{role} model {label!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(cfg: dict[str, Any], num_classes: int, in_shape: tuple[int, int, int], role: str) -> nn.Module:
    """Build the model that `cfg` names, for `num_classes` outputs and inputs of `in_shape` (C, H, W)."""
    _import_builtin_models()
    name = cfg.get("name")
    kwargs = {k: v for k, v in cfg.items() if k not in NON_MODEL_KEYS}
    if name == "custom":
        target = cfg.get("_target_")
        if not target:
            raise UserError(f"{role}=custom needs {role}._target_=my_pkg.module.ModelClass")
        fn = _import_target(str(target), role)
        params = _signature_names(fn)
        # A user model gets num_classes / in_shape only when its constructor asks for them.
        if "num_classes" in params and "num_classes" not in kwargs:
            kwargs["num_classes"] = num_classes
        if "in_shape" in params and "in_shape" not in kwargs:
            kwargs["in_shape"] = in_shape
        return _call(fn, kwargs, role, str(target))
    if name not in MODELS:
        close = difflib.get_close_matches(str(name), known_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(
            f"{role}={name} is not a known model{hint}; known models: {', '.join(known_models())}"
        )
    return _call_builtin(MODELS[name], num_classes, in_shape, kwargs, role, name)


def _signature_names(fn: Callable[..., Any]) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _call_builtin(
    fn: Builder, num_classes: int, in_shape: tuple[int, int, int], kwargs: dict[str, Any], role: str, name: str
) -> nn.Module:
    params = inspect.signature(fn).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if not accepts_any and k not in params]
    if unknown:
        accepted = sorted(k for k in params if k not in ("num_classes", "in_shape"))
        raise UserError(
            f"{role}.{unknown[0]} is not an option of model {name!r}; its options are: "
            f"{', '.join(accepted) or '(none)'}"
        )
    return fn(num_classes, in_shape, **kwargs)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
