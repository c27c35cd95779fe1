"""The layout's rules, read from the source: what each layer may import, presentation without torch, files and
classes of a readable size, and a README file map with a line for every module."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CODE = sorted([*ROOT.glob("utils/**/*.py"), *ROOT.glob("ui/**/*.py"), ROOT / "app.py"])
MAX_FILE_LINES = 400  # more only with a reason in the module docstring ("Long because ...")
MAX_CLASS_LINES = 160


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> list[str]:
    """Modules imported by the file: every import, or those at module level (not inside functions)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # module level includes `if TYPE_CHECKING:` and try blocks, not function bodies
        nodes = [
            n
            for top in tree.body
            if not isinstance(top, (ast.FunctionDef, ast.ClassDef))
            for n in ast.walk(top)
        ]
    names = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def _files(package: str) -> list[Path]:
    return [p for p in CODE if _module(p) == package or _module(p).startswith(package + ".")]


@pytest.mark.parametrize("path", _files("utils.core"), ids=lambda p: p.name)
def test_core_imports_only_the_standard_library(path):
    for name in _imports(path, top_level_only=True):
        root = name.split(".")[0]
        assert root in sys.stdlib_module_names or name.startswith("utils.core") or root == "__future__", (
            f"{path.name} imports {name}"
        )


@pytest.mark.parametrize("path", _files("utils"), ids=lambda p: str(p.relative_to(ROOT)))
def test_utils_never_imports_gradio_or_the_ui(path):
    for name in _imports(path, top_level_only=False):
        assert name.split(".")[0] not in ("gradio", "ui", "spaces"), f"{path.name} imports {name}"


@pytest.mark.parametrize("path", [*_files("utils.runtime"), *_files("utils.serving")], ids=lambda p: p.name)
def test_runtime_never_imports_the_analyses_or_the_task(path):
    for name in _imports(path, top_level_only=False):
        assert not name.startswith(("utils.analysis", "utils.task")), f"{path.name} imports {name}"


@pytest.mark.parametrize(
    "path", [*_files("utils.analysis"), *_files("utils.task")], ids=lambda p: str(p.relative_to(ROOT))
)
def test_analyses_and_the_task_reach_the_runtime_only_inside_functions(path):
    for name in _imports(path, top_level_only=True):
        assert not name.startswith("utils.runtime"), f"{path.name} imports {name} at module level"


def test_the_tabs_talk_to_the_model_only_through_the_seam():
    """No module of the UI imports the runtime at module level; the one import of the engine is the Lens's
    helper that wraps a loaded pair."""
    for path in _files("ui"):
        for name in _imports(path, top_level_only=True):
            assert not name.startswith("utils.runtime"), f"{path.name} imports {name}"
    lazy = [(p.name, n) for p in _files("ui") for n in _imports(p, False) if n.startswith("utils.runtime")]
    assert lazy == [("lens.py", "utils.runtime.engine")]


def test_presentation_and_the_seam_load_without_torch():
    code = (
        "import sys\n"
        "import ui.views, ui.views.lens, ui.views.anatomy, ui.views.sweep\n"
        "import utils.core.seam, utils.core.inputs, utils.analysis.token_lens, utils.task.pricing\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'gradio') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("path", CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_files_and_classes_stay_readable(path):
    source = path.read_text()
    tree = ast.parse(source)
    if len(source.splitlines()) > MAX_FILE_LINES:
        assert "Long because" in (ast.get_docstring(tree) or ""), f"{path.name}: over {MAX_FILE_LINES} lines"
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            assert node.end_lineno - node.lineno + 1 <= MAX_CLASS_LINES, f"{path.name}: class {node.name}"


@pytest.mark.parametrize(
    "package",
    [
        "utils",
        "utils.core",
        "utils.runtime",
        "utils.serving",
        "utils.analysis",
        "utils.task",
        "ui",
        "ui.views",
    ],
)
def test_every_package_says_what_lives_there(package):
    init = ROOT.joinpath(*package.split("."), "__init__.py")
    doc = ast.get_docstring(ast.parse(init.read_text())) or ""
    assert len(doc.splitlines()) >= 2
    if package.startswith("utils."):
        assert "May import" in doc


def test_the_readme_file_map_has_a_line_for_every_module():
    readme = (ROOT / "README.md").read_text()
    files = readme[readme.index("## Files") :]
    missing = [
        str(p.relative_to(ROOT))
        for p in CODE
        if p.name != "__init__.py" or p.parent.name == "views"
        if f"`{p.relative_to(ROOT)}`" not in files
    ]
    assert missing == []
