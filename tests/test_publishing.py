"""Publishing works as written (docs/publishing.md, "Publishing").

Every `datasette publish` / `datasette package` command in that section runs through Datasette's
own command-line code (gcloud and docker replaced by stand-ins that keep the build context), in a
directory holding what the section says to prepare (`make dist`, the weights, metadata.yml with
the section's `checkpoints:`).  Each build context's Dockerfile must then:

- name the plugin in its `pip install` line: a wheel that exists *inside the build context*
  (a path outside it is not in the image), or the distribution name the wheel carries;
- install it: the wheel is installed exactly as named, from the build context, into a throwaway
  venv (`--no-deps --no-index`: no network, no torch download), with its package data;
- pin what it pins consistently: every requirement the installed wheel declares for the image's
  platform (Linux x86_64, the Dockerfile's Python) must accept the pins on the same line and the
  versions this test suite runs with; the pins must be those versions (the Makefile's tested
  torch / torchvision pair) and agree with each other's requirements;
- run: its `datasette inspect` step and its server command (with `--get`) run here in a copy of the
  context, and a text search finds the fine-tuned weights the way the image would (the
  `checkpoints:` path, relative to /app; this machine's checkpoint registry turned off).

MAPCLIP_PUBLISH_CHECK_PYPI=1 also resolves each whole install line against the package index
(`pip install --dry-run` for the image's platform: metadata only, nothing installed).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import load_collection

ROOT = Path(__file__).resolve().parent.parent
PUBLISHING_DOC = ROOT / "docs" / "publishing.md"
VENV = Path(sys.executable).parent.parent
PLUGIN = "datasette-mapclip"
TORCH_STACK = {"torch", "torchvision", "open-clip-torch", "timm"}
# The image's server, with torch impossible to import and no network: the file's own encoders answer.
GUARDED_DATASETTE = """
import importlib.abc, socket, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "open_clip", "timm"):
            raise ImportError("blocked by the test: " + name)

sys.meta_path.insert(0, NoTorch())
real_connect = socket.socket.connect

def no_network(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        raise OSError("network blocked by the test")
    return real_connect(self, address)

socket.socket.connect = no_network
from datasette.cli import cli
sys.argv[0] = "datasette"
cli()
"""


# -- what the publishing docs say -------------------------------------------------------------
def publishing_section() -> str:
    text = PUBLISHING_DOC.read_text(encoding="utf-8")
    found = re.search(r"^## Publishing\n(.*?)(?=^## )", text, re.S | re.M)
    assert found, "docs/publishing.md has no '## Publishing' section"
    return found.group(1)


def shell_lines(section: str) -> list[list[str]]:
    """Every command of the section's ```bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if words := shlex.split(line, comments=True):
                lines.append(words)
    return lines


def datasette_commands(lines) -> list[list[str]]:
    return [words for words in lines if words[0] == "datasette" and words[1] in ("publish", "package")]


def option_values(words: list[str], option: str) -> list[str]:
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word == option]


# -- Datasette's own publishing code, gcloud and docker stood in for ----------------------------
def build_context(words: list[str], workdir: Path, keep: Path, monkeypatch) -> Path:
    """Run one documented command through Datasette's CLI in ``workdir``; the build context it made, kept."""
    import datasette.cli
    import datasette.publish.cloudrun as cloudrun

    def keep_context():
        assert not keep.exists()
        shutil.copytree(os.getcwd(), keep)

    def check_call(command, **kwargs):
        if str(command).startswith("gcloud builds submit"):
            keep_context()
        return 0

    def call(args, **kwargs):
        assert args[:2] == ["docker", "build"]
        keep_context()
        return 0

    monkeypatch.setattr(cloudrun, "fail_if_publish_binary_not_installed", lambda *args: None)
    monkeypatch.setattr(cloudrun, "check_output", lambda *args, **kwargs: "a-project\n")
    monkeypatch.setattr(cloudrun, "check_call", check_call)
    monkeypatch.setattr(datasette.cli, "call", call)
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: "/usr/bin/docker" if name == "docker" else which(name, *a, **k))
    monkeypatch.chdir(workdir)
    result = CliRunner().invoke(datasette.cli.cli, words[1:], catch_exceptions=False)
    assert result.exit_code == 0, f"{shlex.join(words)}\n{result.output}"
    assert (keep / "Dockerfile").exists(), f"{shlex.join(words)} built no image"
    return keep


