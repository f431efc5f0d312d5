"""The input work off the server's process (engine.preprocessing, pixels.py), in process with real workers:

- pixels.py gives IDEFICS2's processor's arrays bit for bit, without torch;
- the workers give what the in-process path gives, and the same errors;
- a worker killed holding a job fails that job (PreprocessWorkerLost), is replaced, and the next job works;
- closing leaves no worker behind;
- the processed-input cache keeps to its byte budget, least recently used out first.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import subprocess
import sys
from concurrent.futures import Future

import numpy as np
import psutil
import pytest
from PIL import Image
from transformers import Idefics2ImageProcessorPil
from waiting import wait_for

from viper_server.engine.errors import PreprocessWorkerLost
from viper_server.engine.preprocessing import Preprocessor, ProcessedCache, cache_key
from viper_server.imaging import ImageDecodeError, decode_image
from viper_server.models.idefics2 import VIPER_PROCESSOR_SETTINGS
from viper_server.pixels import ProcessedImage, check_processor, pixel_batch, process_rgb

from imagedata import corrupt_png, encode, noise_png

MAX_PIXELS = 36_000_000
WAIT = 60.0


def noise(size: tuple[int, int], mode: str) -> Image.Image:
    rng = random.Random(size[0] * size[1])
    return Image.frombytes("RGBA", size, rng.randbytes(size[0] * size[1] * 4)).convert(mode)


# -- pixels.py is the processor -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1000, 700), (700, 1000), (2400, 300), (448, 378), (449, 449), (20, 12)])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_pixels_are_the_processor_s_bit_for_bit(size, mode):
    image = noise(size, mode)
    expected = Idefics2ImageProcessorPil(**VIPER_PROCESSOR_SETTINGS)(images=[[image]], return_tensors="np")
    np.testing.assert_array_equal(process_rgb(image), expected["pixel_values"][0, 0])


def test_a_prompt_s_images_are_padded_as_the_processor_pads_them():
    images = [noise(size, "RGB") for size in [(1000, 700), (700, 1000), (20, 12)]]
    expected = Idefics2ImageProcessorPil(**VIPER_PROCESSOR_SETTINGS)(images=[images], return_tensors="np")
    values, mask = pixel_batch([ProcessedImage(process_rgb(image)) for image in images])
    np.testing.assert_array_equal(values, expected["pixel_values"])
    np.testing.assert_array_equal(mask, expected["pixel_attention_mask"])
    assert values.dtype == expected["pixel_values"].dtype and mask.dtype == expected["pixel_attention_mask"].dtype


def test_a_processor_with_other_settings_is_refused():
    check_processor(Idefics2ImageProcessorPil(**VIPER_PROCESSOR_SETTINGS))
    with pytest.raises(ValueError, match="image_mean"):
        check_processor(Idefics2ImageProcessorPil(**VIPER_PROCESSOR_SETTINGS, image_mean=[0.4, 0.4, 0.4]))


def test_a_worker_imports_no_torch():
    code = ("import sys, viper_server.engine.preprocessing, viper_server.pixels; "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


# -- the workers ---------------------------------------------------------------------------------------------


@pytest.fixture
def pool():
    preprocessor = Preprocessor(1, max_pixels=MAX_PIXELS)
    yield preprocessor
    preprocessor.close()


def test_workers_give_what_this_thread_gives_and_the_same_errors(pool):
    uploads = [encode(noise((900, 600), "RGBA"), "PNG"), encode(noise((300, 200), "RGB"), "JPEG"),
               encode(noise((640, 480), "RGB"), "WEBP"), corrupt_png()]
    results = pool.process_uploads(uploads)
    assert len(results) == len(uploads)
    for data, result in zip(uploads, results):
        try:
            expected = process_rgb(decode_image(data, max_pixels=MAX_PIXELS))
        except ImageDecodeError as exc:
            assert isinstance(result, ImageDecodeError) and str(result) == str(exc)
        else:
            np.testing.assert_array_equal(result.values, expected)
    assert isinstance(results[3], ImageDecodeError)


def test_a_bad_image_ends_the_work_on_its_request(pool):
    """The request is refused for its first bad image: the images after it are not processed (at most the one a
    worker had begun), so a bad image first costs almost nothing of the rest."""
    good = [noise_png(96, seed=seed) for seed in range(12)]
    results = pool.process_uploads([corrupt_png(), *good])
    assert len(results) == 1 and isinstance(results[0], ImageDecodeError)
    assert pool.cache.stats.entries <= 1  # processed images are cached: at most one of the twelve was
    wait_until(lambda: pool.pool_stats.in_flight == 0)
    assert all(isinstance(result, ProcessedImage) for result in pool.process_uploads(good))


def test_a_killed_worker_fails_its_job_and_is_replaced(pool):
    (pid,) = pool.worker_pids()
    os.kill(pid, signal.SIGSTOP)  # it takes the job, and holds it until killed
    future: Future = Future()
    pool._jobs.put((("bytes", noise_png(64)), future))
    wait_until(lambda: pool.pool_stats.in_flight == 1)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(PreprocessWorkerLost, match="replaced"):
        future.result(WAIT)
    (result,) = pool.process_uploads([noise_png(64, seed=1)])
    assert isinstance(result, ProcessedImage)
    assert pool.worker_pids() != [pid] and pool.pool_stats.restarts == 1
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_closing_leaves_no_worker_behind():
    preprocessor = Preprocessor(2, max_pixels=MAX_PIXELS)
    pids = preprocessor.worker_pids()
    assert len(pids) == 2 and all(psutil.pid_exists(pid) for pid in pids)
    preprocessor.close()
    assert not any(psutil.pid_exists(pid) for pid in pids)


def test_a_worker_exits_when_its_server_is_killed():
    # A process holding a pool, killed with SIGKILL: its worker sees its request pipe close, and exits.
    code = ("from viper_server.engine.preprocessing import Preprocessor; import sys, time; "
            "p = Preprocessor(1, max_pixels=100); print(p.worker_pids()[0], flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(holder.stdout.readline())
        assert psutil.pid_exists(worker)
    finally:
        holder.kill()
        holder.wait()
    wait_until(lambda: not psutil.pid_exists(worker))


# -- the cache -----------------------------------------------------------------------------------------------


def test_the_cache_keeps_to_its_budget_least_recently_used_out_first():
    images = {name: ProcessedImage(np.zeros((3, 378, 378), np.float32) + index)
              for index, name in enumerate("abcde")}
    size = images["a"].nbytes
    cache = ProcessedCache(max_bytes=2 * size + size // 2)
    cache.put("a", images["a"])
    cache.put("b", images["b"])
    assert cache.get("a") is images["a"]  # a is now more recent than b
    cache.put("c", images["c"])
    assert cache.get("b") is None and cache.get("a") is images["a"] and cache.get("c") is images["c"]
    for name in "de":
        cache.put(name, images[name])
        assert cache.stats.bytes <= cache.max_bytes
    assert cache.stats.entries == 2 and cache.stats.bytes == 2 * size
    assert (cache.stats.hits, cache.stats.misses) == (3, 1)


def test_an_image_too_large_for_the_budget_is_not_kept():
    cache = ProcessedCache(max_bytes=100)
    cache.put("a", ProcessedImage(np.zeros((3, 378, 378), np.float32)))
    assert cache.stats.entries == 0 and cache.stats.bytes == 0


def test_the_pool_s_cache_keeps_to_its_budget_and_answers_by_content():
    uploads = [noise_png(500, seed=seed) for seed in range(5)]
    one = 3 * 448 * 448 * 4
    preprocessor = Preprocessor(0, max_pixels=MAX_PIXELS, cache_bytes=3 * one)
    first = preprocessor.process_uploads(uploads)
    assert preprocessor.cache.stats.bytes <= 3 * one and preprocessor.cache.stats.entries == 3
    again = preprocessor.process_uploads(uploads[-3:])
    assert all(a is b for a, b in zip(again, first[-3:]))  # the same arrays: from the cache
    assert preprocessor.cache.stats.hits == 3
    assert preprocessor.cache.get(cache_key(first[0].sha256)) is None  # least recently used: gone


wait_until = functools.partial(wait_for, timeout=WAIT)


# -- the flags -----------------------------------------------------------------------------------------------


def serve_config(*argv: str, environ: dict[str, str] | None = None):
    import argparse

    from viper_server.config import add_serve_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)), environ or {})


def test_the_workers_and_the_cache_budget_are_flags_and_env_vars():
    assert serve_config().preprocess_workers is None  # the server picks default_workers()
    config = serve_config("--preprocess-workers", "0", environ={"VIPER_PROCESSED_CACHE_BYTES": "1048576"})
    assert (config.preprocess_workers, config.processed_cache_bytes) == (0, 1 << 20)
    for flag in ("--preprocess-workers", "--processed-cache-bytes"):
        with pytest.raises(ValueError, match="must not be negative"):
            serve_config(flag, "-1")
