"""The documentation holds together: README.md is a short quickstart that links to every page of docs/, every
relative link and #anchor in README.md and docs/ resolves, and every `classifier <command>` they name is a command
of the CLI's one table of commands. Plain text checks: nothing here imports torch."""

from __future__ import annotations

import re
import unicodedata
from functools import cache
from pathlib import Path

import pytest

from classifier.cli.commands import COMMANDS

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
README_MAX_BYTES = 12_000
COMMAND_NAMES = frozenset(command.name for command in COMMANDS)


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def label(path: Path) -> str:
    return str(path.relative_to(REPO))


FENCE = re.compile(r"^\s*(`{3,}|~{3,})")


def split_code(text: str) -> tuple[list[str], list[str]]:
    """The lines outside fenced code blocks (fenced lines blanked, so line numbers hold), and the lines inside."""
    prose, code = [], []
    fence: str | None = None
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            prose.append("")
        elif fence is not None and match and re.fullmatch(rf"\s*{re.escape(fence[0])}{{{len(fence)},}}\s*", line):
            fence = None
            prose.append("")
        elif fence is not None:
            code.append(line)
            prose.append("")
        else:
            prose.append(line)
    return prose, code


CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def without_code_spans(line: str) -> str:
    return CODE_SPAN.sub(lambda match: " " * len(match.group(0)), line)


def code_spans(line: str) -> list[str]:
    return [match.group(2).strip() for match in CODE_SPAN.finditer(line)]


# [text](target) and ![alt](target), with an optional "title"; and reference definitions, [label]: target
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s+<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")


def paragraphs(prose: list[str]) -> list[tuple[int, str]]:
    """(first line number, text) of each run of non-blank lines, joined with spaces: a link or a code span may wrap."""
    found: list[tuple[int, str]] = []
    start, lines = 0, []
    for number, line in enumerate([*prose, ""], start=1):
        if line.strip():
            start = start or number
            lines.append(line.strip())
        elif lines:
            found.append((start, " ".join(lines)))
            start, lines = 0, []
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link and image outside code, in one Markdown file."""
    prose, _ = split_code(path.read_text(encoding="utf-8"))
    found = [(number, match.group(1)) for number, line in enumerate(prose, 1) for match in REFERENCE.finditer(line)]
    for number, text in paragraphs(prose):
        found += [(number, match.group(1)) for match in INLINE_LINK.finditer(without_code_spans(text))]
    return found


def is_external(target: str) -> bool:
    return bool(re.match(r"^(https?:|mailto:|ftp:|//)", target, re.IGNORECASE))


HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text without Markdown, lower-cased, punctuation other than hyphens and
    underscores dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("*", "")
    text = unicodedata.normalize("NFC", text).strip().lower()
    text = "".join(char for char in text if char.isalnum() or char in "-_ " or unicodedata.category(char) == "Mn")
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    prose, _ = split_code(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for line in prose:
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    for match in re.finditer(r"<a\s+(?:name|id)=\"([^\"]+)\"", path.read_text(encoding="utf-8")):
        found.add(match.group(1))
    return frozenset(found)


def broken_link(source: Path, target: str) -> str | None:
    """Why a relative link from `source` does not resolve, or None when it does."""
    location, _, anchor = target.partition("#")
    if location:
        if location.startswith("/"):
            return "an absolute path: use a path relative to the file"
        resolved = (source.parent / location).resolve()
        if not resolved.exists():
            return f"{location} does not exist (relative to {label(source.parent) or '.'}/)"
    else:
        resolved = source
    if anchor:
        if resolved.is_dir() or resolved.suffix.lower() != ".md":
            return f"an anchor into {resolved.name}, which is not a Markdown file"
        if anchor not in anchors(resolved):
            return f"no heading of {resolved.relative_to(REPO)} has the anchor #{anchor}"
    return None


@pytest.mark.parametrize("path", markdown_files(), ids=label)
def test_every_relative_link_resolves(path: Path) -> None:
    problems = [
        f"{label(path)}:{number}: ({target}): {why}"
        for number, target in links(path)
        if not is_external(target) and (why := broken_link(path, target))
    ]
    assert not problems, "\n".join(problems)


# `classifier` at the start of a command: at the start of a line or after a shell separator, a prompt or srun,
# followed by a word that is not an option
COMMAND = re.compile(r"(?:^|[;&|(`]\s*|\$\s+|\bsrun\s+(?:-\S+\s+)*)classifier\s+([A-Za-z][\w-]*)")


def commands_named(path: Path) -> list[tuple[str, str]]:
    """(command, the code it appears in) for every `classifier <command>` in the code spans and blocks of a file."""
    prose, code = split_code(path.read_text(encoding="utf-8"))
    snippets = [span for _, text in paragraphs(prose) for span in code_spans(text)]
    snippets += [re.sub(r"^\s*(?:[A-Z_][A-Z0-9_]*=\S*\s+)*", "", line) for line in code]  # VAR=value classifier ...
    return [(match.group(1), snippet) for snippet in snippets for match in COMMAND.finditer(snippet.strip())]


def documented_pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("path", documented_pages(), ids=label)
def test_every_command_named_is_a_command_of_the_cli(path: Path) -> None:
    unknown = [f"{name!r} in {snippet!r}" for name, snippet in commands_named(path) if name not in COMMAND_NAMES]
    assert not unknown, (
        f"{label(path)} names commands that `classifier` does not have ({sorted(COMMAND_NAMES)}):\n"
        + "\n".join(unknown)
    )


def test_the_documentation_names_commands_at_all() -> None:
    """A guard on the scan above: it finds the commands the README's tour runs."""
    assert {"fit", "test", "export", "serve"} <= {name for name, _ in commands_named(README)}


