"""Synchronous OS I/O on the cipher directory, always relative to directory fds.

Nothing here follows a symlink in the backing tree or joins paths by hand: every entry is
reached with `*at` calls on an O_PATH fd of its parent or of itself.
"""
