"""User-facing errors.

Every mistake a user can make (a wrong path, an unsupported model, a bad query
file) is raised as `DroJaxError` with one line that names the file and the
problem; the CLI prints that line and exits with status 2 instead of showing a
traceback.
"""


class DroJaxError(Exception):
    """A problem with the user's input, explained in one line."""
