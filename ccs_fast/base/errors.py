"""User-facing errors (SPEC §9).

A ``CCSError`` carries one line that names the file and what is wrong; the CLI prints it
alone (no traceback) and exits with status 2. Code raises it only for bad input that a user
can fix, never for programming errors.
"""


class CCSError(Exception):
    """Bad input a user can fix: the message is one line naming the file and the problem."""

    def __init__(self, message: str):
        if "\n" in message:
            message = " ".join(part.strip() for part in message.splitlines() if part.strip())
        super().__init__(message)


def bad_file(path, problem: str) -> CCSError:
    """``CCSError`` for a problem with one file: ``"<path>: <problem>"``."""
    return CCSError(f"{path}: {problem}")


def read_failure(path, exc: OSError, reading: str, missing: str) -> CCSError:
    """``CCSError`` for a failed read of ``path``: ``"<path>: <missing>"`` when it is not
    there, else ``"<path>: <reading> (<reason>)"``, the reason in lower-case words
    (``permission denied``, ``a folder, not a file``, or the system's own)."""
    if isinstance(exc, FileNotFoundError):
        return bad_file(path, missing)
    if isinstance(exc, PermissionError):
        reason = "permission denied"
    elif isinstance(exc, IsADirectoryError):
        reason = "a folder, not a file"
    else:
        reason = exc.strerror or str(exc)
    return bad_file(path, f"{reading} ({reason})")
