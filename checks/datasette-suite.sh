#!/usr/bin/env bash
# Run Datasette's own test suite twice, without and with datasette-mapclip registered, and report
# the tests that fail only with the plugin (apart from the ones that list installed plugins).
#
# Runs outside the repository: Datasette's tests are Datasette's.  The release sdist carries the
# test_*.py files but not their support files (conftest.py, fixtures.py, utils.py, plugins/,
# test_templates/, docs/ for test_docs.py, pytest.ini); those come from Datasette's git history
# (the release tag when the git copy has it, else the release branch), never overwriting an sdist file.
# Datasette's conftest sets sys._called_from_test, which stops entry-point plugins from loading, so
# a small pytest plugin (register_mapclip.py, written below) registers datasette_mapclip itself.
#
# Nothing is installed into the project's venv: a separate venv sees the project venv's packages
# through a .pth file (same datasette, torch, pytest, editable datasette_mapclip) and gets only
# Datasette's "test" extras.
#
# Environment:
#   REPO             the datasette-mapclip checkout (default: the git repo holding this script, else /work/main)
#   MAIN_VENV        the project's venv (default: <repo>/.venv)
#   WORK             work folder outside the repository (default: $TMPDIR/mapclip-datasette-suite)
#   DATASETTE_VERSION  (default: the version installed in MAIN_VENV)
#                    (1.0a41: MAIN_VENV=.venv-datasette-1.0, the overlay venv `make install-datasette-1.0` builds)
#   DATASETTE_GIT    a git dir or URL of simonw/datasette (default: /work/.mirror/simonw+datasette/repo
#                    if present, else https://github.com/simonw/datasette.git)
#   MAPCLIP_REF      a git ref of this repository to test instead of the working tree (e.g. HEAD)
#   SUITE_TIMEOUT    seconds per run (default 1800)
#   TESTS            what pytest runs, relative to the unpacked release (default: tests)
# Exit status: 0 when no test fails only with the plugin (excluded tests aside), 1 otherwise.
set -euo pipefail

REPO=${REPO:-$(git -C "$(dirname "$0")" rev-parse --show-toplevel 2>/dev/null || echo /work/main)}
MAIN_VENV=${MAIN_VENV:-$REPO/.venv}
WORK=${WORK:-${TMPDIR:-/tmp}/mapclip-datasette-suite}
SUITE_TIMEOUT=${SUITE_TIMEOUT:-1800}
TESTS=${TESTS:-tests}
PY=$MAIN_VENV/bin/python
VERSION=${DATASETTE_VERSION:-$("$PY" -c 'import datasette.version as v; print(v.__version__)')}
if [ -z "${DATASETTE_GIT:-}" ]; then
  if [ -d /work/.mirror/simonw+datasette/repo ]; then DATASETTE_GIT=/work/.mirror/simonw+datasette/repo
  else DATASETTE_GIT=https://github.com/simonw/datasette.git; fi
fi
# Tests that list the installed plugins (/-/plugins.json, `datasette plugins`): they compare against
# an exact list, which now holds one more plugin, so they are not counted.
EXCLUDED="tests/test_api.py::test_plugins_json tests/test_cli.py::test_plugins_cli"

