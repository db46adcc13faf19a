"""Labelling on Ray Data: detector actors over image sets (`batch`) and what they write (`outputs`)."""
