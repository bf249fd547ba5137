"""Every error a user can fix (a bad file, a bad flag), in one module with no heavy imports.

The CLI prints these as one line and exits with code 2; anything else is a bug and keeps its traceback. They live
here, below every layer, so that data, models, train and infer can raise them without importing each other.
"""


class UserError(Exception):
    """An error in what the user gave: the message names the file or setting and the problem."""


class ConfigError(UserError, ValueError):
    """A configuration value or file that cannot describe a run."""


class ModelError(ConfigError):
    """A model name or weights that cannot make the requested model; the message names the file, if any."""


class IngestError(UserError):
    """A source that cannot be ingested as asked (a missing folder, a refused output path)."""


class StoreError(UserError):
    """A store folder that is missing, incomplete, damaged, or of a format this version cannot read."""


class InferError(UserError, ValueError):
    """Input to predict, evaluate, explain, slide, serve or export that cannot be used as given."""
