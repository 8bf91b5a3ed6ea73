"""What a site's error reply may say: ``site 'NAME': CATEGORY: reason``, in a fixed vocabulary.

An error reply is all the coordinator learns of a site's failure, and the coordinator may be
hostile, so the reason carries no exception text, no path and no value of the site's: one
category of :data:`CATEGORIES` and a short reason made of fixed text, key names of the message
schema (common/federation/messages.py) and numbers the coordinator sent itself.  The site's
own log keeps the details.

The name comes first because a site whose cache or configuration is broken fails before it
ever sends a successful reply: the coordinator reads it back (server/roster.py) to name the
site on its card.
"""

from __future__ import annotations

import re

CATEGORIES = {
    "schema": "the message breaks the protocol's schema",
    "policy": "the message asks for more than the site's policy allows",
    "privacy": "the site's privacy rules decline the round",
    "transport": "the weights do not fit the model the message describes",
    "egress": "the site's egress guard blocked the reply (details in its audit log)",
    "site": "the site cannot serve the run (details in the site's log)",
    "internal": "the site's ClientApp failed (details in the site's log)",
}
MAX_REASON = 240
_PRINTABLE = re.compile(r"[ -~]*")
_REASON = re.compile(
    rf"^site '([^'\n]{{1,200}})': ({'|'.join(CATEGORIES)}): [ -~]{{1,{MAX_REASON}}}$"
)


class SiteRefusal(ValueError):
    """The site declines a message; ``reason`` is what may leave the site.

    Subclasses fix the category; their text is built only from fixed words, schema key names
    and the coordinator's own numbers (:func:`number`)."""

    category = "site"

    def __init__(self, text: str) -> None:
        if not _PRINTABLE.fullmatch(text) or not 0 < len(text) <= MAX_REASON:
            raise ValueError("a refusal's text must be short printable ASCII")
        super().__init__(text)
        self.text = text

    @property
    def reason(self) -> str:
        return f"{self.category}: {self.text}"


class SchemaError(SiteRefusal):
    """The message breaks the protocol's schema."""

    category = "schema"


class PolicyError(SiteRefusal):
    """The message asks for more than the site's policy allows."""

    category = "policy"


class PrivacyRefusal(SiteRefusal):
    """The site's privacy rules decline the round."""

    category = "privacy"


def number(value: float) -> str:
    """A number the coordinator sent, as a reason shows it."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def site_error_reason(site: str, reason: str) -> str:
    """The reason of an error reply of ``site``: its name, then ``CATEGORY: text``."""
    return f"site '{site}': {reason}"


def fixed_reason(category: str) -> str:
    """The reason of a failure whose details stay at the site: the category's fixed text."""
    return f"{category}: {CATEGORIES[category]}"


def site_of_reason(reason: str) -> str | None:
    """The site an error reply's reason names, None when it names none."""
    match = _REASON.match(reason)
    return match.group(1) if match else None


def in_vocabulary(reason: str) -> bool:
    """Whether an error reply's reason is of the form this module makes."""
    return _REASON.match(reason) is not None
