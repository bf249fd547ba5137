"""The names of the files in a run folder, defined once. Imports nothing, so the CLI can name a run's files to
recognise its own output folders without loading the libraries a run is read with (``--help`` stays instant)."""

CONFIG = "config.yaml"
WEIGHTS = "model.safetensors"
SUMMARY = "summary.json"
METRICS = "metrics.csv"
SPLIT = "split.csv"
CHECKPOINTS = "checkpoints"
STORE = "store.json"  # the store the run was trained on: path and fingerprint
EVALUATION = "evaluation"  # evaluation/<split>/metrics.json, one per split evaluate scored
EVALUATED = "metrics.json"  # the file in each evaluation/<split>/ folder
CV_CONFIG = "cv-config.yaml"  # train --all-folds: the settings of every fold, written before the first fold trains
