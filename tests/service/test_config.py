"""service.config: one declaration per setting, the README table generated from it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from service.config import TABLE_BEGIN, TABLE_END, Settings, settings_table
from service.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def test_readme_settings_table_is_current():
    text = (REPO / "README.md").read_text("utf-8")
    table = text[text.index(TABLE_BEGIN) + len(TABLE_BEGIN) : text.index(TABLE_END)].strip()
    assert table == settings_table(), "run: python -m service.config --update README.md"


def test_every_setting_has_a_meaning_and_a_row():
    table = settings_table()
    for name, field in Settings.model_fields.items():
        assert field.description, name
        assert f"`VQE_{name.upper()}`" in table


def test_nothing_writes_os_environ():
    for path in (REPO / "service").rglob("*.py"):
        tree = ast.parse(path.read_text("utf-8"))
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            for target in targets:
                text = ast.unparse(target)
                assert not text.startswith("os.environ"), f"{path}: {text}"
            if isinstance(node, ast.Call) and ast.unparse(node.func) in (
                "os.environ.update",
                "os.environ.setdefault",
                "os.putenv",
            ):
                raise AssertionError(f"{path}: {ast.unparse(node)}")


def test_flags_override_the_environment_and_bad_values_name_the_variable(tmp_path):
    env = {"VQE_WORKERS": "2", "VQE_PORT": "9000", "VQE_QUEUE_URL": ""}
    s = Settings.from_env(env, workers=5, data_dir=tmp_path, host=None)
    assert (s.workers, s.port, s.host, s.queue_url) == (5, 9000, "127.0.0.1", None)
    for bad in (
        {"VQE_PORT": "0"},
        {"VQE_LOG_FORMAT": "xml"},
        {"VQE_DEVICE": "tpu"},
        {"VQE_WORKERS": "0"},
    ):
        with pytest.raises(UserError, match=next(iter(bad))):
            Settings.from_env(bad)
