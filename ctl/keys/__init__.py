"""The system data-encryption key (SDEK): sealing, unlocking, recovery keys."""
