"""appliance: declarative image builder for WireGuard edge appliances."""

__version__ = "0.1.0"
