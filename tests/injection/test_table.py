"""The injection table in the docs is the one the injection tests check (issue 10 part 3)."""

from __future__ import annotations

from tests.injection import gen_table
from tests.injection.outcomes import cases


def test_committed_table_equals_the_generated_one():
    assert gen_table.TABLE.is_file(), "run python3 -m tests.injection.gen_table"
    assert gen_table.TABLE.read_text(encoding="utf-8") == gen_table.render(cases()), \
        "docs/injection-table.rst is stale: run python3 -m tests.injection.gen_table"


def test_hardening_page_includes_the_table():
    text = (gen_table.TABLE.parent / "hardening.rst").read_text(encoding="utf-8")
    assert ".. include:: injection-table.rst" in text
    assert gen_table.TABLE.read_text(encoding="utf-8").startswith(":orphan:\n\n")


def test_check_mode(capsys):
    assert gen_table.main(["--check"]) == 0
