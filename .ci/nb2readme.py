"""Writes README.md from nbs/index.ipynb (markdown cells as they are, code cells as fenced blocks).

nbdev's own `nbdev_readme` renders through Quarto, which these machines cannot download;
this does the same job for a notebook with only markdown, code and text outputs."""
import json
import sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
nb_path = root / "nbs" / "index.ipynb"
out_path = root / "README.md"
nb = json.loads(nb_path.read_text(encoding="utf-8"))
parts = []
for cell in nb["cells"]:
    src = "".join(cell["source"]).strip()
    if not src or src.startswith("#| hide") or "\n#| hide" in src:
        continue
    if cell["cell_type"] == "markdown":
        parts.append(src)
    elif cell["cell_type"] == "code":
        lines = [l for l in src.splitlines() if not l.startswith("#|")]
        parts.append("```python\n" + "\n".join(lines) + "\n```")
        for out in cell.get("outputs", []):
            text = out.get("text") or out.get("data", {}).get("text/plain")
            if text:
                parts.append("    " + "".join(text).rstrip().replace("\n", "\n    "))
header = "<!-- generated from nbs/index.ipynb by .ci/nb2readme.py: edit the notebook, not this file -->\n\n"
text = header + "\n\n".join(parts) + "\n"
if "--check" in sys.argv:
    sys.exit(0 if out_path.exists() and out_path.read_text(encoding="utf-8") == text else 1)
out_path.write_text(text, encoding="utf-8")