def dockerfile_parts(context: Path) -> dict:
    text = (context / "Dockerfile").read_text()
    install = [shlex.split(line[len("RUN "):]) for line in text.splitlines() if line.startswith("RUN pip install")]
    assert len(install) == 1, text
    python = re.search(r"^FROM python:(\d+\.\d+)(\.\d+)?", text, re.M)
    assert python, text
    inspect = [shlex.split(line[len("RUN "):]) for line in text.splitlines() if line.startswith("RUN datasette inspect")]
    cmd = re.search(r"^CMD (.*)$", text, re.M).group(1)
    args = [a for a in install[0][2:] if a not in ("-U", "--upgrade")]
    return {"text": text, "install": install[0], "args": args, "python": python.group(1),
            "inspect": inspect[0] if inspect else None, "cmd": cmd}


def bare_environment() -> dict:
    """This process's environment without what would show pip another Python's packages or this
    machine's pip configuration (the image has neither)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
    return {**env, "PIP_CONFIG_FILE": os.devnull}


def is_path(argument: str) -> bool:
    return "/" in argument or argument.endswith((".whl", ".tar.gz", ".zip"))


def image_environment(python: str) -> dict:
    """Marker values of the image: the Dockerfile's CPython on Linux x86_64."""
    environment = default_environment()
    environment.update(python_version=python, python_full_version=f"{python}.0", platform_system="Linux",
                       platform_machine="x86_64", sys_platform="linux", os_name="posix",
                       implementation_name="cpython", platform_python_implementation="CPython")
    return environment


def declared_requirements(requires: list[str], environment: dict) -> list[Requirement]:
    wanted = []
    for line in requires or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({**environment, "extra": ""}):
            wanted.append(requirement)
    return wanted


