"""How every benchmark hands over its result: printed, and optionally kept as Markdown."""

from __future__ import annotations


def publish(header: str, table: str, markdown: str | None) -> None:
    """Print the machine line and the table; with `markdown`, also write both to that file."""
    print(header)
    print(table)
    if markdown:
        with open(markdown, "w", encoding="utf-8") as f:
            f.write(header + "\n\n" + table + "\n")
