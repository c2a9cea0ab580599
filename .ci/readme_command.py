"""Print the shell command that README.md marks with ``<!-- command: NAME -->``.

CI runs README's test command through this, so what CI proves is what README says.
"""

import re
import sys
from pathlib import Path

name = sys.argv[1]
readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
match = re.search(rf"<!-- command: {re.escape(name)} -->\s*```bash\n(.+?)\n```", readme, re.S)
if match is None:
    sys.exit(f"README.md has no command marked <!-- command: {name} -->")
print(match.group(1).strip())
