"""seqio data sources over local files whose paths are found when a dataset is requested.

Tasks are registered at import; the files they read (the offline cache, enwik8 somewhere on disk)
may not exist yet. These sources call a ``resolve`` function in ``get_dataset``, so a missing file
raises that function's explanation (how to fetch it, which variable to set) at the point of use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import seqio
import tensorflow as tf

from hypermoe_jax.data.text import SPLITS

SHUFFLE_CHUNKS = 16384  # enough to shuffle every chunk of a 100 MB file of 16 KiB chunks


class ByteChunkSource(seqio.DataSource):
    """A byte range of a file (per split) as consecutive chunks: ``{"text": <chunk_bytes bytes>}``
    (the last chunk may be shorter). Newlines and every other byte are kept, as character-level
    LM on enwik8 needs. Shards by chunk, any number of shards.

    ``resolve(split) -> (path, start, end)``.
    """

    def __init__(self, resolve: Callable[[str], tuple[str, int, int]],
                 splits: Sequence[str] = SPLITS, chunk_bytes: int = 16384):
        self._resolve = resolve
        self._chunk = int(chunk_bytes)
        super().__init__(splits=splits, caching_permitted=True)

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def list_shards(self, split: str) -> Sequence[str]:
        return [self._resolve(split)[0]]

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                    shard_info: seqio.ShardInfo | None = None, *, sequence_length=None,
                    use_cached: bool = False, num_epochs: int | None = 1) -> tf.data.Dataset:
        path, start, end = self._resolve(split)
        size = tf.io.gfile.stat(path).length
        full, rest = divmod(end - start, self._chunk)
        parts = []
        if full:
            parts.append(tf.data.FixedLengthRecordDataset(
                path, self._chunk, header_bytes=start,
                footer_bytes=size - start - full * self._chunk))
        if rest:
            parts.append(tf.data.FixedLengthRecordDataset(
                path, rest, header_bytes=start + full * self._chunk, footer_bytes=size - end))
        if not parts:
            raise ValueError(f"{path}: split {split!r} (bytes {start}-{end}) is empty")
        ds = parts[0] if len(parts) == 1 else parts[0].concatenate(parts[1])
        if shard_info and shard_info.num_shards > 1:
            ds = ds.shard(shard_info.num_shards, shard_info.index)
        if shuffle:
            ds = ds.shuffle(SHUFFLE_CHUNKS, seed=seed)
        return ds.map(lambda b: {"text": b}, num_parallel_calls=tf.data.AUTOTUNE)


class TextLineSource(seqio.DataSource):
    """Lines of local text files, in order: ``{"text": line}``.

    ``resolve(split) -> [paths]``. Shards into contiguous blocks of ``block_lines`` lines dealt
    round-robin (so each host still reads whole passages and documents); shuffling only permutes
    the files (the task's shuffle buffer mixes examples).
    """

    def __init__(self, resolve: Callable[[str], Sequence[str]],
                 splits: Sequence[str] = SPLITS, block_lines: int = 256):
        self._resolve = resolve
        self._block = int(block_lines)
        super().__init__(splits=splits, caching_permitted=True)

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def list_shards(self, split: str) -> Sequence[str]:
        return list(self._resolve(split))

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                    shard_info: seqio.ShardInfo | None = None, *, sequence_length=None,
                    use_cached: bool = False, num_epochs: int | None = 1) -> tf.data.Dataset:
        files = [str(f) for f in self._resolve(split)]
        if not files:
            raise ValueError(f"no files for split {split!r}")
        files_ds = tf.data.Dataset.from_tensor_slices(files)
        if shuffle and len(files) > 1:
            files_ds = files_ds.shuffle(len(files), seed=seed)
        ds = files_ds.flat_map(tf.data.TextLineDataset)
        if shard_info and shard_info.num_shards > 1:
            n, i, block = shard_info.num_shards, shard_info.index, self._block
            ds = ds.enumerate().filter(lambda k, _: tf.equal((k // block) % n, i)).map(
                lambda _, line: line)
        return ds.map(lambda line: {"text": line}, num_parallel_calls=tf.data.AUTOTUNE)
