"""The layout is the architecture: arrows point only downwards (jobs → pipelines → ssd), and a
stage of `pipelines/` uses `data`, `track` and `common`, never another stage's internals."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("data", "train", "label", "serve", "track")
SHARED = ("data", "track", "common")  # what any stage may use


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (lazy imports inside functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", _modules("ssd"), ids=lambda p: p.name)
def test_the_numerics_import_no_ray_mlflow_pipelines_or_jobs(path):
    bad = {m for m in _imports(path) if m.split(".")[0] in ("ray", "mlflow", "pipelines", "jobs", "argparse")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", _modules("pipelines"), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_stage_uses_only_data_track_and_common(path):
    parts = path.relative_to(ROOT / "pipelines").parts
    stage = parts[0] if len(parts) > 1 else None  # None: pipelines/common.py, pipelines/__init__.py
    for module in _imports(path):
        names = module.split(".")
        assert names[0] != "jobs", (
            f"{path.relative_to(ROOT)} imports {module}: pipelines never parse arguments"
        )
        if names[0] != "pipelines" or len(names) < 2:
            continue
        other = names[1]
        if stage is None:
            assert other == "common", f"pipelines/{path.name} imports {module}"
        elif other not in (stage, *SHARED) and other in STAGES:
            pytest.fail(
                f"{path.relative_to(ROOT)} (stage {stage}) imports {module}, another stage's internals"
            )
        if stage in ("data", "track") and other in STAGES and other not in (stage, "data", "track"):
            pytest.fail(f"{path.relative_to(ROOT)} imports {module}: data and track sit below the stages")


def test_every_stage_is_a_package_and_tests_mirror_them():
    for stage in STAGES:
        assert (ROOT / "pipelines" / stage / "__init__.py").is_file(), stage
        assert (ROOT / "tests" / stage).is_dir(), f"tests/{stage} missing"
    assert not [
        p.name for p in (ROOT / "pipelines").glob("*.py") if p.name not in ("__init__.py", "common.py")
    ]
