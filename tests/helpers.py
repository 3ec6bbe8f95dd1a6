"""Fixtures shared by several test modules: a tiny fake offline data cache (the layout that
``python -m hypermoe_jax.data fetch`` writes, see ``hypermoe_jax/data.py``)."""

import json

from hypermoe_jax import data as data_lib

PROSE = [
    "Fellow citizens of the Senate and House of Representatives: the state of the union is strong.",
    "We have met to consider the welfare of the people, the progress of commerce and the peace.",
    "To be, or not to be, that is the question: whether tis nobler in the mind to suffer.",
    "The slings and arrows of outrageous fortune, or to take arms against a sea of troubles.",
]


def write_offline_cache(cache, wiki_repeat: int = 40):
    """Writes every offline dataset (``data_lib.DATASETS``) under ``cache``; the wiki XML holds
    ``wiki_repeat`` copies of one page header and line (40: 5.6 kB, 280-byte validation / test
    splits)."""
    # (The two adjacent literals are one string: the header repeats with the line.)
    xml = ("<mediawiki><page><title>A</title><revision><text xml:space=\"preserve\">"
           "'''Anarchism''' is a [[political philosophy|philosophy]] of 1 thing.\n" * wiki_repeat
           + "</text></revision></page></mediawiki>\n").encode()
    contents = {}
    for split, part in data_lib.split_bytes(xml).items():
        contents[f"wiki/char/{split}.raw"] = part
    for split, part in data_lib.split_bytes(data_lib.wikifil(xml)).items():
        contents[f"wiki/text8/{split}.txt"] = part
    contents["wiki/enwik8_sample.xml"] = xml
    for name in ("sotu", "shakespeare"):
        for split in data_lib.SPLITS:
            contents[f"{name}/{split}.txt"] = "\n".join(PROSE + ["", *PROSE[:2], ""]) + "\n"
    for sub in ("rotten_tomatoes", "uci"):
        for split in data_lib.SPLITS:
            contents[f"sentiment/{sub}/{split}.tsv"] = (
                "positive\tA charming, funny film.\nnegative\tDull and far too long.\n" * 3)
    for rel, body in contents.items():
        p = cache / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(body if isinstance(body, bytes) else body.encode())
    for name in data_lib.DATASETS:
        (cache / name / "info.json").write_text(
            json.dumps({"name": name, "format_version": data_lib.FORMAT_VERSION}))
