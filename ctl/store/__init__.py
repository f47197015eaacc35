"""The control store: one SQLite database on the encrypted control volume."""
