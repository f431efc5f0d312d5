"""Request validation: every bad upload is refused with a message naming the field."""

import pytest
from PIL import Image

from viper_profiles import Rating
from viper_proto.v1 import profile_pb2
from viper_server.config import Limits
from viper_server.rpc.validation import InvalidRequest, check_extract, check_image, check_user_id

from imagedata import encode, png_claiming

LIMITS = Limits()


SMALL = Image.new("RGB", (20, 12), (200, 30, 40))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepted_formats_decode_to_rgb(fmt):
    image = check_image(encode(SMALL.convert("RGBA") if fmt == "PNG" else SMALL, fmt), "x", LIMITS)
    assert image.mode == "RGB"
    assert image.size == (20, 12)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "x: empty image"),
        (b"definitely not an image", "x: not a decodable"),
        (encode(SMALL, "PNG")[:60], "x: truncated or corrupt"),
        (encode(SMALL, "GIF"), "x: GIF images are not accepted"),
        (png_claiming(100_000, 100_000), "x: image exceeds the limit of 36000000 pixels"),
    ],
    ids=["empty", "garbage", "truncated", "gif", "bomb"],
)
def test_bad_images_are_refused_with_the_field_named(data, message):
    with pytest.raises(InvalidRequest, match=message):
        check_image(data, "x", LIMITS)


def test_declared_size_is_checked_before_decoding():
    with pytest.raises(InvalidRequest, match="x: 9000x9000 image exceeds the limit of 36000000 pixels"):
        check_image(png_claiming(9000, 9000), "x", LIMITS)


def test_pixel_limit_is_configurable():
    with pytest.raises(InvalidRequest, match="exceeds the limit of 100 pixels"):
        check_image(encode(SMALL, "PNG"), "x", Limits(max_image_pixels=100))


class Vocabulary:
    """What rpc.validation asks of the loaded models: the tiny IDEFICS2 tokenizer's control tokens."""

    control_tokens = frozenset({"<unk>", "<s>", "</s>", "<fake_token_around_image>", "<image>", "<end_of_utterance>"})
    max_prompt_tokens = 77

    def prompt_token_count(self, text):
        return len(text.split()) + 2


def check_rated_images(images, limits=LIMITS):
    _, uploads = check_extract(profile_pb2.ExtractProfileRequest(user_id="alice", images=images), limits, Vocabulary())
    return uploads


def rated(data=None, comment="nice", rating=profile_pb2.RATING_LIKED):
    return profile_pb2.RatedImage(data=encode(SMALL, "PNG") if data is None else data, comment=comment, rating=rating)


def test_rated_images_keep_bytes_comment_and_rating():
    checked = check_rated_images([rated(), rated(comment="meh", rating=profile_pb2.RATING_DISLIKED)], LIMITS)
    assert [(c.comment, c.rating) for c in checked] == [("nice", Rating.LIKED), ("meh", Rating.DISLIKED)]
    assert checked[0].data == encode(SMALL, "PNG")


@pytest.mark.parametrize(
    "images, message",
    [
        ([], "images: at least one"),
        ([rated()] * 65, "images: 65 given, at most 64"),
        ([rated(), rated(comment="x" * 4001)], r"images\[1\].comment: 4001 characters"),
        ([rated(rating=profile_pb2.RATING_UNSPECIFIED)], r"images\[0\].rating"),
        ([rated(), rated(data=b"nope")], r"images\[1\].data: not a decodable"),
    ],
    ids=["none", "too-many", "long-comment", "no-rating", "bad-image"],
)
def test_bad_rated_images(images, message):
    with pytest.raises(InvalidRequest, match=message):
        check_rated_images(images)


@pytest.mark.parametrize("user_id", ["", "a" * 129, "has space", "semi;colon", "ünïcode"])
def test_invalid_user_ids(user_id):
    with pytest.raises(InvalidRequest, match="user_id"):
        check_user_id(user_id)


@pytest.mark.parametrize("user_id", ["a", "a" * 128, "user-1", "mail@example.com", "org:team.user_x"])
def test_valid_user_ids(user_id):
    assert check_user_id(user_id) == user_id
