"""Read a page fedct writes back into its parts, for tests: section headings, tables, images."""

from __future__ import annotations

from html.parser import HTMLParser


class Page(HTMLParser):
    """Section titles (h2), sub-headings (h3), tables (rows of cell texts), images' alt texts
    and the summaries of collapsed parts, in page order."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.headings: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.summaries: list[str] = []
        self._tag: str | None = None
        self._text: list[str] = []
        self._row: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("h2", "h3", "summary", "td", "th"):
            self._tag, self._text = tag, []
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = []
        elif tag == "img":
            self.images.append(dict(attrs).get("alt") or "")

    def handle_data(self, data: str) -> None:
        if self._tag is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        text = "".join(self._text).strip()
        if tag == self._tag == "h2":
            self.sections.append(text)
        elif tag == self._tag == "h3":
            self.headings.append(text)
        elif tag == self._tag == "summary":
            self.summaries.append(text)
        elif tag in ("td", "th") and self._row is not None:
            self._row.append(text)
        elif tag == "tr" and self._row is not None and self.tables:
            self.tables[-1].append(self._row)
            self._row = None
        if tag == self._tag:
            self._tag = None

    def table_with(self, header: str) -> list[list[str]]:
        """The first table whose first row holds ``header``."""
        return next(t for t in self.tables if t and header in t[0])
