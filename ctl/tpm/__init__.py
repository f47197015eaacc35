"""The TPM: secrets sealed to the measured boot state."""
