"""The package: pyproject's dependencies are requirements.txt's pins, a wheel carries the
built-in configs and the serving page, and its `t2i` console script runs from the wheel."""

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def requirement_lines(path: Path) -> list[str]:
    lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("-r")]


def test_pyproject_pins_are_the_requirements_files():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == requirement_lines(REPO / "requirements.txt")
    assert project["optional-dependencies"]["dev"] == requirement_lines(REPO / "requirements-dev.txt")
    # The optional features' extras are pinned as the tests install them.
    for extra in ("mlflow", "search"):
        assert set(project["optional-dependencies"][extra]) <= set(project["optional-dependencies"]["dev"]), extra
    assert project["scripts"]["t2i"] == "t2i.cli:main"


def test_the_wheel_carries_configs_and_page_and_its_t2i_command_runs(tmp_path):
    source = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info beside the sources
    shutil.copytree(REPO / "t2i", source / "t2i", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("t2i-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {p.relative_to(REPO).as_posix() for p in (REPO / "t2i" / "configs").rglob("*.toml")}
    assert configs and configs <= names
    assert "t2i/serving/page.html" in names and not any(n.startswith(("tests/", "data/", "runs/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert re.search(r"^t2i = t2i\.cli:main$", zipfile.ZipFile(wheel).read(entry_points).decode(), re.M)
    # Installed (without dependencies: this venv has them) into a folder far from the checkout,
    # the command finds its built-in configs there: a config error names them, before Ray.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from t2i.cli import main; "
            "import t2i; assert t2i.__file__.startswith(sys.argv[1]), t2i.__file__; "
            "sys.exit(main(['train', '--config', 'gan', '--set', 'model.widht=3']))")
    ran = subprocess.run([sys.executable, "-c", code, str(target)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert ran.returncode == 2 and "model.widht" in ran.stderr, ran.stderr
