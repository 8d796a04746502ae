"""The bad-input table in docs/robustness.md stays true: at least 60 cases, each naming a test that exists,
and the README points at it."""

from __future__ import annotations

import re

from .conftest import PROJECT_ROOT

DOC = PROJECT_ROOT / "docs/robustness.md"


def test_bad_input_table_names_existing_tests():
    rows = [line for line in DOC.read_text().splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) >= 60
    for row in rows:
        references = re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", row)
        assert references, f"row without a test: {row}"
        for path, name in references:
            source = (PROJECT_ROOT / path).read_text()
            assert re.search(rf"^def {name}\(", source, re.M), f"{path}::{name} named in {DOC.name} does not exist"
    numbers = [int(row.split("|")[1]) for row in rows]
    assert numbers == list(range(1, len(rows) + 1))


def test_readme_links_the_robustness_page():
    assert "docs/robustness.md" in (PROJECT_ROOT / "README.md").read_text()
