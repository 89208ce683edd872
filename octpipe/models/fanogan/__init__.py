"""f-AnoGAN as specified by the official code (see FANOGAN-SPEC.md)."""