# -- the prepared directory: what the section says to have before publishing -------------------
@pytest.fixture(scope="module")
def publishing(tmp_path_factory, model_args, tiny_checkpoint):
    section = publishing_section()
    lines = shell_lines(section)
    commands = datasette_commands(lines)
    assert commands, "the Publishing section gives no datasette publish / package command"
    workdir = tmp_path_factory.mktemp("publish")
    db_path, _ = load_collection(tmp_path_factory, model_args, 4)
    databases = {word for words in commands for word in words if word.endswith(".db")}
    for name in databases:
        shutil.copy(db_path, workdir / name)
    (workdir / "run").mkdir()
    shutil.copy(tiny_checkpoint, workdir / "run" / "best.pt")  # what `mapclip fine-tune train ... run/` wrote
    from datasette_mapclip.store import MapStore

    store = MapStore(db_path)
    model_name = store.model()["name"]
    store.close()
    # metadata.yml: the repository's, with no checkpoints: entry (the file carries its query encoders)
    shutil.copy(ROOT / "metadata.yml", workdir / "metadata.yml")
    # a copy of what a build reads, so that builds of concurrent test runs never share build/
    source = tmp_path_factory.mktemp("source")
    for name in ("Makefile", "setup.py", "README.md", "ruff.toml"):
        shutil.copy(ROOT / name, source / name)
    for package in ("datasette_mapclip", "loaders", "fine_tune"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    for words in lines:
        if words[:2] == ["make", "dist"]:  # the Makefile target itself, its output where the section expects it
            dist = subprocess.run(["make", "-s", "-o", f"{VENV}/.installed", "dist", f"VENV={VENV}",
                                   f"DIST={workdir / 'dist'}", *words[2:]],
                                  cwd=source, capture_output=True, text=True, timeout=120)
            assert dist.returncode == 0, dist.stdout + dist.stderr
        elif words[0] not in ("datasette", "docker", "make"):  # mkdir, cp: run as written
            ran = subprocess.run(shlex.join(words) if "&&" not in words else " ".join(words), shell=True,
                                 cwd=workdir, capture_output=True, text=True, timeout=60)
            assert ran.returncode == 0, f"{shlex.join(words)}: {ran.stderr}"
    wheels = sorted((workdir / "dist").glob("datasette_mapclip-*.whl"))
    assert len(wheels) == 1, f"make dist built {wheels}"
    return {"section": section, "lines": lines, "commands": commands, "workdir": workdir, "wheel": wheels[0],
            "model_name": model_name}


@pytest.fixture(scope="module")
def contexts(publishing, tmp_path_factory):
    kept = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        for i, words in enumerate(publishing["commands"]):
            keep = tmp_path_factory.mktemp("context") / f"command-{i}"
            kept.append((words, build_context(words, publishing["workdir"], keep, monkeypatch)))
    return kept


def wheel_metadata(wheel: Path) -> dict:
    import email.parser
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        message = email.parser.Parser().parsestr(archive.read(name).decode())
    return {"name": message["Name"], "version": message["Version"], "requires": message.get_all("Requires-Dist")}


# -- the tests ------------------------------------------------------------------------------------
def test_the_section_covers_a_release_and_a_checkout(publishing):
    commands = publishing["commands"]
    released = [w for w in commands if PLUGIN in option_values(w, "--install")]
    checkout = [w for w in commands if any(v.endswith(".whl") for v in option_values(w, "--install"))]
    assert released, "no command for a released package (--install datasette-mapclip)"
    assert checkout, "no command for an unreleased checkout (--install <the wheel make dist builds>)"
    assert ["make", "dist"] in publishing["lines"], "the checkout commands need `make dist` first"
    for words in commands:
        if words[1] == "publish" and words[2] == "cloudrun":
            assert "--service" in words, f"{shlex.join(words)} stops to ask for a service name"
    meta = wheel_metadata(publishing["wheel"])
    assert canonicalize_name(meta["name"]) == canonicalize_name(PLUGIN)
    for words in checkout:  # the wheel's name as `make dist` spells it (version included)
        names = {Path(v).name for v in option_values(words, "--install") if v.endswith(".whl")}
        assert names == {publishing["wheel"].name}, f"{shlex.join(words)} installs {names}, make dist builds " \
                                                    f"{publishing['wheel'].name}"
    for words in (w for w in publishing["lines"] if w[:2] == ["docker", "run"]):
        tags = {t for c in commands for t in option_values(c, "--tag") + option_values(c, "-t")}
        assert words[-1] in tags and "8001:8001" in words, f"{shlex.join(words)} runs no image the section built"


def test_each_image_installs_the_plugin_from_its_build_context(publishing, contexts, tmp_path):
    meta = wheel_metadata(publishing["wheel"])
    for words, context in contexts:
        parts = dockerfile_parts(context)
        named = [a for a in parts["args"] if not a.startswith("-") and not is_path(a)
                 and canonicalize_name(Requirement(a).name) == canonicalize_name(meta["name"])]
        paths = [a for a in parts["args"] if not a.startswith("-") and is_path(a)]
        for path in paths:  # pip runs in /app: the build context
            assert (context / path).is_file(), (
                f"{shlex.join(words)}: the Dockerfile installs {path}, which is not in the image's build context "
                f"({sorted(p.name for p in context.iterdir())}); only databases, metadata and --static / "
                f"--template-dir / --plugins-dir directories are copied")
        plugin_wheels = [p for p in paths if p.endswith(".whl")
                         and canonicalize_name(Path(p).name.split("-")[0]) == canonicalize_name(meta["name"])]
        assert named or plugin_wheels, f"{shlex.join(words)}: the image does not install {PLUGIN}:\n{parts['text']}"
        if not plugin_wheels:
            continue
        # install it exactly as named, from the build context, into a throwaway venv
        venv = tmp_path / f"venv-{context.name}"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
        python = venv / "bin" / "python"
        installed = subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
             "--disable-pip-version-check", "-q", *[a for a in parts["install"][2:] if a == "-U" or a in paths]],
            cwd=context, capture_output=True, text=True, timeout=120, env=bare_environment())
        assert installed.returncode == 0, installed.stdout + installed.stderr
        report = subprocess.run([str(python), "-I", "-c", (  # -I: this venv only, whatever PYTHONPATH says
            "import importlib.metadata as m, json; d = m.distribution('datasette-mapclip'); print(json.dumps("
            "{'version': d.version, 'requires': d.requires, 'files': [str(f) for f in d.files], "
            "'at': str(d.locate_file('')), 'plugins': [(e.group, e.name, e.value) for e in d.entry_points]}))")],
            capture_output=True, text=True, timeout=60, cwd=tmp_path, env=bare_environment())
        assert report.returncode == 0, report.stderr
        dist = json.loads(report.stdout)
        assert Path(dist["at"]).resolve().is_relative_to(venv.resolve()), dist["at"]
        assert ["datasette", "mapclip", "datasette_mapclip"] in dist["plugins"]
        assert dist["version"] == meta["version"]
        package_data = [str(p.relative_to(ROOT)) for folder in ("templates", "static", "model/model_configs")
                        for p in (ROOT / "datasette_mapclip" / folder).iterdir() if p.is_file()]
        missing = sorted(set(package_data) - set(dist["files"]))
        assert not missing, f"the wheel lacks package data the plugin serves: {missing}"
        modules = {str(p.relative_to(ROOT)) for p in (ROOT / "datasette_mapclip").rglob("*.py")}
        assert not modules - set(dist["files"]), sorted(modules - set(dist["files"]))


