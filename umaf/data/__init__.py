"""Readers of the published dataset formats, the manifest every later stage reads, and the demo set."""
