"""The repository's own documents carry the contract (issue 24: the README linked to a file
outside the repository, and its examples had to be copied out of the prose by hand)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from service.api.contract_doc import current
from service.schemas.examples import PLAN_EXAMPLES
from service.schemas.spec import PlanSpec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.json"))


def test_the_contract_page_is_the_served_schema() -> None:
    """Regenerate with `make spec-doc` when this fails."""
    assert (ROOT / "docs" / "spec.md").read_text() == current()


def test_the_readme_links_nothing_outside_the_repository() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "../" not in readme
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if not target.startswith(("http://", "https://", "mailto:")):
            assert (ROOT / target).exists(), target


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_file_is_a_valid_spec(path: Path) -> None:
    PlanSpec.model_validate_json(path.read_text())


def test_the_example_files_are_the_openapi_examples() -> None:
    """One source: the files are the specs /docs offers, written out."""
    served = [e["value"] for e in PLAN_EXAMPLES.values()]
    files = [json.loads(p.read_text()) for p in EXAMPLES]
    assert sorted(map(json.dumps, served)) == sorted(map(json.dumps, files))


def test_the_readmes_commands_use_files_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    used = set(re.findall(r"examples/[\w.-]+\.json", readme))
    assert used, "the README runs no example"
    for name in used:
        assert (ROOT / name).is_file(), name
    assert "$ID" not in readme.split("ID=", 1)[0]  # $ID is set before it is used
