"""The FUSE operations: the only package (with piccolofs.mount) that imports pyfuse3."""
