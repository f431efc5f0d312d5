"""A held-out toy-world user as files for the `viper` CLI: `python -m viper_server.toy.examples DIR [INDEX]`.

Writes DIR/liked/*.png and DIR/disliked/*.png (8 each), DIR/comments.json (the format `viper profile extract
--comments` reads) and two query images, DIR/query-liked.png and DIR/query-disliked.png (new held-out images of
the user's liked and disliked colour), and prints which colours the user likes and dislikes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import evaluate


def write_examples(folder: Path, index: int = 0) -> tuple[str, str]:
    """Writes held-out user `index` (0-19) into folder; returns (liked colour, disliked colour)."""
    user = evaluate.held_out_users()[index]
    about = f"A held-out toy-world user who likes {user.liked_colour} and dislikes {user.disliked_colour}."
    comments = {"about": about}
    for side, rated in (("liked", user.liked), ("disliked", user.disliked)):
        (folder / side).mkdir(parents=True, exist_ok=True)
        for number, item in enumerate(rated):
            item.image.save(folder / side / f"{number}.png")
            comments[f"{side}/{number}.png"] = item.comment
    (folder / "comments.json").write_text(json.dumps(comments, indent=2) + "\n")
    (liked_query, *_), (disliked_query, *_) = evaluate.held_out_queries(user, per_side=1, seed=index)
    liked_query.save(folder / "query-liked.png")
    disliked_query.save(folder / "query-disliked.png")
    return user.liked_colour, user.disliked_colour


if __name__ == "__main__":
    liked, disliked = write_examples(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    print(f"{sys.argv[1]}: a user who likes {liked} and dislikes {disliked}")
