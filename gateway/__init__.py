"""Kakehashi's node: everything that does I/O around the pure `federation` core.

Storage (`store`), TLS (`tls`), the federation API (`transport`), the roster's
authority (`authority`), peer health (`peers`), the running node (`node`), the
admin socket (`admin`), configuration (`config`), membership set-up
(`membership`), logs (`logging`) and the command line (`cli`).
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
