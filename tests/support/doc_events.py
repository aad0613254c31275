"""The example payload of every event page of Bitrix24's REST documentation (the public
`bitrix24/b24restdocs` repository), as fixtures under tests/samples/docs/.

Regenerate them from a clone (or a bare mirror) of that repository:

    python -m tests.support.doc_events /path/to/b24restdocs[.git]

Each page's fenced ```json blocks that hold an `"event"` are its examples (a page with tabs, e.g.
one-to-one and group chat, has several): each one becomes `<page path>.json`, slashes as dots
(`crm.deals.events.on-crm-deal-add.json`; `....2.json` for a second example), holding the
page's path, the commit read and the payload exactly as printed (its tokens and ids are the
documentation's made-up ones).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

DOC_SAMPLES = Path(__file__).parents[1] / "samples" / "docs"
_BLOCK = re.compile(r"```json\n(.*?)```", re.S)


def doc_samples() -> list[tuple[str, dict[str, Any]]]:
    """Every stored example: (file stem, its fixture: source, commit, example, payload)."""
    return [(p.stem, json.loads(p.read_text())) for p in sorted(DOC_SAMPLES.glob("*.json"))]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", f"--git-dir={_git_dir(repo)}", *args], check=True, capture_output=True, text=True
    ).stdout


def _git_dir(repo: Path) -> Path:
    return repo / ".git" if (repo / ".git").exists() else repo


def _event_pages(repo: Path) -> list[str]:
    names = _git(repo, "ls-tree", "-r", "HEAD", "--name-only").splitlines()
    return [n for n in names if n.startswith("api-reference/") and n.endswith(".md")]


def extract(repo: Path) -> dict[str, dict[str, Any]]:
    """File name -> fixture, for every example payload of every page."""
    commit = _git(repo, "rev-parse", "HEAD").strip()
    found: dict[str, dict[str, Any]] = {}
    for page in _event_pages(repo):
        text = _git(repo, "show", f"HEAD:{page}")
        if '"event"' not in text:
            continue
        examples = [b for b in _BLOCK.findall(text) if '"event"' in b]
        n = 0
        for block in examples:
            payload = json.loads(block)
            if not isinstance(payload, dict) or "event" not in payload or "data" not in payload:
                continue
            n += 1
            stem = page.removeprefix("api-reference/").removesuffix(".md").replace("/", ".")
            name = f"{stem}.json" if n == 1 else f"{stem}.{n}.json"
            found[name] = {"source": page, "commit": commit, "example": n, "payload": payload}
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    fixtures = extract(Path(argv[0]))
    DOC_SAMPLES.mkdir(parents=True, exist_ok=True)
    for old in DOC_SAMPLES.glob("*.json"):
        old.unlink()
    for name, fixture in sorted(fixtures.items()):
        text = json.dumps(fixture, ensure_ascii=False, indent=1) + "\n"
        (DOC_SAMPLES / name).write_text(text)
    print(f"{len(fixtures)} examples written to {DOC_SAMPLES}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
