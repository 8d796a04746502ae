"""The bad-input table in docs/robustness.md stays true: at least 60 cases, each naming a test that exists,
and the README points at it."""

from __future__ import annotations

import re

import pytest

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


# ------------------------------------------------------------------ the README and the docs site

README = PROJECT_ROOT / "README.md"
DOCS = PROJECT_ROOT / "docs"
MKDOCS_YML = PROJECT_ROOT / "mkdocs.yml"
_FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HTML_SRC = re.compile(r"<(?:img|a)\b[^>]*?(?:src|href)=\"([^\"]+)\"", re.I)


def _without_code(text: str) -> str:
    """Markdown with fenced code blocks and inline code spans removed (links there are not links)."""
    return re.sub(r"`[^`\n]*`", "", _FENCE.sub("", text))


def _relative_targets(text: str) -> list[str]:
    prose = _without_code(text)
    targets = _LINK.findall(prose) + _HTML_SRC.findall(prose)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I) and not t.startswith("#")]


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)


def _nav_files(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [f for value in node.values() for f in _nav_files(value)]
    if isinstance(node, list):
        return [f for item in node for f in _nav_files(item)]
    return []


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move details into docs/"


def test_readme_starts_with_the_two_commands():
    first_block = _FENCE.search(README.read_text()).group(0)
    assert "bash scripts/setup.sh && bash scripts/run_pipeline.sh" in first_block
    assert "bash scripts/setup.sh && bash scripts/test.sh" in first_block


def test_readme_relative_links_and_images_exist():
    text = README.read_text()
    targets = _relative_targets(text)
    assert targets, "no relative links found in README.md"
    missing = [t for t in targets if not (PROJECT_ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"
    images = re.findall(r"!\[[^\]]*\]\(\s*([^)\s]+)", _without_code(text))
    assert any(i.startswith("reports/plots/") and i.endswith(".png") for i in images), \
        "README.md embeds no plot from reports/plots/"


def test_docs_links_stay_inside_docs():
    """MkDocs only sees docs/: a link from a page to a repository file outside it breaks the site
    (name such files as code spans instead)."""
    problems = []
    for page in sorted(DOCS.rglob("*.md")):
        for target in _relative_targets(page.read_text()):
            path = target.split("#")[0]
            if not path:
                continue
            resolved = (page.parent / path).resolve()
            if not resolved.is_relative_to(DOCS.resolve()) or not resolved.exists():
                problems.append(f"{page.relative_to(PROJECT_ROOT)}: {target}")
    assert not problems, f"links from docs/ that MkDocs cannot follow: {problems}"


def test_every_docs_page_is_in_the_mkdocs_nav():
    import yaml

    config = yaml.safe_load(MKDOCS_YML.read_text())
    assert config.get("docs_dir", "docs") == "docs"
    nav = _nav_files(config["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(set(nav)) == pages, (
        f"not in mkdocs.yml nav: {sorted(set(pages) - set(nav))}; in nav but missing: {sorted(set(nav) - set(pages))}")
    assert len(nav) == len(set(nav)), "a page is listed twice in mkdocs.yml nav"


def test_readme_links_every_docs_page():
    text = README.read_text()
    for page in sorted(DOCS.glob("*.md")):
        assert f"docs/{page.name}" in text, f"README.md does not link docs/{page.name}"


def test_python_examples_call_names_the_package_has():
    """The README's example (and the API page's) call `pruneflow.<name>` with keywords the function takes."""
    import ast
    import inspect

    import pruneflow

    calls = []
    for source in (README, DOCS / "cli.md"):
        for block in _python_blocks(source.read_text()):
            for node in ast.walk(ast.parse(block)):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "pruneflow"):
                    calls.append((source.name, node.func.attr, [k.arg for k in node.keywords if k.arg]))
    names = {name for _, name, _ in calls}
    assert {"prune", "save_pruned", "load_pruned"} <= names, f"the README example calls only {sorted(names)}"
    for source, name, keywords in calls:
        assert hasattr(pruneflow, name), f"{source} calls pruneflow.{name}, which the package does not have"
        parameters = inspect.signature(getattr(pruneflow, name)).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            continue
        unknown = [k for k in keywords if k not in parameters]
        assert not unknown, f"{source}: pruneflow.{name} takes no keyword(s) {unknown}"


def test_readme_names_the_keywords_prune_takes():
    import inspect

    import pruneflow

    sentence = re.search(r"`pruneflow\.prune` also takes (.*?)\.\s", README.read_text(), re.S)
    assert sentence, "README.md no longer says which further keywords pruneflow.prune takes"
    keywords = re.findall(r"`(\w+)=`", sentence.group(1))
    assert keywords
    assert hasattr(pruneflow, "prune"), "pruneflow.prune does not exist"
    parameters = inspect.signature(pruneflow.prune).parameters
    assert [k for k in keywords if k not in parameters] == []


def test_readme_and_docs_cite_only_the_repository():
    for page in [README, *sorted(DOCS.rglob("*.md"))]:
        text = page.read_text()
        assert "DESIGN.md" not in text and "../shared" not in text, f"{page.name} cites a file outside the repository"


def test_mkdocs_build_is_strict_clean(tmp_path):
    import subprocess
    import sys

    pytest.importorskip("mkdocs")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(MKDOCS_YML),
         "--site-dir", str(tmp_path / "site")],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    assert (tmp_path / "site" / "index.html").is_file()
