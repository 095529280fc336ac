"""Rendering: Profile + keys -> ConfigTree (the appliance's configuration files, as data)."""

from .renderer import DATAPLANE_JSON, dataplane_config, enabled_units, render
from .tree import ConfigTree, Entry

__all__ = ["DATAPLANE_JSON", "ConfigTree", "Entry", "dataplane_config", "enabled_units", "render"]
