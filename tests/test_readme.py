"""The README against the code: the options table lists exactly PatchOptions' and Tuning's fields (names,
defaults) and tuning.ENV_VARS' variables; its CPU test command is what CI (.ci/run) runs; every braid-bench
flag it shows exists; it stays short. Text only: no model is built."""
from __future__ import annotations

import ast
import dataclasses
import pathlib
import re
import shlex

from braid_backend.bench.cli import build_parser
from braid_backend.options import PatchOptions
from braid_backend.tuning import ENV_VARS, Tuning

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MAX_LINES = 220


def options_table(text: str = README) -> dict[str, tuple[str | None, object]]:
    """option -> (environment variable or None, default) from the rows between the table's markers."""
    body = text.split("<!-- options-table:begin", 1)[1].split("<!-- options-table:end -->", 1)[0]
    rows = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].startswith("`"):   # the header, its rule, the marker's own line
            continue
        name, env, default = (c.strip("`") for c in cells[:3])
        assert name not in rows, f"option {name} listed twice"
        rows[name] = (None if env == "-" else env, ast.literal_eval(default))
    return rows


def expected_rows() -> dict[str, tuple[str | None, object]]:
    rows = {f.name: (None, f.default) for f in dataclasses.fields(PatchOptions)}
    rows.update({f"tuning.{f.name}": (ENV_VARS.get(f.name), f.default) for f in dataclasses.fields(Tuning)})
    return rows


def test_options_table_is_patch_options_and_tuning():
    table, want = options_table(), expected_rows()
    assert set(table) == set(want), (f"in the README only: {sorted(set(table) - set(want))}; "
                                     f"in the code only: {sorted(set(want) - set(table))}")
    for name, (env, default) in want.items():
        assert table[name][1] == default, f"{name}: README default {table[name][1]!r}, code {default!r}"
        assert table[name][0] == env, f"{name}: README variable {table[name][0]}, code {env}"


def test_options_table_has_every_env_var_once():
    table_vars = [env for env, _ in options_table().values() if env]
    assert sorted(table_vars) == sorted(ENV_VARS.values())
    assert set(ENV_VARS) == {f.name for f in dataclasses.fields(Tuning)}   # every knob has its variable


def test_options_table_check_fails_on_a_one_sided_field():
    """The check above catches a field (or a variable) on one side only."""
    row = "| `tuning.new_knob` | `BRAID_NEW_KNOB` | `1` | a knob the code does not have |\n"
    doctored = README.replace("<!-- options-table:end -->", row + "<!-- options-table:end -->")
    assert set(options_table(doctored)) - set(expected_rows()) == {"tuning.new_knob"}
    dropped = re.sub(r"^\| `verify` .*\n", "", README, flags=re.M)
    assert set(expected_rows()) - set(options_table(dropped)) == {"verify"}


def _commands(text: str = README) -> list[str]:
    """Shell command lines of the bash blocks, comments cut off."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def test_cpu_test_command_is_what_ci_runs():
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.startswith("#") and not ln.startswith(("set ", "cd "))]
    assert len(ci) == 1, ci
    assert ci[0].strip() in _commands(), f"README lacks CI's command: {ci[0]!r}"


def test_every_braid_bench_flag_shown_exists():
    """In the README and in the docs that show braid-bench lines."""
    known = {s for a in build_parser()._actions for s in a.option_strings}
    for path in (ROOT / "README.md", ROOT / "docs" / "bench.md", ROOT / "docs" / "multi-gpu.md"):
        text = path.read_text()
        lines = [c for c in _commands(text) if c.startswith("braid-bench")] + re.findall(r"`(braid-bench [^`]*)`", text)
        shown = [w for c in lines for w in shlex.split(c)[1:] if w.startswith("-")]
        assert shown, f"no braid-bench flags found in {path.name}: the parsing is broken"
        assert set(shown) <= known, f"{path.name}: flags braid-bench does not have: {sorted(set(shown) - known)}"


def test_readme_is_short():
    n = len(README.splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines (at most {MAX_LINES}: details go to docs/)"


def test_readme_links_exist():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to a missing file: {target}"
