"""Verification: testinfra suites run against the built root tree (chroot) and the booted image (ssh)."""

from .static import TreeVerification, verify_tree

__all__ = ["TreeVerification", "verify_tree"]
