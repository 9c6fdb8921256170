"""Make peft_elastic's tuner types real members of PEFT's closed `PeftType` enum and register them.

PEFT has no plugin discovery: `register_peft_method` only accepts names that are already members of `PeftType`,
so the enum is extended first. Both steps are idempotent, so importing the package twice (or reloading it) is safe.

`import peft_elastic` loads no PEFT (it is slow to import, and brings bitsandbytes and torchao with it), so the
registration waits for PEFT: `register_when_peft_imports` registers at once if PEFT is imported, else it puts a
one-shot finder on `sys.meta_path` that, when `peft` is imported, runs PEFT's own loader and then imports
`peft_elastic.tuners`, whose `__init__` registers the three types; importing any of our tuner modules registers
them the same way, whoever imported PEFT first. Of ours this module imports only `_import_noise` (the tuners by name,
once PEFT is there): it belongs to the neutral layer, below the tuners.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

from ._import_noise import quiet_import_noise


def add_peft_type(name: str):
    """Return the `PeftType` member called `name` (upper case), adding it to the enum if it is missing."""
    from peft.utils import PeftType

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


def register_tuner(name: str, config_cls: type, model_cls: type):
    """Register a tuner type with PEFT under `name` (lower case, e.g. "elastic_lora"); a no-op when already done."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

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


def _import_tuners() -> None:
    # Being imported already means registered, or about to be: the import of our tuners that imported PEFT is
    # still running, and its `__init__` registers when it ends (importing it again here would be circular).
    if "peft_elastic.tuners" not in sys.modules:
        with quiet_import_noise():
            importlib.import_module("peft_elastic.tuners")


class _ThenRegister(importlib.abc.Loader):
    """PEFT's own loader, then our tuners."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        with quiet_import_noise():  # what PEFT's optional back-ends log when imported on a CPU machine
            self.loader.exec_module(module)
        _import_tuners()

    def __getattr__(self, name: str):
        return getattr(self.loader, name)


class _WhenPeftImports(importlib.abc.MetaPathFinder):
    """Finds `peft` as the other finders do and hands its spec a loader that registers our tuners after PEFT."""

    def find_spec(self, name, path=None, target=None):
        if name != "peft":
            return None
        sys.meta_path[:] = [finder for finder in sys.meta_path if finder is not self]  # one shot
        spec = importlib.util.find_spec("peft")
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader)
        return spec


def register_when_peft_imports() -> None:
    """Register our tuner types now if PEFT is imported, else the moment it is (idempotent)."""
    if "peft" in sys.modules:
        _import_tuners()
    elif not any(isinstance(finder, _WhenPeftImports) for finder in sys.meta_path):
        sys.meta_path.insert(0, _WhenPeftImports())
