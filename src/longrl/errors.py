"""One exception type for bad user input.

Anything a user can fix (a typo in a config key, a missing file, a malformed JSONL line)
raises `UserError`. The CLI prints its message on one line and exits with status 2; no
traceback. Library code never calls `sys.exit` itself.
"""


class UserError(Exception):
    """Bad input the user can fix. The message names the problem and the fix."""
