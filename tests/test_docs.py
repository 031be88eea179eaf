"""The documentation against the code, without running anything heavy: every relative
markdown link resolves (anchors included), every ``--option`` of a documented command is one
its script's parser has, and every error/warning line the docs quote still exists, word for
word, among the code's messages. Each guards against a doc that drifted from a code change."""
from __future__ import annotations

import argparse
import ast
import importlib
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "BENCHMARKS.md", REPO / "data" / "README.md",
        *sorted((REPO / "docs").glob("*.md"))]
FIELD = "\x00"  # an f-string's {field} in the code's messages


def doc_id(doc: Path) -> str:
    return str(doc.relative_to(REPO))


def without_code_blocks(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_relative_links_resolve(doc):
    """A page renamed or a section retitled left links pointing nowhere."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", without_code_blocks(doc.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, fragment = target.partition("#")
        page = (doc.parent / path) if path else doc
        if not page.exists():
            broken.append(f"{target}: no such file")
        elif fragment and fragment not in {anchor(h) for h in re.findall(r"^#+ (.*)$", page.read_text(), re.M)}:
            broken.append(f"{target}: no such heading")
    assert not broken, f"{doc_id(doc)}: " + "; ".join(broken)


# --- options --------------------------------------------------------------------------

SCRIPTS = ["train", "test", "detect", "detect_txt", "evaluate", "export", "analyze", "darknet_convert",
           "darknet_train", "darknet_train_multigpu", "darknet_train_multigpu_distr", "voc_convert", "synthetic"]
BENCHES = sorted(p.stem for p in (REPO / "bench").glob("bench_*.py"))


class Captured(Exception):
    def __init__(self, parser):
        super().__init__("parser captured")
        self.parser = parser


@pytest.fixture(scope="module")
def options() -> dict[str, set[str]]:
    """Each command's option strings, from the parser its ``main`` builds: parsing is
    intercepted, so nothing runs (the recipes, DDP set-up and data come after parsing)."""
    def capture(self, *args, **kwargs):
        raise Captured(self)

    found = {}
    saved, argparse.ArgumentParser.parse_known_args = argparse.ArgumentParser.parse_known_args, capture
    sys.path.insert(0, str(REPO / "bench"))
    try:
        for name in SCRIPTS + BENCHES:
            module = importlib.import_module(name)
            with pytest.raises(Captured) as caught:
                module.main([])
            key = f"bench/{name}" if name in BENCHES else name
            found[key] = {o for action in caught.value.parser._actions for o in action.option_strings}
    finally:
        argparse.ArgumentParser.parse_known_args = saved
        sys.path.remove(str(REPO / "bench"))
    return found


def code_blocks(text: str):
    """Fenced blocks and four-space indented blocks, continuation lines joined."""
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, re.S)
    blocks += re.findall(r"(?:^    .*\n)+", without_code_blocks(text), re.M)
    return [block.replace("\\\n", " ") for block in blocks]


def documented_commands(text: str):
    """(script, options) for every ``python X.py ...`` / ``torchrun ... X.py ...`` of a code
    block, and every inline ``X.py --option`` span of the prose."""
    for block in code_blocks(text):
        for line in block.splitlines():
            for part in re.split(r"&&|;|\|", line.split(" #")[0]):
                found = re.search(r"\b(?:python|torchrun)\b.*?([\w/]+)\.py\b(.*)", part)
                if found:
                    yield found.group(1), re.findall(r"(?<![\w-])(--[\w-]+)", found.group(2)), part.strip()
    for span in re.findall(r"`([^`\n]*)`", without_code_blocks(text)):
        found = re.match(r"(?:python )?([\w/]+)\.py\b(.*)", span)
        if found:
            yield found.group(1), re.findall(r"(?<![\w-])(--[\w-]+)", found.group(2)), span


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_documented_options_exist(doc, options):
    """An option renamed or removed in a script's parser while a page still shows it:
    the reader's command fails with 'unrecognized arguments'."""
    unknown = [f"{script}.py {option} ({where})" for script, used, where in documented_commands(doc.read_text())
               if script in options for option in used if option not in options[script]]
    assert not unknown, f"{doc_id(doc)}: " + "; ".join(unknown)


def test_documented_commands_are_the_project_s(options):
    """The check above is not empty: the pages show commands of most scripts."""
    shown = {script for doc in DOCS for script, _, _ in documented_commands(doc.read_text())}
    assert set(SCRIPTS) - {"darknet_train_multigpu"} <= shown
    assert {"bench/bench_train", "bench/bench_detect"} <= shown & set(options)


# --- quoted messages ------------------------------------------------------------------

# Names standing for the user's files, folders and numbers in the quoted messages.
PLACEHOLDERS = {"gt", "det", "out", "runs", "nan", "str", "E", "N", "W", "H", "X"}


def code_messages() -> list[str]:
    """Every string literal of the project's modules, an f-string's fields as FIELD."""
    messages = []
    for path in REPO.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else FIELD for v in node.values)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
            else:
                continue
            messages.append(" ".join(text.split()))
    return messages


