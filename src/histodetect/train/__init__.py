"""Training: the typed config, the Lightning module and callbacks, and the run folder."""
