"""Name -> op class lookup, so recipes can refer to ops by name."""

from __future__ import annotations

from ops.base import Op, OpConfigError

_OPS: dict[str, type[Op]] = {}


def register(cls: type[Op]) -> type[Op]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in _OPS and _OPS[cls.name] is not cls:
        raise TypeError(f"op name {cls.name!r} is registered twice ({_OPS[cls.name].__name__}, {cls.__name__})")
    _OPS[cls.name] = cls
    return cls


def op_class(name: str) -> type[Op]:
    _load_builtin_ops()
    try:
        return _OPS[name]
    except KeyError:
        raise OpConfigError(f"unknown op {name!r}; known ops: {', '.join(sorted(_OPS))}") from None


def op_names() -> list[str]:
    _load_builtin_ops()
    return sorted(_OPS)


def _load_builtin_ops() -> None:
    # Importing the modules runs their @register decorators.
    from ops import background, color, compose, diffusion, fit_channel, geometry, inpaint_gan, overlay, restore, upscale  # noqa: F401
