"""piccolofs: an encrypted FUSE filesystem whose on-disk format is gocryptfs 2.x."""

__version__ = "0.1.0"
