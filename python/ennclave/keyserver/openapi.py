"""Write the key server's OpenAPI schema: `python -m ennclave.keyserver.openapi [PATH]`
(default docs/keyserver-openapi.json in the source tree). A test checks it is current."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .app import openapi_schema


def main(argv: list[str]) -> int:
    out = (
        Path(argv[0])
        if argv
        else Path(__file__).resolve().parents[3] / "docs" / "keyserver-openapi.json"
    )
    out.write_text(json.dumps(openapi_schema(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
