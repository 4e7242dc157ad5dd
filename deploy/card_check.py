"""`exportline card check`: a card with holes, placeholders or numbers the reports don't back is refused."""

from __future__ import annotations

import math
from pathlib import Path

from exportline.deploy import card as c
from exportline.deploy.reports import BENCH_JSON, VERIFY_JSON
from exportline.exporters.core.bundle import MANIFEST

# Section → what its numbers come from. Only derived lines are compared (bullets and table
# rows); prose around them may be edited freely.
_DERIVED = {
    "Model details": "config.json / manifest.json",
    "Evaluation": VERIFY_JSON,
    "Performance": BENCH_JSON,
    "Files": MANIFEST,
}


def check_card(root: Path, *, text: str | None = None, manifest: dict | None = None) -> list[str]:
    """Problems with `root`/README.md, one line each; an empty list means the card is sound.
    `text` and `manifest` check a card not written yet (push --dry-run) against that manifest."""
    from huggingface_hub import ModelCard

    root = Path(root)
    path = root / c.README
    if text is None and not path.is_file():
        return [f"{path} is missing; write it with: exportline card write {root}"]
    text = path.read_text() if text is None else text
    try:
        card = ModelCard(text)
    except Exception as exc:  # yaml and huggingface_hub raise several types for a broken header
        return [f"README.md metadata cannot be parsed ({str(exc).splitlines()[0]}); regenerate it: exportline card write {root}"]
    inp = c.load_inputs(root, manifest=manifest)
    problems = _placeholders(text)
    sections = _sections(card.text)
    for title in c.SECTIONS:
        if title not in sections:
            problems.append(f"section '{title}' is missing")
        elif not sections[title].strip():
            problems.append(f"section '{title}' is empty")
    if inp.random_init and c.RANDOM_INIT_MARK not in card.text.split("\n## ", 1)[0]:
        problems.append("the model is random-init but the card does not say so at the top (before the first section)")
    rendered = c.sections(inp)
    for title, source in _DERIVED.items():
        if title in sections:
            problems += _derived_problems(title, sections[title], rendered[title], source=source)
    problems += _metadata_problems(card, inp)
    return problems


def _placeholders(text: str) -> list[str]:
    return [f"line {i}: placeholder '{m.group(0)}' left in the card: {line.strip()[:80]}"
            for i, line in enumerate(text.splitlines(), 1) if (m := c.PLACEHOLDER.search(line))]


def _sections(body: str) -> dict[str, str]:
    sections, current = {}, None
    for line in body.splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    return sections


def _derived_lines(lines) -> list[str]:
    return [line.rstrip() for line in lines if line.lstrip().startswith(("|", "- "))]


def _derived_problems(title: str, section: str, expected_lines: list[str], *, source: str) -> list[str]:
    expected, actual = _derived_lines(expected_lines), _derived_lines(section.splitlines())
    by_key = {_key(line): line for line in expected}
    problems = []
    for line in actual:
        if line not in expected:
            want = by_key.get(_key(line))
            hint = f"; {source} gives: {want}" if want else f"; {source} has no such entry"
            problems.append(f"{title}: '{line.strip()}' disagrees with {source}{hint}")
    for line in expected:
        if line not in actual and _key(line) not in {_key(a) for a in actual}:
            problems.append(f"{title}: '{line.strip()}' from {source} is missing from the card")
    return problems


def _key(line: str) -> str:
    """What a derived line is about: a table row's first cell, a bullet's label."""
    s = line.strip()
    if s.startswith("|"):
        return s.strip("|").split("|")[0].strip()
    return s.split(":")[0]


def _metadata_problems(card, inp) -> list[str]:
    problems = []
    want_tags, have_tags = set(c.tags(inp)), set(card.data.get("tags") or [])
    if want_tags != have_tags:
        problems.append(f"metadata tags {sorted(have_tags)} do not match the bundle's files {sorted(want_tags)}")
    expected = {(r.dataset_type, r.metric_name): r.metric_value for r in c.eval_results(inp)}
    actual = {(r.dataset_type, r.metric_name): r.metric_value for r in (card.data.eval_results or [])}
    for key, value in actual.items():
        source = VERIFY_JSON if key[0] == "exportline-verify" else BENCH_JSON
        if key not in expected:
            problems.append(f"model-index '{key[1]}' = {value} is not in {source}")
        elif not _same(value, expected[key]):
            problems.append(f"model-index '{key[1]}' = {value} disagrees with {source} ({expected[key]})")
    for key in expected.keys() - actual.keys():
        problems.append(f"model-index lacks '{key[1]}' from the reports")
    return problems


def _same(a, b) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    except (TypeError, ValueError):
        return False