def phrases(message: str) -> list[str]:
    """The runs of three or more plain words of a quoted message: what the code must print
    verbatim. File names, numbers, '...' and quoted or bracketed values stand for the
    user's values and break a run."""
    runs, run = [], []
    for word in re.sub(r"\.\.\.|[()\[\]]|'[^']*'", " | ", message).split():
        plain = re.fullmatch(r"[A-Za-z][A-Za-z'-]*[,;]?", word) and word.rstrip(",;") not in PLACEHOLDERS
        if plain:
            run.append(word)
        if not plain or word[-1] in ",;":
            runs.append(run)
            run = []
    runs.append(run)
    return [" ".join(r).rstrip(",;") for r in runs if len(r) >= 3]


def quoted_messages(doc: Path) -> list[str]:
    """The ``error: ...`` (warning, note, interrupted) spans of a page, and every quoted span
    of troubleshooting.md's message column."""
    text = without_code_blocks(doc.read_text())
    spans = re.findall(r"`((?:error|warning|note|interrupted): [^`]*)`", text)
    if doc.name == "troubleshooting.md":
        for row in re.findall(r"^\| (.*?) \| .* \|$", text, re.M)[2:]:
            spans += re.findall(r"`([^`]*)`", row)
    return list(dict.fromkeys(spans))


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_quoted_messages_are_the_code_s(doc):
    """A message reworded in the code while the docs (troubleshooting.md's table above all)
    still quote the old words: a user searching the page for the line they got finds nothing."""
    messages = code_messages()
    missing = [f"{phrase!r} (of {span!r})" for span in quoted_messages(doc) for phrase in phrases(span)
               if not any(part and phrase in part for m in messages for part in m.split(FIELD))]
    assert not missing, f"{doc_id(doc)}: not in the code: " + "; ".join(missing)


def test_troubleshooting_quotes_many_messages():
    """The check above reads the table: dozens of phrases come out of it."""
    spans = quoted_messages(REPO / "docs" / "troubleshooting.md")
    assert len(spans) >= 40 and sum(len(phrases(s)) for s in spans) >= 40


# --- the demo's commands and numbers ----------------------------------------------------

def script_docstrings() -> list[tuple[str, str]]:
    return [(p.name, ast.get_docstring(ast.parse(p.read_text())) or "") for p in sorted(REPO.glob("*.py"))]


def test_the_demo_checkpoint_is_shown_with_its_own_data():
    """The README, evaluation.md and test.py's --help ran the demo's best.pt (classes cross and
    rectangle) on data/test.csv (VOC's 20 ids): the reader got 'class id 19 out of range'.
    test.py's default --data is that csv, so a demo command must name data/shapes/."""
    sources = [(doc_id(doc), doc.read_text()) for doc in DOCS] + script_docstrings()
    wrong = []
    for name, text in sources:
        for block in code_blocks(text) + [text]:
            for line in block.splitlines():
                line = line.split(" #")[0]
                if re.search(r"\b(?:test|detect_txt)\.py runs/train/demo/best\.pt", line) and \
                        not re.search(r"--data data/shapes/", line):
                    wrong.append(f"{name}: {line.strip()}")
    assert not wrong, "; ".join(sorted(set(wrong)))


def demo_analysis(text: str) -> str:
    """The analyze.py table of the demo model quoted in a page (its rows, spaces squeezed)."""
    rows = re.findall(r"^(?:cross|rectangle|overall)(?:\s+\d+){7}$|^overall %.*$", text, re.M)
    return "\n".join(" ".join(row.split()) for row in rows)


def test_readme_and_analysis_page_quote_the_same_demo_model():
    """docs/analysis.md kept an older demo model's table (67.2% correct, mAP 0.6221) after the
    README's Results moved to the current one (71.9%, 0.7830)."""
    readme, analysis = (REPO / "README.md").read_text(), (REPO / "docs" / "analysis.md").read_text()
    assert demo_analysis(readme) and demo_analysis(readme) == demo_analysis(analysis)
    readme_map = re.search(r"--data data/shapes/test\.csv\n.*?^mAP = ([\d.]+)", readme, re.S | re.M).group(1)
    assert f"Its test mAP is {readme_map}" in analysis


def test_synthetic_cli_regenerates_the_bundled_counts(monkeypatch, tmp_path):
    """data/README: ``python synthetic.py --out data`` regenerates data/. Bug: main passed
    --n-test positionally into write_bundled_sample's newer n_val, so the regenerated val.csv
    had 100 rows where the bundled one has 48 (found by running it; every other file came out
    identical). The counts the command asks for must be the bundled csv files' row counts."""
    import inspect

    import synthetic

    signature, calls = inspect.signature(synthetic.write_bundled_sample), []
    monkeypatch.setattr(synthetic, "write_bundled_sample", lambda *a, **k: calls.append(signature.bind(*a, **k)))
    synthetic.main(["--out", str(tmp_path), "--no-photos"])
    (asked,) = calls
    asked.apply_defaults()

    def rows(name):  # the csv's data rows (a header first)
        return len((REPO / "data" / name).read_text().splitlines()) - 1

    photos = 4
    assert (asked.arguments["n_train"] + photos, asked.arguments["n_val"], asked.arguments["n_test"]) == \
        (rows("train.csv"), rows("val.csv"), rows("test.csv"))
