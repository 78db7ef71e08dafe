"""Building our frozen config dataclasses from checkpoint JSON (`config.json`, `scheduler_config.json`)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

C = TypeVar("C")


def config_from_dict(cls: type[C], cfg: Mapping[str, Any], inert: Iterable[str] = ()) -> C:
    """`cls(**cfg)` for the keys `cls` declares. Bookkeeping keys (`_class_name`, `_diffusers_version`)
    and keys known to have no effect (`inert`) are dropped silently; other unknown keys are logged, since
    a checkpoint from a newer diffusers may carry options we do not model yet."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    quiet = set(inert)
    unknown = sorted(k for k in cfg if k not in names and k not in quiet and not k.startswith("_"))
    if unknown:
        logger.debug("%s: ignoring unknown config keys %s", cls.__name__, unknown)
    return cls(**{k: v for k, v in cfg.items() if k in names})
