"""Linters on the shipped files: yamllint on every YAML file under deploy/, hadolint on the
Dockerfile, shellcheck on every script under deploy/."""

from __future__ import annotations

from tests.deploy.support import DEPLOY, ROOT, run, tool


def test_yaml_files_pass_yamllint() -> None:
    files = sorted(str(p) for p in DEPLOY.rglob("*.yaml"))
    assert len(files) >= 10, files  # compose.yaml, the base's and each overlay's
    result = run(tool("yamllint"), "--strict", "-c", str(ROOT / "tests/deploy/yamllint.yaml"), *files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_passes_hadolint() -> None:
    result = run(tool("hadolint"), "--failure-threshold", "info", str(ROOT / "Dockerfile"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_pass_shellcheck() -> None:
    scripts = sorted(str(p) for p in DEPLOY.rglob("*.sh"))
    assert scripts, "no script under deploy/"
    result = run(tool("shellcheck"), "--severity=style", *scripts)
    assert result.returncode == 0, result.stdout + result.stderr
    for script in scripts:
        syntax = run("bash", "-n", script)
        assert syntax.returncode == 0, syntax.stderr


def test_dockerfile_shape() -> None:
    """What the issue asks of the image that hadolint does not check."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines()]
    base = next(line for line in lines if line.startswith("ARG PYTHON_IMAGE="))
    image = base.split("=", 1)[1]
    assert "slim" in image and ":" in image and not image.endswith(":latest"), image
    froms = [line for line in lines if line.startswith("FROM ")]
    assert len(froms) == 2 and froms[0].endswith(" AS build"), froms  # wheels built apart
    final = lines[lines.index(froms[1]) :]
    users = [line for line in final if line.startswith("USER ")]
    assert users and users[-1].split()[1].split(":")[0] not in ("0", "root"), users
    assert 'ENTRYPOINT ["discovery"]' in final
    assert "pip wheel" in text and "--force-reinstall --no-deps" in text and "opentelemetry-proto==" in text
    assert "ARG PIP_NO_INDEX" in text and "COPY deploy/wheelhouse/" in text
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore, "the build context starts from nothing and lists what it needs"
