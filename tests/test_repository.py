"""The repository as a Space receives it and as a reader meets it: weights behind LFS/Xet attributes, every
environment variable the code reads in the README's settings table, one Python floor everywhere."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HUB_PLAIN_FILE_LIMIT = 10 * 1024 * 1024  # the Hub refuses larger files that are not stored through LFS/Xet
CODE = sorted([*ROOT.glob("utils/**/*.py"), *ROOT.glob("ui/**/*.py"), ROOT / "app.py"])
# environ.get("X"), env.get("X"), environ.setdefault("X", ...), getenv("X"), and LORA_LENS_* names in constants
_READ = re.compile(r"""(?:environ|env)\s*(?:\.get|\.setdefault|\.pop)\(\s*["']([A-Z][A-Z0-9_]+)["']""")
_OWN = re.compile(r"""["'](LORA_LENS_[A-Z0-9_]+)["']""")


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name]


def test_no_tracked_file_over_10_mib_lacks_an_lfs_attribute():
    large = [
        name
        for name in _tracked()
        if (ROOT / name).is_file() and (ROOT / name).stat().st_size > HUB_PLAIN_FILE_LIMIT
    ]
    assert "adapters/smollm2-pricer/adapter_model.safetensors" in large  # the check has something to check
    attrs = subprocess.run(
        ["git", "check-attr", "filter", "--", *large], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    uncovered = [line.split(":")[0] for line in attrs.splitlines() if not line.endswith(": filter: lfs")]
    assert uncovered == [], "add these to .gitattributes (filter=lfs) before pushing to a Space"


def _variables_the_code_reads() -> set[str]:
    names = set()
    for path in CODE:
        text = path.read_text()
        names |= set(_READ.findall(text)) | set(_OWN.findall(text))
    return names


def _settings_table() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Profiles and settings") :]
    section = section[: section.index("\n## ", 3)]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1])}


def test_the_readme_settings_table_names_every_variable_the_code_reads():
    read = _variables_the_code_reads()
    assert {"LORA_LENS_PROFILE", "LORA_LENS_CPU_KERNEL", "CXX", "XDG_CACHE_HOME", "HF_TOKEN"} <= read
    assert sorted(read - _settings_table()) == []
    assert sorted(_settings_table() - read) == []  # and nothing the code no longer reads


def test_one_python_floor_everywhere():
    """Python 3.11: the pinned numpy, pandas, transformers and matplotlib need it."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.11"' in pyproject and 'target-version = "py311"' in pyproject
    readme = (ROOT / "README.md").read_text()
    assert "Python 3.11+" in readme and "3.10" not in readme
