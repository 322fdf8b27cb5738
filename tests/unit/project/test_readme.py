"""The README and the docs/ pages as specifications: every ```python block of README.md and of
docs/*.md runs as written (each in a fresh interpreter, from the repository root), and every
relative link of those pages points at a file that exists (and, with a #fragment, at a heading
of that file).

A block may be left out only for a real reason (a test makes the same call and checks more, or it
needs a GPU, a cluster, a network): put the line `<!-- not-run: REASON -->` right above its
```python fence. The reason is required, and the block must still parse.
"""

import os
import re
import subprocess
import sys
import unicodedata

import pytest
from paths import REPO_ROOT

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"(?:^<!-- not-run: (?P<reason>[^>]*?) -->\n)?^```python\n(?P<code>.*?)^```", flags=re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _rel(page):
    return page.relative_to(REPO_ROOT).as_posix()


def _blocks():
    out = []
    for page in PAGES:
        for i, m in enumerate(FENCE.finditer(page.read_text())):
            out.append(pytest.param(page, m["code"], m["reason"], id=f"{_rel(page)}-{i}"))
    return out


BLOCKS = _blocks()


def test_readme_has_python_examples():
    assert len(FENCE.findall(README.read_text())) >= 2


@pytest.mark.parametrize(("page", "code", "reason"), BLOCKS)
def test_python_block_runs(page, code, reason, tmp_path):
    if reason is not None:  # run elsewhere (the reason says where) or not runnable here: it must parse
        assert reason.strip(), f"{_rel(page)}: a not-run block must say why"
        compile(code, f"{_rel(page)} (a not-run block)", "exec")
        return
    script = tmp_path / "block.py"
    script.write_text(code)
    # A block's bare ray.init() starts a Ray of its own even beside a `ray start` cluster of another
    # test (test_two_nodes, under pytest -n 2), which it would otherwise join and fail on num_cpus.
    env = {**os.environ, "RAY_ADDRESS": "local"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
                          env=env)
    assert proc.returncode == 0, f"{_rel(page)} block failed:\n{code}\n{proc.stderr[-3000:]}"


def _outside_code(text):
    """The page without its fenced blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchor(heading):
    """GitHub's anchor of a heading: lower case, punctuation but "_" dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def _anchors(page):
    headings = re.findall(r"^#{1,6} (.+)$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M), flags=re.M)
    return {_anchor(h) for h in headings}


def test_anchor_rule():
    assert _anchor("Streaming (strict on-policy): how it works") == "streaming-strict-on-policy-how-it-works"
    assert _anchor("The study in full: 11 rules × 3 seeds") == "the-study-in-full-11-rules--3-seeds"
    assert _anchor("`opefo config`, and errors") == "opefo-config-and-errors"
    assert _anchor("Held-out against grpo_strict, like for like") == "held-out-against-grpo_strict-like-for-like"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_point_at_files_that_exist(page):
    broken = []
    for target in LINK.findall(_outside_code(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):      # https:, mailto:, ...
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
            broken.append(f"{target}: no heading #{fragment} in {_rel(dest)}")
    assert not broken, f"{_rel(page)}:\n" + "\n".join(broken)
