from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("user_id", "prompt", "negative_prompt", "num_images", "width", "height", "steps", "guidance_scale", "preference_strength", "refine", "seed", "preview_every", "candidates", "score_images")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    PREFERENCE_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    REFINE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    SCORE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    prompt: str
    negative_prompt: str
    num_images: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    preference_strength: float
    refine: bool
    seed: int
    preview_every: int
    candidates: int
    score_images: bool
    def __init__(self, user_id: _Optional[str] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., num_images: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., preference_strength: _Optional[float] = ..., refine: _Optional[bool] = ..., seed: _Optional[int] = ..., preview_every: _Optional[int] = ..., candidates: _Optional[int] = ..., score_images: _Optional[bool] = ...) -> None: ...

class GenerateProgress(_message.Message):
    __slots__ = ("image_index", "step", "total_steps")
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    image_index: int
    step: int
    total_steps: int
    def __init__(self, image_index: _Optional[int] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ...) -> None: ...

class GeneratePreview(_message.Message):
    __slots__ = ("image_index", "step", "png")
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    image_index: int
    step: int
    png: bytes
    def __init__(self, image_index: _Optional[int] = ..., step: _Optional[int] = ..., png: _Optional[bytes] = ...) -> None: ...

class GeneratedImage(_message.Message):
    __slots__ = ("image_index", "png", "seed", "width", "height", "profile_version", "score")
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    PROFILE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    image_index: int
    png: bytes
    seed: int
    width: int
    height: int
    profile_version: int
    score: float
    def __init__(self, image_index: _Optional[int] = ..., png: _Optional[bytes] = ..., seed: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., profile_version: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("progress", "preview", "image")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    progress: GenerateProgress
    preview: GeneratePreview
    image: GeneratedImage
    def __init__(self, progress: _Optional[_Union[GenerateProgress, _Mapping]] = ..., preview: _Optional[_Union[GeneratePreview, _Mapping]] = ..., image: _Optional[_Union[GeneratedImage, _Mapping]] = ...) -> None: ...
