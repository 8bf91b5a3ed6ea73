"""How a site's error reply names the site: ``site 'NAME': what went wrong``.

A site whose cache or configuration is broken fails before it ever sends a successful reply,
so the coordinator could name it only by its node id.  The hospital's ClientApp prefixes the
reason of the error replies it makes itself (client/site_errors.py) with the site's name, and
the coordinator reads it back (server/roster.py).
"""

from __future__ import annotations

import re

_PREFIX = re.compile(r"^site '([^'\n]{1,200})': ")


def site_error_reason(site: str, message: str) -> str:
    """The reason of an error reply of ``site``: its name, then the one-line message."""
    return f"site '{site}': " + " ".join(message.split())


def site_of_reason(reason: str) -> str | None:
    """The site an error reply's reason names, None when it names none."""
    match = _PREFIX.match(reason)
    return match.group(1) if match else None
