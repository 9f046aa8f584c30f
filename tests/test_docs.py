"""The documentation's own consistency, without building the site (`make docs` does that, strictly):
every tested example is run by some test, and the README's links reach files of this repository."""

from __future__ import annotations

import re

from conftest import DOC_TAG, REPO_ROOT, doc_files


def test_every_tagged_example_is_run_by_a_test():
    tags = {name for path in doc_files() for name, _, _ in re.findall(DOC_TAG, path.read_text(), flags=re.S)}
    assert {"python-api", "python-api-modules", "own-method", "custom-data", "search"} <= tags
    tests = "\n".join(p.read_text() for p in (REPO_ROOT / "tests").glob("test_*.py") if p.name != "test_docs.py")
    unused = sorted(tag for tag in tags if f'"{tag}"' not in tests)
    assert not unused, f"tagged examples that no test runs: {unused}"


def test_readme_links_reach_files_of_the_repository():
    text = (REPO_ROOT / "README.md").read_text()
    targets = {link.split("#")[0] for link in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in link}
    assert any(t.startswith("docs/") for t in targets)
    missing = sorted(t for t in targets if t and not (REPO_ROOT / t).exists())
    assert not missing, missing
