"""Layering: `models/` imports no data, training or CLI module; the package never imports the
config files of `configs/` (they import the package)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "dfer_clip_jax"


def _imported_modules(path: pathlib.Path) -> set[str]:
  out = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)
  return out


def test_models_import_only_models_and_the_tokenizer():
  allowed = ("dfer_clip_jax.models", "dfer_clip_jax.tokenizer")
  for path in sorted((PACKAGE / "models").glob("*.py")):
    ours = {m for m in _imported_modules(path) if m.startswith("dfer_clip_jax.")}
    bad = sorted(m for m in ours if not m.startswith(allowed))
    assert not bad, f"{path.name} imports {bad}"


def test_the_package_never_imports_configs():
  for path in sorted(PACKAGE.rglob("*.py")):
    bad = sorted(m for m in _imported_modules(path) if m == "configs" or m.startswith("configs."))
    assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"
