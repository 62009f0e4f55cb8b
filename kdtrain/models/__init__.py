"""Model registry: every teacher and student is built here from its config group entry.

A model config is a mapping with `name` (a registered builder, or `custom` with `_target_`)
plus constructor keyword arguments. Keys that describe where weights come from
(`checkpoint`, `weights`) are not passed to the constructor.

A `custom` model imports and calls the `_target_` it names, so it runs code: allowed when the spec
comes from the user's own command line (as in Hydra), refused when it was read from a file (a
run's config, a .safetensors file's metadata) unless the user trusts that file explicitly.
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


def resolve_builder(
    cfg: dict[str, Any], role: str, from_file: str | None = None
) -> tuple[Callable[..., nn.Module], dict[str, Any], str, bool]:
    """(builder, constructor kwargs, label, is_builtin) for a model config; checks options without building.

    `from_file`: the file the config was read from, when it was (then a custom `_target_` is refused
    before anything is imported: a file is data, it never names code to run)."""
    if not isinstance(cfg, dict):
        where = f" in {from_file}" if from_file else ""
        raise UserError(f"the {role} model spec{where} is a {type(cfg).__name__}, not a mapping with a name")
    name = cfg.get("name")
    kwargs = {k: v for k, v in cfg.items() if k not in NON_MODEL_KEYS}
    if name == "custom":
        target = cfg.get("_target_")
        if not target or target == "???":
            raise UserError(f"{role}=custom needs {role}._target_=my_pkg.module.ModelClass")
        if from_file is not None:
            raise UserError(
                f"{from_file} names a custom {role} model ({role}._target_={target!r}), code that kdtrain would "
                "import and call; a file is never trusted to run code: if you trust it, pass --trust-model-code"
            )
        fn = _import_target(str(target), role)
        _check_kwargs(fn, kwargs, role, str(target), {"num_classes", "in_shape"})
        return fn, kwargs, str(target), False
    fn = MODELS.get(name, role, extra=["custom"])
    _check_kwargs(fn, kwargs, role, str(name), {"num_classes", "in_shape"})
    return fn, kwargs, str(name), True


def build_model(
    cfg: dict[str, Any], num_classes: int, in_shape: tuple[int, int, int], role: str, from_file: str | None = None
) -> nn.Module:
    """Build the model that `cfg` names, for `num_classes` outputs and inputs of `in_shape` (C, H, W).

    `from_file`: see resolve_builder (a custom model read from a file is refused)."""
    fn, kwargs, label, builtin = resolve_builder(cfg, role, from_file)
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
