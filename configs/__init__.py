"""Fit presets: PadimConfig fields plus fit options, one YAML file each (installed as `padim_hf.configs`)."""
