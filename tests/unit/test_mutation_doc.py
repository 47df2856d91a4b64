"""docs/mutation.md and tests/mutate.py agree: every mutant is in the doc, every test exists."""

from __future__ import annotations

import re
from pathlib import Path

from tests.mutate import MUTANTS, ROOT


def test_every_mutant_is_documented_with_a_killer() -> None:
    text = (ROOT / "docs" / "mutation.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \| `", text, flags=re.M))
    assert documented == {m.name for m in MUTANTS}


def test_every_mutant_names_tests_that_exist_and_a_snippet_that_is_there() -> None:
    for mutant in MUTANTS:
        source = (ROOT / mutant.path).read_text()
        assert source.count(mutant.original) == 1, f"{mutant.name}: snippet moved"
        assert mutant.original != mutant.replacement
        for test in mutant.tests:
            path, _, name = test.partition("::")
            assert f"def {name}(" in Path(ROOT / path).read_text(), f"{mutant.name}: {test}"
