"""O-KNN's extraction progress: a log line at every tenth of the images, whatever the batch sizes."""
from __future__ import annotations

import logging
import re

from eval.oknn import Progress


def test_progress_logs_each_tenth_once_and_the_end(caplog):
    with caplog.at_level(logging.INFO, logger="eval.oknn"):
        p = Progress("bank (train2017)", 1000)
        for n in [30] * 10 + [250] + [1] * 100 + [350]:     # 300, then a jump over two tenths, then the rest
            p.update(n)
    lines = [r.getMessage() for r in caplog.records if r.name == "eval.oknn"]
    done = [int(re.search(r": (\d+)/1000 images", m).group(1)) for m in lines]
    assert done == [120, 210, 300, 550, 600, 1000]         # 550 covers the fifth tenth too: one line
    assert lines[-1].startswith("O-KNN bank (train2017): 1000/1000 images (100%)")


def test_progress_of_a_few_images_logs_each_image_at_most_once(caplog):
    with caplog.at_level(logging.INFO, logger="eval.oknn"):
        p = Progress("queries", 3)
        for _ in range(3):
            p.update(1)
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        "O-KNN queries: 1/3 images (33%)", "O-KNN queries: 2/3 images (67%)", "O-KNN queries: 3/3 images (100%)"]
