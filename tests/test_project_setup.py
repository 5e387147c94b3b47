"""The README's two commands are CI's: a newcomer who follows the README installs what CI installs and runs what CI
runs, so that their first test run is CI's (green), not one that lacks an extra (bitsandbytes, DeepSpeed) some tests
need."""

import re
import shlex
import tomllib
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent


def code_lines(path: Path) -> list[str]:
    """The lines of a file's shell code: a README's fenced `bash` blocks, or a script (comments dropped)."""
    text = path.read_text()
    if path.suffix == ".md":
        text = "\n".join(re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL))
    return [line.split(" #")[0].strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def installed_extras(lines: list[str]) -> list[set[str]]:
    """The extras of every `pip install ... -e ".[a,b]"` in `lines`."""
    return [set(match.split(",")) for line in lines for match in re.findall(r'-e "\.\[([^\]]*)\]"', line)]


def pytest_commands(lines: list[str]) -> list[list[str]]:
    return [shlex.split(line) for line in lines if " -m pytest" in line]


def test_readme_installs_and_tests_what_ci_does():
    readme, ci = code_lines(REPO_ROOT / "README.md"), code_lines(REPO_ROOT / ".ci" / "run")
    ci_extras, readme_extras = installed_extras(ci), installed_extras(readme)
    assert len(ci_extras) == 1, ci_extras
    assert readme_extras and all(extras == ci_extras[0] for extras in readme_extras), (readme_extras, ci_extras)
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert ci_extras[0] <= set(pyproject["project"]["optional-dependencies"])

    (ci_pytest,) = pytest_commands(ci)
    readme_pytest = pytest_commands(readme)
    assert readme_pytest == [ci_pytest], (readme_pytest, ci_pytest)
    # CI runs every tier: its marker expression lifts the default deselection of pyproject.toml
    assert ci_pytest[ci_pytest.index("-m", ci_pytest.index("pytest")) + 1] == ""
    assert "not deepspeed" in pyproject["tool"]["pytest"]["ini_options"]["addopts"]
