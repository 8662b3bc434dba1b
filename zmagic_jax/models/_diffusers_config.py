"""Reading a diffusers ``config.json`` into one of the library's typed configs, refusing what the
library's module does not compute.

diffusers configs carry many options; an option set to a value our module does not implement
would otherwise load without error and compute a different network. So every such option is
checked against the values the module implements, and the error names the file, the key, the
value and what is supported. Keys that do not change the network (``_class_name``,
``_diffusers_version``, ``sample_size``, dropout, options only other block types read, keys
diffusers itself ignores) are accepted.
"""
from __future__ import annotations

import dataclasses
from typing import Any


def _allowed(value, allowed: tuple) -> bool:
    if isinstance(value, (list, tuple)):  # a per-block option: every block must be supported
        return all(_allowed(v, allowed) for v in value)
    # by type too: JSON's 0 is not False
    return any(value == a and type(value) is type(a) for a in allowed)


def config_from_diffusers(config_type: type, config: dict, *, file: str, component: str,
                          required: dict) -> Any:
    """``config_type(**options)`` from a diffusers config dict.

    The options the module implements are the fields of ``config_type``, named as diffusers names
    them (their values are passed on; the dataclass converts and validates them). ``required``:
    ``{diffusers key: allowed values}`` of the options the module implements only at these values
    (a per-block list must hold allowed values only); a key absent from the file has diffusers'
    default, which is always allowed. Any other key is accepted. Errors are ``ValueError`` naming
    ``file``."""
    if not isinstance(config, dict):
        raise ValueError(f"{file}: a {component} config must be a JSON object; got {type(config).__name__}.")
    for key, allowed in required.items():
        if key in config and not _allowed(config[key], allowed):
            supported = " or ".join(repr(a) for a in allowed)
            raise ValueError(f"{file}: {component} option {key}={config[key]!r} is not supported "
                             f"(zmagic_jax implements {key}={supported} only).")
    fields = {f.name for f in dataclasses.fields(config_type)}
    try:
        return config_type(**{k: v for k, v in config.items() if k in fields})
    except (TypeError, ValueError) as error:
        raise ValueError(f"{file}: {error}") from None
