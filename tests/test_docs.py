"""The documentation's own consistency, without building the site (`make docs` does that, strictly):
every tested example is run by some test, the README's links reach files of this repository, and the
examples that no other test covers."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import DOC_TAG, REPO_ROOT, doc_block, doc_files


def test_every_tagged_example_is_run_by_a_test():
    tags = {name for path in doc_files() for name, _, _ in re.findall(DOC_TAG, path.read_text(), flags=re.S)}
    assert {"python-api", "python-api-modules", "own-method", "custom-data", "search"} <= tags
    used = {m for p in (REPO_ROOT / "tests").glob("test_*.py")
            for m in re.findall(r'doc_(?:block|blocks|commands)\("([\w-]+)"', p.read_text())}
    unused = sorted(tags - used)
    assert not unused, f"tagged examples that no test runs: {unused}"


def test_readme_links_reach_files_of_the_repository():
    text = (REPO_ROOT / "README.md").read_text()
    targets = {link.split("#")[0] for link in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in link}
    assert any(t.startswith("docs/") for t in targets)
    missing = sorted(t for t in targets if t and not (REPO_ROOT / t).exists())
    assert not missing, missing


def test_own_backbone_example_builds_peers_and_exports_one(tmp_path):
    """docs/extending.md's backbone, in its own process (registering a name is global)."""
    code = doc_block("own-backbone", "python") + (
        "import torch\n"
        "assert peers(torch.zeros(2, 3, 32, 32)).logits.shape == (4, 2, 100)\n"
        "assert deployed(torch.zeros(2, 3, 32, 32)).shape == (2, 100) and type(deployed) is StagedBackbone\n"
        "assert peers.trunk_channels == 32  # stem + first stage shared: their output, width 32\n"
        "print('backbone ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "backbone ok" in proc.stdout
