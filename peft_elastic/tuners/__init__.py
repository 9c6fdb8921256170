"""PEFT tuner types added by peft_elastic, one folder each (config.py, layer.py, model.py)."""

from .._registry import register_tuners

register_tuners()  # PEFT knows the types as soon as their classes exist
