"""Rendering: Profile + keys -> ConfigTree (the appliance's configuration files, as data)."""

from .renderer import DATAPLANE_JSON, appliance_units, dataplane_config, enabled_units, render
from .spec import ImageSpec, image_spec
from .tree import ConfigTree, Entry

__all__ = [
    "DATAPLANE_JSON",
    "ConfigTree",
    "Entry",
    "ImageSpec",
    "appliance_units",
    "dataplane_config",
    "enabled_units",
    "image_spec",
    "render",
]
