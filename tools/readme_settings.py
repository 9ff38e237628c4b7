"""Rewrite the README's settings table from worker/settings/table.py's SETTINGS.

    python tools/readme_settings.py


tests/settings/test_loader.py fails until the README holds the table the code makes.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.settings.table import markdown_table  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"
text = README.read_text()
start = text.index("| Variable | Default | Meaning |")
end = text.index("\n\n", start)
README.write_text(text[:start] + markdown_table() + text[end:])
print(f"{README}: settings table rewritten")
