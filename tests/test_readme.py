"""The README opens with exactly two commands, and .ci/run runs the second one."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    text = open(os.path.join(ROOT, "README.md")).read()
    assert text.startswith("# shortcut_ext\n\n```bash\n"), "the README must open with the command block"
    first_block = re.search(r"```bash\n(.*?)```", text, re.S)
    lines = [ln for ln in first_block.group(1).splitlines() if ln.strip()]
    assert len(lines) == 2, lines
    assert "shortcut-ext reproduce" in lines[0] and "pytest tests" in lines[1]
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "sed -n '3p'" in ci and 'bash -c "$test_cmd"' in ci
