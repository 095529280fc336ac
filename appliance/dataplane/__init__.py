"""The on-device dataplane reconciler: reads /etc/appliance/dataplane.json and makes the kernel's
network state match it (WireGuard, addresses, routes, policy rule, sysctls, NIC offloads).

It runs inside the image on Debian's python3 with python3-pyroute2 and nothing else: this package
imports only the standard library and pyroute2, never the rest of `appliance`."""
