"""The documentation holds together: README.md stays a short router, every relative link and every path it
names exists (heading anchors included), every script a command runs exists, every ``-c`` config exists and
every option of a documented ``recipes/`` or ``hub/`` command is known to its parser. Fast: nothing trains."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted(
    [REPO / "README.md", REPO / "recipes" / "README.md", REPO / "hub" / "README.md"]
    + list((REPO / "docs").glob("*.md"))
    + [REPO / "benchmarks" / "README.md"]
)
README_MAX_LINES = 300

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.DOTALL | re.MULTILINE)
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# a path inside the repository, as the docs write them (`recipes/train.py`, `results/x/curves.png`)
PATH = re.compile(
    r"(?<![\w./-])((?:recipes|hub|benchmarks|tests|timm_svb|docs|results)/[\w./-]*\.(?:py|sh|md|yaml|json|png))"
)
PLACEHOLDER = re.compile(r"\b(?!README\b)[A-Z][A-Z_]{2,}\b")  # NAME, MODEL.TAG, CONFIG, ...
SCRIPT = re.compile(r"(?:\bpython3?|\bbash)\s+((?:recipes|hub|benchmarks|tests)/[\w./-]+)")
COMMANDS = ("recipes/train.py", "recipes/validate.py", "recipes/study.py", "hub/publish.py")


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans: what a renderer makes links of."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation (but ``-``, ``_``) dropped, spaces -> ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a file's headings (a repeated heading gets ``-1``, ``-2``, ... as on GitHub)."""
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            found.add(f"{base}-{seen[base]}" if base in seen else base)
            seen[base] = seen.get(base, 0) + 1
    return found


def bash_commands(text: str) -> Iterator[str]:
    """Every command line of the ``bash`` blocks: continuation lines joined, comments dropped."""
    for lang, body in BLOCK.findall(text):
        if lang != "bash":
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                yield line


def test_readme_is_a_router() -> None:
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into a topic file"


def test_every_topic_file_is_linked_from_the_readme() -> None:
    readme = REPO / "README.md"
    linked = {
        (REPO / t.split("#")[0]).resolve() for t in LINK.findall(prose(readme.read_text(encoding="utf-8")))
    }
    assert [rel(doc) for doc in DOCS if doc != readme and doc.resolve() not in linked] == []


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target in LINK.findall(prose(doc.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif not path.is_relative_to(REPO):
            broken.append(f"{target}: outside the repository")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading with that anchor in {rel(path)}")
    assert broken == [], f"{rel(doc)}: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_named_paths_and_scripts_exist(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    scripts = set(SCRIPT.findall(text))
    paths = {p for p in PATH.findall(text) if not PLACEHOLDER.search(p)}
    missing = sorted(p.rstrip(".") for p in scripts | paths if not (REPO / p.rstrip(".")).exists())
    assert missing == [], f"{rel(doc)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_configs_exist(doc: Path) -> None:
    configs = REPO / "timm_svb" / "recipe" / "configs"
    text = doc.read_text(encoding="utf-8")
    named = set(re.findall(r"(?:^|\s)-c\s+([a-z]\w*)", text, re.MULTILINE))
    studies = set(re.findall(r"recipes/study\.py\s+([a-z]\w*)", text))
    missing = sorted(c for c in named if not (configs / f"{c}.yaml").is_file())
    missing += sorted(s for s in studies if not list(configs.glob(f"{s}_*.yaml")))
    assert missing == [], f"{rel(doc)} names configs or studies that do not exist: {missing}"


@pytest.fixture(scope="module")
def known_options() -> dict[str, set[str]]:
    """The option strings of each documented command's parser (built, nothing run)."""
    from timm_svb.hub import publish
    from timm_svb.recipe import options, study, validate

    def strings(parser) -> set[str]:  # noqa: ANN001
        return set(parser._option_string_actions)

    train = strings(options.build_parser())
    return {
        "recipes/train.py": train,
        "recipes/validate.py": strings(validate.build_parser()),
        "recipes/study.py": strings(study.build_parser()) | train,  # other options go on to train.py
        "hub/publish.py": strings(publish.build_parser()),
    }


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_documented_options_exist(doc: Path, known_options: dict[str, set[str]]) -> None:
    unknown = []
    for line in bash_commands(doc.read_text(encoding="utf-8")):
        for script in COMMANDS:
            match = re.search(rf"(?:^|\s){re.escape(script)}(\s.*)?$", line)
            if match:
                args = re.split(r";|&&|\|", match.group(1) or "")[0]
                unknown += [
                    f"{script} {o}"
                    for o in re.findall(r"(?<!\S)(--?[a-z][\w-]*)", args)
                    if o not in known_options[script]
                ]
    assert unknown == [], f"{rel(doc)} documents options its commands do not have: {unknown}"
