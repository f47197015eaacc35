"""The gocryptfs 2.x on-disk format: pure functions and value objects, bytes in, bytes out.

Nothing in this package performs I/O, spawns tasks or knows about FUSE; the layers above
(`piccolofs.backing`, `piccolofs.fs`) read and write the bytes these functions produce.
"""
