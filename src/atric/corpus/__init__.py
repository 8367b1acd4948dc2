"""Corpora: the embedded synthetic corpus (synth) and importers of real release formats."""
