"""The README stays short and true: under 200 lines, its test command is the one CI runs, the
built-in configs it names exist, and every relative link in it and in docs/ resolves."""

import re
from pathlib import Path

import pytest

from t2i import config as config_lib

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "cluster" / "README.md"]


def test_readme_is_short_and_its_test_command_is_cis():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert ".venv/bin/python -m pytest -q tests" in readme
    assert ".venv/bin/python -m pytest -q tests" in (REPO / ".ci" / "run").read_text()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc):
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if target.startswith(("http://", "https://", "#")):
            continue
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        assert path.exists(), f"{doc.name}: broken link {target}"


def test_the_configs_the_docs_name_are_built_in():
    text = "\n".join(p.read_text() for p in DOCS)
    named = set(re.findall(r"t2i (train|tune)[^\n`]*?--config ([\w./-]+)", text))
    assert {("train", "gan"), ("tune", "gan")} <= named
    for command, name in named:
        if not name.endswith(".toml"):  # not a file of the user's own
            folder = config_lib.SWEEP_CONFIGS if command == "tune" else config_lib.BUILTIN_CONFIGS
            assert config_lib.resolve_config_file(name, folder).is_file()
