"""The project's citations point into its own protocol document, docs/protocol.md, and nowhere else."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "docs" / "protocol.md"
SECTION_SIGN = "\u00a7"  # written as an escape so that this file holds no citation of its own
# The name of the external fact sheet the project once cited, split so that this file does not contain it.
EXTERNAL_SHEET = ("PAPER" + "_SPEC").encode()
# Files that may use a bare section sign: the protocol itself, and the README, which says what it means.
BARE_SIGN_OK = {"README.md", "docs/protocol.md"}
CITATION = re.compile(SECTION_SIGN + r"(\d+(?:\.\d+)?)(?:\s*[–-]\s*(\d+(?:\.\d+)?))?")
HEADING = re.compile(r"^(?:## (\d+)\.|### (\d+\.\d+)) ", re.MULTILINE)


def project_files() -> list[str]:
    """Return every file git tracks in the project (paths relative to the root)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git work tree")
    return [name for name in out.decode().split("\0") if name and (ROOT / name).is_file()]


def text_files() -> dict[str, str]:
    """Return the project's UTF-8 text files by path."""
    texts = {}
    for name in project_files():
        try:
            texts[name] = (ROOT / name).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
    return texts


def protocol_sections() -> set[str]:
    """Return the section numbers of docs/protocol.md: "4" for `## 4. …`, "4.1" for `### 4.1 …`."""
    return {a or b for a, b in HEADING.findall(PROTOCOL.read_text(encoding="utf-8"))}


def test_protocol_has_the_twelve_sections():
    sections = protocol_sections()
    assert {str(n) for n in range(1, 13)} <= sections
    assert all(s.split(".")[0] in sections for s in sections)


def test_no_project_file_names_the_external_fact_sheet():
    offenders = [name for name in project_files() if EXTERNAL_SHEET in (ROOT / name).read_bytes()]
    assert offenders == [], f"cite docs/protocol.md instead in: {', '.join(offenders)}"


def test_every_citation_names_an_existing_protocol_section():
    sections = protocol_sections()
    missing = [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
               for name, text in text_files().items() for m in CITATION.finditer(text)
               if any(number and number not in sections for number in m.groups())]
    assert missing == [], "citations of sections docs/protocol.md does not have:\n" + "\n".join(missing)


def test_citations_outside_the_readme_say_protocol():
    unlabelled = [f"{name}:{i}: {line.strip()}" for name, text in text_files().items() if name not in BARE_SIGN_OK
                  for i, line in enumerate(text.splitlines(), 1)
                  if SECTION_SIGN in line and f"protocol {SECTION_SIGN}" not in line.lower()]
    hint = "write 'protocol \u00a7N' so a reader knows which document is meant:\n"
    assert unlabelled == [], hint + "\n".join(unlabelled)
