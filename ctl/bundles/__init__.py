"""Backups of a device: PCV bundles, exports, imports."""
