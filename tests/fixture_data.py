"""The ViPer example images (tests/fixtures/viper_examples, Apache-2.0, downsized to 448 px)."""

import json
from pathlib import Path

from viper_client import RatedImage

FIXTURES = Path(__file__).parent / "fixtures" / "viper_examples"
QUERIES = [FIXTURES / "query1.png", FIXTURES / "query2.png"]


def fixture_images() -> list[RatedImage]:
    """The 16 commented context images, liked first."""
    comments = json.loads((FIXTURES / "comments.json").read_text())
    return [
        RatedImage(path, comment=comments[f"{rating}/{path.name}"], rating=rating)
        for rating in ("liked", "disliked")
        for path in sorted((FIXTURES / rating).glob("*.png"))
    ]
