"""The README's bad-input table stays true: at least 25 cases, each naming a test that exists."""

from __future__ import annotations

import re

from .conftest import PROJECT_ROOT

SECTION = "## When something is wrong"


def test_bad_input_table_names_existing_tests():
    readme = (PROJECT_ROOT / "README.md").read_text()
    section = readme[readme.index(SECTION):]
    section = section[: section.index("\n## ", 1)]
    rows = [line for line in section.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) >= 25
    for row in rows:
        references = re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", row)
        assert references, f"row without a test: {row}"
        for path, name in references:
            source = (PROJECT_ROOT / path).read_text()
            assert re.search(rf"^def {name}\(", source, re.M), f"{path}::{name} named in the README does not exist"
    numbers = [int(row.split("|")[1]) for row in rows]
    assert numbers == list(range(1, len(rows) + 1))
