"""Seeded phantoms with known truth, their vendor-format writers and realism statistics."""
