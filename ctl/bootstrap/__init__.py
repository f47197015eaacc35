"""Booting before the password: the TPM-sealed bootstrap key and the pre-unlock assets."""
