"""Readers and writers, one module per format; every reader returns an OctVolume."""
