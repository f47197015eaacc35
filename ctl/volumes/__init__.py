"""Volumes: encrypted cipher dirs, their sealed keys, journals and supervised mounts."""