def test_pins_on_the_install_line_agree_with_the_declared_requirements(publishing, contexts):
    from importlib.metadata import PackageNotFoundError, requires, version

    meta = wheel_metadata(publishing["wheel"])
    without_extras = {canonicalize_name(r.name) for r in declared_requirements(meta["requires"], image_environment(
        f"{sys.version_info.major}.{sys.version_info.minor}"))}
    assert not without_extras & TORCH_STACK, f"the serving install must not need {without_extras & TORCH_STACK}"
    for words, context in contexts:
        parts = dockerfile_parts(context)
        environment = image_environment(parts["python"])
        pins = {}
        for argument in parts["args"]:
            if argument.startswith("-") or is_path(argument):
                continue
            requirement = Requirement(argument)
            if requirement.specifier:
                pins[canonicalize_name(requirement.name)] = requirement
        installed = {canonicalize_name(Requirement(a).name) for a in parts["args"]
                     if not a.startswith("-") and not is_path(a)}
        assert not installed & TORCH_STACK, f"{shlex.join(words)} installs {installed & TORCH_STACK}: not needed to serve"
        for requirement in declared_requirements(meta["requires"], environment):
            name = canonicalize_name(requirement.name)
            try:
                here = version(requirement.name)
            except PackageNotFoundError:
                raise AssertionError(f"{requirement} is not installed where the tests run: untested in the image")
            assert requirement.specifier.contains(Version(here), prereleases=True), (
                f"{PLUGIN} requires {requirement}; the tests run with {here}")
            if name in pins:
                pinned = [s.version for s in pins[name].specifier if s.operator == "=="]
                assert pinned and all(requirement.specifier.contains(Version(v), prereleases=True) for v in pinned), (
                    f"{shlex.join(words)} pins {pins[name]}, but {PLUGIN} requires {requirement}")
                assert pins[name].specifier.contains(Version(here), prereleases=True), (
                    f"{shlex.join(words)} pins {pins[name]}; the tests run with {here}")
        for name, pin in pins.items():  # the pins agree with each other (torchvision wants its own torch)
            for requirement in declared_requirements(requires(pin.name), environment):
                other = canonicalize_name(requirement.name)
                for spec in (s for s in pins.get(other, Requirement("x")).specifier if s.operator == "=="):
                    assert requirement.specifier.contains(Version(spec.version), prereleases=True), (
                        f"{pin} requires {requirement}, the line pins {pins[other]}")


def test_the_image_inspects_and_serves_without_torch_or_weights(publishing, contexts, tmp_path):
    """A model made from a checkpoint, no checkpoints: entry, no checkpoint registry, no network, torch
    impossible to import: the image's start command serves a text search from the file alone."""
    with_weights = [(w, c) for w, c in contexts if any(v.endswith(".whl") for v in option_values(w, "--install"))]
    assert with_weights, "no checkout command installs the wheel"
    words, context = with_weights[-1]
    app = tmp_path / "app"
    shutil.copytree(context, app)
    parts = dockerfile_parts(app)
    env = {**os.environ, "MAPCLIP_CHECKPOINT_REGISTRY": "off", "PORT": "8001"}  # a machine that never loaded it
    datasette = [sys.executable, "-m", "datasette"]
    inspect = subprocess.run(datasette + parts["inspect"][1:], cwd=app, env=env, capture_output=True, text=True,
                             timeout=120)
    assert inspect.returncode == 0, inspect.stderr
    cmd = [word for word in shlex.split(parts["cmd"].replace("$PORT", "8001"))]
    assert cmd[:2] == ["datasette", "serve"], parts["cmd"]
    served = subprocess.run([sys.executable, "-c", GUARDED_DATASETTE] + cmd[1:]
                            + ["--get", "/-/mapclip/search.json?q=relief+map&k=3"],
                            cwd=app, env=env, capture_output=True, text=True, timeout=180)
    assert served.returncode == 0, f"{shlex.join(cmd)}:\n{served.stdout[-2000:]}\n{served.stderr[-2000:]}"
    answer = json.loads(served.stdout)
    assert answer["model"] == publishing["model_name"] and len(answer["results"]) == 3