def test_the_readme_is_a_short_quickstart() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size:,} bytes, over {README_MAX_BYTES:,}: move the rest to docs/"


def test_the_readme_links_to_every_page_of_the_docs() -> None:
    linked = {
        (README.parent / target.partition("#")[0]).resolve()
        for _, target in links(README)
        if not is_external(target) and target.partition("#")[0]
    }
    missing = [label(page) for page in sorted(DOCS.rglob("*.md")) if page.resolve() not in linked]
    assert not missing, f"README.md does not link to {missing}"


def test_the_readme_table_of_commands_lists_every_command_with_its_page() -> None:
    prose, _ = split_code(README.read_text(encoding="utf-8"))
    rows = {}
    for line in prose:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else []
        if len(cells) >= 3 and (name := re.fullmatch(r"`([\w-]+)`", cells[0])):
            rows[name.group(1)] = cells[-1]
    assert set(rows) == COMMAND_NAMES, f"README's table: {sorted(rows)}; the CLI's: {sorted(COMMAND_NAMES)}"
    unlinked = [name for name, page in rows.items() if not INLINE_LINK.search(page) or "docs/" not in page]
    assert not unlinked, f"commands of README's table without a link to their docs page: {unlinked}"


def test_every_docs_page_starts_with_a_title_and_links_back_to_the_readme() -> None:
    problems = []
    for page in sorted(DOCS.rglob("*.md")):
        lines = page.read_text(encoding="utf-8").splitlines()
        if not lines or not re.match(r"# \S", lines[0]):
            problems.append(f"{label(page)} does not start with a '# Title'")
        if not any((page.parent / target.partition("#")[0]).resolve() == README for _, target in links(page)):
            problems.append(f"{label(page)} does not link back to README.md")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Mixed precision, GPUs, DDP", "mixed-precision-gpus-ddp"),
        ("SLURM: preemption and requeue", "slurm-preemption-and-requeue"),
        ("Resume, and checkpoints inside long epochs", "resume-and-checkpoints-inside-long-epochs"),
        ("What `test` and `validate` write", "what-test-and-validate-write"),
        ("k-fold cross-validation", "k-fold-cross-validation"),
        ("Check your data's *figures*", "check-your-datas-figures"),
        ("`lr_find` and run_folders.py", "lr_find-and-run_folderspy"),
    ],
)
def test_slugs_are_githubs(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor
