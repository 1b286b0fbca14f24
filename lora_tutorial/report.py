"""Results a notebook publishes: `text` for the reader, `data` for the README's tables (tools/readme),
so a re-run notebook and the README cannot disagree unnoticed."""

import json
from pathlib import Path
from typing import Any

MEDIA_TYPE = "application/vnd.lora-tutorial.result+json"

def publish(name: str, data: dict[str, Any], text: str) -> None:
    """Show `text` and store `data` (plain JSON) in the cell's output under `name`."""
    from IPython.display import publish_display_data

    plain = json.loads(json.dumps(data))  # only what JSON can hold: it goes into the .ipynb
    publish_display_data({"text/plain": text, MEDIA_TYPE: {"name": name, "data": plain}})

def published(path: Path) -> dict[str, dict[str, Any]]:
    """Every result a notebook file published, by name (the last one wins)."""
    return {bundle["name"]: bundle["data"] for cell in json.loads(Path(path).read_text()).get("cells", [])
            for output in cell.get("outputs", []) if (bundle := output.get("data", {}).get(MEDIA_TYPE))}
