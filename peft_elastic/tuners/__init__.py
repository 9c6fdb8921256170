"""PEFT tuner types added by peft_elastic, one folder each (config.py, layer.py, model.py)."""
