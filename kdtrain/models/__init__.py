"""Model registry: every teacher and student is built here from its config group entry.

A model config is a mapping with `name` (a registered builder, or `custom` with `_target_`)
plus constructor keyword arguments. Keys that describe where weights come from
(`checkpoint`, `weights`) are not passed to the constructor.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from kdtrain.errors import UserError
from kdtrain.registry import Registry

Builder = Callable[..., nn.Module]

# Config keys that are not constructor arguments.
NON_MODEL_KEYS = {"name", "checkpoint", "weights", "_target_"}


def _import_builtin_models() -> None:
    # Importing the modules runs their @register decorators.
    from kdtrain.models import cifar, small, timm_models, tv  # noqa: F401


MODELS: Registry[Builder] = Registry("model", _import_builtin_models)
register = MODELS.register  # @register("name"): fn(num_classes, in_shape, **kwargs) -> nn.Module


def known_models() -> list[str]:
    return MODELS.names(extra=["custom"])


def _import_target(path: str, role: str) -> Callable[..., nn.Module]:
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(
            f"{role}._target_={path!r} cannot be imported ({e}); give a dotted path to a class "
            "or function on PYTHONPATH, e.g. my_pkg.nets.Tiny"
        ) from None


def _check_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any], role: str, label: str, skip: set[str]) -> None:
    """Reject unknown options, and values whose type differs from the option's default, before building."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for key, value in kwargs.items():
        if key not in params:
            accepted = sorted(k for k in params if k not in skip | {"self"})
            raise UserError(
                f"{role}.{key} is not an option of model {label!r}; its options are: {', '.join(accepted) or '(none)'}"
            )
        default = params[key].default
        kind = type(default) if isinstance(default, (bool, int, float, str)) else None
        ok = (
            kind is None
            or isinstance(value, kind)
            or (kind is float and isinstance(value, int) and not isinstance(value, bool))
        )
        if not ok or (kind is int and isinstance(value, bool)):
            raise UserError(
                f"{role}.{key}={value!r} is not accepted: model {label!r} expects type {kind.__name__} (default "
                f"{default!r})"
            )


def _construct(
    fn: Callable[..., nn.Module], args: tuple[Any, ...], kwargs: dict[str, Any], role: str, label: str
) -> nn.Module:
    try:
        model = fn(*args, **kwargs)
    except UserError:
        raise
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{role} model {label!r} cannot be built with {kwargs}: {e}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{role} model {label!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def resolve_builder(cfg: dict[str, Any], role: str) -> tuple[Callable[..., nn.Module], dict[str, Any], str, bool]:
    """(builder, constructor kwargs, label, is_builtin) for a model config; checks options without building."""
    name = cfg.get("name")
    kwargs = {k: v for k, v in cfg.items() if k not in NON_MODEL_KEYS}
    if name == "custom":
        target = cfg.get("_target_")
        if not target or target == "???":
            raise UserError(f"{role}=custom needs {role}._target_=my_pkg.module.ModelClass")
        fn = _import_target(str(target), role)
        _check_kwargs(fn, kwargs, role, str(target), {"num_classes", "in_shape"})
        return fn, kwargs, str(target), False
    fn = MODELS.get(name, role, extra=["custom"])
    _check_kwargs(fn, kwargs, role, str(name), {"num_classes", "in_shape"})
    return fn, kwargs, str(name), True


def build_model(cfg: dict[str, Any], num_classes: int, in_shape: tuple[int, int, int], role: str) -> nn.Module:
    """Build the model that `cfg` names, for `num_classes` outputs and inputs of `in_shape` (C, H, W)."""
    fn, kwargs, label, builtin = resolve_builder(cfg, role)
    if builtin:
        return _construct(fn, (num_classes, in_shape), kwargs, role, label)
    params = _signature_names(fn)
    # A user model gets num_classes / in_shape only when its constructor asks for them.
    if "num_classes" in params and "num_classes" not in kwargs:
        kwargs["num_classes"] = num_classes
    if "in_shape" in params and "in_shape" not in kwargs:
        kwargs["in_shape"] = in_shape
    return _construct(fn, (), kwargs, role, label)


def _signature_names(fn: Callable[..., Any]) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