case "$WORK" in "$REPO"|"$REPO"/*) echo "WORK must be outside the repository" >&2; exit 2;; esac
mkdir -p "$WORK"
cd "$WORK"
SUITE=$WORK/datasette-$VERSION

# 1. The release sdist (Datasette's own test_*.py files).
if [ ! -d "$SUITE" ]; then
  "$PY" -m pip download -q --no-deps --no-binary :all: "datasette==$VERSION" -d "$WORK/sdist"
  tar xzf "$WORK/sdist/datasette-$VERSION.tar.gz" -C "$WORK"
fi

# 2. Support files the sdist leaves out, from the tag if the git copy has it, else the branch.
if [ ! -f "$SUITE/tests/conftest.py" ]; then
  if [ -d "$DATASETTE_GIT" ]; then GITDIR=$DATASETTE_GIT
  else
    GITDIR=$WORK/datasette.git
    [ -d "$GITDIR" ] || git clone -q --bare "$DATASETTE_GIT" "$GITDIR"
  fi
  BRANCH=$(echo "$VERSION" | cut -d. -f1,2).x
  if git -C "$GITDIR" rev-parse -q --verify "refs/tags/$VERSION" >/dev/null; then REF=$VERSION
  elif git -C "$GITDIR" rev-parse -q --verify "$BRANCH" >/dev/null; then REF=$BRANCH
  else  # the nearest earlier tag (an alpha newer than the git copy: 1.0a41 -> 1.0a37)
    REF=$( (git -C "$GITDIR" tag; echo "$VERSION") | sort -V | grep -B1 -x -F "$VERSION" | head -n 1)
  fi
  echo "support files from $GITDIR at $REF ($(git -C "$GITDIR" rev-parse --short "$REF"))"
  rm -rf "$WORK/git-$REF" && mkdir -p "$WORK/git-$REF"
  git -C "$GITDIR" archive "$REF" tests docs pytest.ini | tar x -C "$WORK/git-$REF"
  cp -rn "$WORK/git-$REF/." "$SUITE/"   # -n: the sdist's own test files win
fi
# tests/test_load_extensions.py skips without a compiled tests/ext.c (prepare_connection toggles
# enable_load_extension, so those tests matter); SpatiaLite tests need libsqlite3-mod-spatialite.
if [ ! -f "$SUITE/tests/ext.so" ] && command -v cc >/dev/null; then
  cc -fPIC -shared "$SUITE/tests/ext.c" -o "$SUITE/tests/ext.so" || echo "could not compile tests/ext.c"
fi

# 3. A venv with Datasette's test extras that sees the project venv's packages.
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
BASE_PY=$("$PY" -c 'import sys, os; print(os.path.join(sys.base_prefix, "bin", "python{}.{}".format(*sys.version_info)))')
if [ ! -x "$WORK/.venv/bin/python" ]; then
  "$BASE_PY" -m venv "$WORK/.venv"
  OWN_SITE=$("$WORK/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "import site; site.addsitedir('$SITE')" > "$OWN_SITE/zz_project_venv.pth"
  # Datasette's test requirements: setup.py's "test" extra (0.65), or pyproject.toml's "dev"
  # dependency group (1.0 alphas) less its documentation and formatting tools.
  EXTRAS=$("$PY" - "$SUITE" <<'EOF'
import ast, os, re, sys
suite = sys.argv[1]
if os.path.exists(os.path.join(suite, "setup.py")):
    tree = ast.parse(open(os.path.join(suite, "setup.py")).read())
    requirements = next(ast.literal_eval(node.value)["test"] for node in ast.walk(tree)
                        if isinstance(node, ast.keyword) and node.arg == "extras_require")
else:
    import tomllib
    requirements = tomllib.load(open(os.path.join(suite, "pyproject.toml"), "rb"))["dependency-groups"]["dev"]
    docs = re.compile(r"(sphinx|furo|myst-parser|codespell|black|blacken-docs|ruff|cogapp)\b", re.I)
    requirements = [r for r in requirements if isinstance(r, str) and not docs.match(r)]
print(" ".join(repr(r) for r in requirements if not re.match(r"pytest\s*[<>=]", r)))
EOF
)
  eval "\"$WORK/.venv/bin/pip\" install -q $EXTRAS"
fi

# 4. The pytest plugin that registers datasette_mapclip (MAPCLIP_REGISTER=0: baseline).
cat > "$WORK/register_mapclip.py" <<'EOF'
"""pytest plugin: register datasette-mapclip's hooks in Datasette's own test suite."""
import os

import pytest


@pytest.hookimpl(trylast=True)  # after Datasette's conftest has set sys._called_from_test
def pytest_configure(config):
    if os.environ.get("MAPCLIP_REGISTER", "1") == "0":
        return
    from datasette.plugins import pm
    import datasette_mapclip

    if not pm.is_registered(datasette_mapclip):
        pm.register(datasette_mapclip, name="datasette_mapclip")


def pytest_report_header(config):
    import datasette
    from datasette.plugins import pm

    names = sorted(pm.get_name(p) or repr(p) for p in pm.get_plugins())
    registered = "datasette_mapclip" in names
    return [
        "datasette {} from {}".format(datasette.__version__, datasette.__file__),
        "mapclip registered: {}{}".format(
            registered,
            " (from {})".format(__import__("datasette_mapclip").__file__) if registered else "",
        ),
    ]
EOF

# 5. The plugin under test: the working tree (editable install), or a snapshot of MAPCLIP_REF.
PLUGIN_PATH=
if [ -n "${MAPCLIP_REF:-}" ]; then
  rm -rf "$WORK/mapclip-src" && mkdir -p "$WORK/mapclip-src"
  git -C "$REPO" archive "$MAPCLIP_REF" datasette_mapclip | tar x -C "$WORK/mapclip-src"
  echo "testing datasette_mapclip at $MAPCLIP_REF ($(git -C "$REPO" rev-parse --short "$MAPCLIP_REF"))"
  PLUGIN_PATH=$WORK/mapclip-src:
fi

run() {  # run NAME REGISTER
  echo "== $1 run (MAPCLIP_REGISTER=$2) =="
  (cd "$SUITE" && MAPCLIP_REGISTER=$2 PYTHONPATH="$PLUGIN_PATH$WORK" \
     PATH="$WORK/.venv/bin:$MAIN_VENV/bin:$PATH" \
     timeout "$SUITE_TIMEOUT" python -m pytest -p register_mapclip -p no:cacheprovider -q -rfE \
       --timeout=300 --junitxml="$WORK/$1.xml" $TESTS > "$WORK/$1.log" 2>&1) || true
  tail -n 1 "$WORK/$1.log"
}
run baseline 0
run plugin 1

# 6. Summary: counts, and what fails only with the plugin.
"$WORK/.venv/bin/python" - "$WORK/baseline.xml" "$WORK/plugin.xml" "$EXCLUDED" <<'EOF'
import sys
import xml.etree.ElementTree as ET

def results(path):
    out = {}
    for case in ET.parse(path).iter("testcase"):
        file = case.get("classname").replace(".", "/") + ".py"
        name = "{}::{}".format(file, case.get("name"))
        tags = {child.tag for child in case}
        out[name] = ("error" if "error" in tags else "failed" if "failure" in tags
                     else "skipped" if "skipped" in tags else "passed")
    return out

base, plug = results(sys.argv[1]), results(sys.argv[2])
excluded = set(sys.argv[3].split())
for label, res in (("without plugin", base), ("with plugin", plug)):
    counts = {k: sum(1 for v in res.values() if v == k) for k in ("passed", "failed", "error", "skipped")}
    print("{:15} {}".format(label, "  ".join("{} {}".format(v, k) for k, v in counts.items())))
bad = lambda v: v in ("failed", "error")
only = sorted(n for n, v in plug.items() if bad(v) and not bad(base.get(n, "passed")))
ignored = [n for n in only if n.split("[")[0] in excluded]
regressions = [n for n in only if n not in ignored]
fixed = sorted(n for n, v in base.items() if bad(v) and not bad(plug.get(n, "failed")))
print("fail without the plugin too (environment):", ", ".join(n for n, v in base.items() if bad(v)) or "none")
print("excluded (list installed plugins):", ", ".join(ignored) or "none")
print("fail only with the plugin: {}".format(len(regressions)))
for name in regressions:
    print("  " + name)
if fixed:
    print("pass only with the plugin:", ", ".join(fixed))
sys.exit(1 if regressions else 0)
EOF
