"""Rendering: Profile + keys -> ConfigTree (the appliance's configuration files, as data)."""

from .renderer import DATAPLANE_JSON, appliance_units, dataplane_config, enabled_units, render
from .tree import ConfigTree, Entry

__all__ = [
    "DATAPLANE_JSON",
    "ConfigTree",
    "Entry",
    "appliance_units",
    "dataplane_config",
    "enabled_units",
    "render",
]
