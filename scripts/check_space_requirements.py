"""Check that requirements.txt installs on the Space: its Python, manylinux x86_64, wheels only.

Asks pip to resolve requirements.txt for the README header's `python_version` on manylinux x86_64 without
installing anything (`pip install --dry-run --report`), together with `gradio[oauth]==<sdk_version>`, which a
gradio Space installs on top of requirements.txt. Fails (exit 1, a clear message) on any conflict or missing
wheel, when the header's `sdk_version` is not the gradio pinned in requirements.txt, and when a pinned
package resolves to another version. Needs PyPI (or $PIP_INDEX_URL); exits 2 when it cannot be reached. This
machine's pip configuration is ignored, so the resolve is the one a Space would make.

    python scripts/check_space_requirements.py [--readme README.md] [--requirements requirements.txt]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The Space's image is Debian bookworm (glibc 2.36); torch's wheels need manylinux_2_28. pip does not expand a
# glibc tag into the older ones, so every tag a wheel there may carry is named: manylinux_2_28 down to 2_5
# (NCCL's wheels say 2_18), the legacy aliases, and plain linux.
PLATFORMS = (
    *(f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)),
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
)
# This machine's pip configuration (local wheel folders, a torch cap) must not leak into a Space's resolve.
LOCAL_PIP_SETTINGS = ("PIP_FIND_LINKS", "PIP_CONSTRAINT", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX", "PIP_TARGET")
UNREACHABLE = 2  # exit status when PyPI cannot be reached: the check could not run, which is not a failure
PYPI_SIMPLE = "https://pypi.org/simple"


class SpaceCheckError(Exception):
    """The Space would not install or not match: the message says what and where."""


def check_index_reachable(timeout: float = 20) -> None:
    """Raise ConnectionError unless the package index answers (pip's offline errors read like conflicts)."""
    import ssl
    import urllib.error
    import urllib.request

    index = os.environ.get("PIP_INDEX_URL", PYPI_SIMPLE).rstrip("/")
    context = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)
    try:
        with urllib.request.urlopen(f"{index}/gradio/", timeout=timeout, context=context) as response:
            response.read(1)
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionError(f"{index} cannot be reached ({exc})") from exc


def read_space_header(readme: Path) -> dict:
    """The YAML block between the first two `---` lines of the README (the Space's configuration)."""
    import yaml

    match = re.match(r"^---\n(.*?)\n---\n", readme.read_text(encoding="utf-8"), re.DOTALL)
    if not match:
        raise SpaceCheckError(f"{readme} has no YAML header between --- lines.")
    return yaml.safe_load(match.group(1))


def pinned_versions(requirements: Path) -> dict[str, str]:
    """{normalized name: version} for every `name==version` line (comments and options skipped)."""
    pins = {}
    for line in requirements.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*==\s*([^\s;]+)", line)
        if match:
            pins[normalize(match.group(1))] = match.group(3)
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check_sdk_version(header: dict, pins: dict[str, str]) -> None:
    sdk_version = str(header.get("sdk_version", ""))
    if header.get("sdk") != "gradio":
        raise SpaceCheckError(f"The README header's sdk is {header.get('sdk')!r}, not 'gradio'.")
    if pins.get("gradio") != sdk_version:
        raise SpaceCheckError(
            f"The README header's sdk_version ({sdk_version or 'missing'}) differs from requirements.txt's "
            f"gradio=={pins.get('gradio', '(not pinned)')}: the Space would install both and one would win. "
            "Make them equal."
        )


def pip_command(requirements: Path, python_version: str, gradio_version: str, report: Path, target: Path):
    command = [
        sys.executable, "-m", "pip", "--disable-pip-version-check", "install", "--dry-run",
        "--ignore-installed", "--report", str(report), "--target", str(target), "--only-binary=:all:",
        "--implementation", "cp", "--python-version", python_version,
        "-r", str(requirements), f"gradio[oauth]=={gradio_version}",
    ]  # fmt: skip
    for platform in PLATFORMS:
        command += ["--platform", platform]
    return command


def check_report(report: dict, pins: dict[str, str]) -> dict[str, str]:
    """{name: version} pip would install; raises if a pinned package would get another version."""
    chosen = {
        normalize(item["metadata"]["name"]): item["metadata"]["version"] for item in report.get("install", [])
    }
    wrong = {
        name: (version, chosen.get(name)) for name, version in pins.items() if chosen.get(name) != version
    }
    if wrong:
        lines = ", ".join(
            f"{name}=={want} resolved to {got or 'nothing'}" for name, (want, got) in wrong.items()
        )
        raise SpaceCheckError(f"pinned packages would not install as pinned: {lines}")
    return chosen


def check(readme: Path, requirements: Path) -> dict[str, str]:
    """Run every check; returns what pip would install. Raises SpaceCheckError, or ConnectionError offline."""
    header = read_space_header(readme)
    pins = pinned_versions(requirements)
    check_sdk_version(header, pins)
    python_version = str(header.get("python_version", ""))
    if not re.fullmatch(r"3\.\d+(\.\d+)?", python_version):
        raise SpaceCheckError(f"The README header's python_version {python_version!r} is not a 3.x version.")
    check_index_reachable()
    with tempfile.TemporaryDirectory(prefix="space-check-") as tmp:
        report_path = Path(tmp) / "report.json"
        command = pip_command(requirements, python_version, pins["gradio"], report_path, Path(tmp) / "target")
        env = {name: value for name, value in os.environ.items() if name not in LOCAL_PIP_SETTINGS}
        env["PIP_CONFIG_FILE"] = os.devnull  # pip then reads no configuration file at all
        result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
        output = result.stdout + result.stderr
        if result.returncode != 0:
            raise SpaceCheckError(
                f"pip cannot install {requirements.name} for Python {python_version} on manylinux x86_64 "
                f"(wheels only):\n{output.strip()[-4000:]}"
            )
        report = json.loads(report_path.read_text())
    return check_report(report, pins)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--requirements", type=Path, default=ROOT / "requirements.txt")
    args = parser.parse_args(argv)
    try:
        chosen = check(args.readme, args.requirements)
    except ConnectionError as exc:
        print(f"check_space_requirements: not run: {exc}", file=sys.stderr)
        return UNREACHABLE
    except SpaceCheckError as exc:
        print(f"check_space_requirements: FAILED: {exc}", file=sys.stderr)
        return 1
    header = read_space_header(args.readme)
    print(
        f"check_space_requirements: OK: {len(chosen)} packages resolve for Python {header['python_version']} "
        f"on manylinux x86_64 (torch {chosen.get('torch')}, gradio {chosen.get('gradio')}, "
        f"bitsandbytes {chosen.get('bitsandbytes')})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
