"""Make peft_elastic's tuner types real members of PEFT's closed `PeftType` enum and register them.

PEFT has no plugin discovery: `register_peft_method` only accepts names that are already members of `PeftType`,
so the enum is extended first. Both steps are idempotent, so importing the package twice (or reloading it) is safe.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method


def add_peft_type(name: str) -> PeftType:
    """Return the `PeftType` member called `name` (upper case), adding it to the enum if it is missing."""
    value = name.upper()
    if value in PeftType._value2member_map_:
        return PeftType(value)
    member = str.__new__(PeftType, value)
    member._name_ = value
    member._value_ = value
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    # Set the class attribute before the member map: EnumType refuses to reassign a name that is already a member.
    type.__setattr__(PeftType, value, member)
    PeftType._member_map_[value] = member
    PeftType._value2member_map_[value] = member
    PeftType._member_names_.append(value)
    return member


def register_tuner(name: str, config_cls: type, model_cls: type) -> PeftType:
    """Register a tuner type with PEFT under `name` (lower case, e.g. "elastic_lora"); a no-op when already done."""
    peft_type = add_peft_type(name)
    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered is not None:
        if registered.__qualname__ != config_cls.__qualname__:
            raise RuntimeError(
                f"PEFT type {peft_type.value!r} is already registered to "
                f"{registered.__module__}.{registered.__name__}; cannot register "
                f"{config_cls.__module__}.{config_cls.__name__} under the same name."
            )
        # The same class (possibly re-created by a module reload): point PEFT at the newest objects.
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        return peft_type
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
    return peft_type
