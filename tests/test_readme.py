"""The README opens with exactly two commands, and .ci/run runs the second one."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    text = open(os.path.join(ROOT, "README.md")).read()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert first_block and text.index(first_block.group(0)) < text.index("\n\n", text.index("# shortcut_ext") + 1) + 2
    lines = [ln for ln in first_block.group(1).splitlines() if ln.strip()]
    assert len(lines) == 2, lines
    assert "shortcut-ext reproduce" in lines[0] and "pytest tests" in lines[1]
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "sed -n '3p'" in ci and 'bash -c "$test_cmd"' in ci
