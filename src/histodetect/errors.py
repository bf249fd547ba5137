"""The one base class for errors a user can fix (a bad file, a bad flag).

The CLI prints these as one line and exits with code 2; anything else is a bug and keeps its traceback. Kept in a
module with no heavy imports so that the CLI can catch them without loading torch.
"""


class UserError(Exception):
    """An error in what the user gave: the message names the file or setting and the problem."""
