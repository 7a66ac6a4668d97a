"""The one module that opens webdataset shards (img2dataset layout, any writer): finding them, reading
records, decoding a record into pixels / label / caption, counting samples against the pack manifest, writing.

    urls = expand_shards("data/mnist")      # a directory (all *.tar, sorted), brace pattern, glob, a::b, pipe:
    for rec in reader_records(urls, 0, 1):  # raw {"__key__", "__url__", ext: bytes} or BadSample events
        sample = decode_record(rec, 32, 3)  # pixels float32 [C,H,W] in [-1,1], label, text, key, shard
    with ShardWriter(out, "shard-%06d.tar") as sink:
        sink.write("000000000", image, label=3, text="a caption", meta={...})

A record holds `<key>.png|jpg|...` and optionally `<key>.cls` (integer label), `<key>.txt` (caption) and
`<key>.json` ("label" / "caption" fallbacks). Training (dpldm/data/stream.py), packing (pack.py), sampling
(dpldm/sample.py) and evaluation (dpldm/eval/shards.py) all go through these functions, so every stage sees
the same pixels: channel conversion and 16-bit rescaling live in dpldm/data/images.py. See docs/data.md.
"""
from __future__ import annotations

import glob
import json
import os
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import webdataset as wds
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from dpldm.data.images import (IMAGE_EXTENSIONS, convert_channels, decode_image, encode_image, fit_resolution,
                               to_float_chw)
from dpldm.errors import DpldmError
from dpldm.log import log as _log


class BadSampleWarning(UserWarning):
    """A public sample was skipped (shard and key in the message)."""


@dataclass
class BadSample:
    shard: str
    key: str
    reason: str

    def message(self) -> str:
        return f"shard {self.shard}, key {self.key}: {self.reason}"


class _ShardBroken(Exception):
    def __init__(self, key: str, reason: str):
        super().__init__(reason)
        self.key, self.reason = key, reason


# -- shard lists ---------------------------------------------------------------------------------

def expand_shards(pattern: str) -> list[str]:
    """Shard URLs of a directory, brace pattern, glob, `a::b` list or pipe: URL."""
    if not pattern:
        raise DpldmError("data: no shards given (empty path; set data.public / data.private / data.test)")
    if os.path.isdir(pattern):
        shards = sorted(str(p) for p in Path(pattern).glob("*.tar"))
        if not shards:
            raise DpldmError(f"data: directory {pattern} holds no *.tar shards")
        return shards
    shards = []
    for url in expand_urls(pattern):
        if url.startswith("pipe:") or "://" in url:
            shards.append(url)
        elif any(c in url for c in "*?["):
            matched = sorted(glob.glob(url))
            if not matched:
                raise DpldmError(f"data: pattern {url} matches no files")
            shards.extend(matched)
        elif not os.path.isfile(url):
            raise DpldmError(f"data: shard {url} does not exist (from {pattern})")
        else:
            shards.append(url)
    return shards


_BLOCK = 512


class _Prepended:
    """A read-only stream: `head` bytes, then the rest of `stream` (to hand tarfile a stream already peeked at)."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n is None or n < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out + (self.stream.read(n - len(out)) if len(out) < n else b"")


def _read_exact(stream, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _checksum_ok(block: bytes) -> bool:
    try:
        stored = int(block[148:156].strip(b" \0") or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(block[:148]) + 256 + sum(block[156:])     # the checksum field counts as 8 spaces


def _number(field: bytes) -> int:
    if field[0] & 0x80:                      # GNU base-256
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b" \0") or b"0", 8)


def _pax_records(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _tar_files(stream) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file of a tar stream. Uncompressed ustar / GNU / pax tars (what webdataset and
    img2dataset write) are parsed here, block by block: 5-10x less Python per member than tarfile, which reads
    loading 30,000 samples in ~10 s. Anything else (gzip, ...) goes to tarfile. Like tarfile's stream mode, the
    archive ends at a zero, missing or invalid header after the first (the pack manifest check reports lost samples);
    a header or member data cut short raises tarfile.ReadError."""
    block = _read_exact(stream, _BLOCK)
    if len(block) < _BLOCK or not _checksum_ok(block):
        tar = tarfile.open(fileobj=_Prepended(block, stream), mode="r|*")
        for info in tar:
            if info.isreg():
                data = tar.extractfile(info).read()
                tar.members = []
                yield info.name, data
        return
    long_name, pax = None, {}
    while len(block) == _BLOCK and _checksum_ok(block):
        size = int(pax["size"]) if "size" in pax else _number(block[124:136])
        data = _read_exact(stream, size)
        if len(data) < size:
            raise tarfile.ReadError("unexpected end of data")
        _read_exact(stream, -size % _BLOCK)
        flag = block[156:157]
        if flag == b"L":                     # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif flag == b"x":                   # pax header of the next member
            pax = _pax_records(data)
        elif flag != b"g":                   # (a pax global header changes nothing read here)
            if flag in (b"0", b"\0", b"7"):
                name = block[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if prefix and block[257:262] == b"ustar" and not block[257:265] == b"ustar  \0":
                    name = f"{prefix}/{name}"
                yield long_name or pax.get("path") or name, data
            long_name, pax = None, {}
        block = _read_exact(stream, _BLOCK)
        if 0 < len(block) < _BLOCK:
            raise tarfile.ReadError("truncated header")


def _read_shard(url: str) -> Iterator[dict]:
    """Raw records {"__key__", "__url__", ext: bytes} of one shard; _ShardBroken on a bad tar."""
    last_key, current = "(start of shard)", None
    stream, completed = None, False
    try:
        stream = gopen(url, "rb")
        for name, data in _tar_files(stream):
            if "/" not in name and name.startswith("__") and name.endswith("__"):
                continue
            prefix, suffix = base_plus_ext(name)
            if prefix is None:
                continue
            if current is not None and prefix != current["__key__"]:
                last_key = current["__key__"]
                yield current
                current = None
            if current is None:
                current = {"__key__": prefix, "__url__": url}
            current[suffix.lower()] = data
        if current is not None:
            last_key = current["__key__"]
            yield current
            current = None
        completed = True
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as e:
        where = f"at key {current['__key__']}" if current is not None else f"after key {last_key}"
        raise _ShardBroken(current["__key__"] if current is not None else last_key,
                           f"unreadable tar {where} ({type(e).__name__}: {e})") from None
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception as e:  # a pipe: command that exited non-zero
                if completed:
                    raise _ShardBroken(last_key, f"reading failed ({type(e).__name__}: {e})") from None


def _records(url: str) -> Iterator[dict | BadSample]:
    try:
        yield from _read_shard(url)
    except _ShardBroken as e:
        yield BadSample(url, e.key, e.reason)


def reader_records(shards: list[str], reader: int, readers: int) -> Iterator[dict | BadSample]:
    """The records of reader `reader` of `readers` under the splitting rule in the module docstring."""
    whole = len(shards) // readers * readers
    for url in shards[reader:whole:readers]:
        yield from _records(url)
    j = 0
    for url in shards[whole:]:
        for rec in _records(url):
            if isinstance(rec, BadSample):
                if j % readers == reader:  # one reader reports a leftover shard's failure
                    yield rec
                continue
            if j % readers == reader:
                yield rec
            j += 1


# -- decoding --------------------------------------------------------------------------------------

def record_label(rec: dict) -> Optional[int]:
    if "cls" in rec:
        try:
            return int(rec["cls"].decode("utf-8").strip())
        except (ValueError, UnicodeDecodeError):
            raise ValueError(f".cls is not an integer ({rec['cls'][:20]!r})") from None
    if "json" in rec:
        try:
            label = json.loads(rec["json"]).get("label")
        except (ValueError, AttributeError):
            return None
        if isinstance(label, int) and not isinstance(label, bool):
            return label
    return None


def record_text(rec: dict) -> str:
    for ext in ("txt", "caption"):
        if ext in rec:
            return rec[ext].decode("utf-8", errors="replace").strip()
    if "json" in rec:
        try:
            caption = json.loads(rec["json"]).get("caption")
        except (ValueError, AttributeError):
            return ""
        return caption if isinstance(caption, str) else ""
    return ""


def decode_record(rec: dict, resolution: Optional[int], channels: Optional[int], transform: str = "resize",
                  require_label: bool = False) -> dict:
    """Raw record → {"pixels": float32 [C,H,W] in [-1,1], "label", "text", "key", "shard"}.
    resolution/channels None keep the image's own. ValueError for bad data, DpldmError for a config
    that cannot apply (e.g. 4 channels from a gray image)."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in rec), None)
    if ext is None:
        raise ValueError(f"no image in the sample (looked for .{', .'.join(IMAGE_EXTENSIONS)})")
    label = record_label(rec)
    if label is None:
        if require_label:
            raise ValueError("missing .cls label (labels are required here)")
        label = -1
    try:
        img = decode_image(rec[ext])
    except Exception as e:
        raise ValueError(f".{ext} is not a decodable image ({type(e).__name__})") from None
    if channels is None:
        channels = 1 if img.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    img = convert_channels(img, channels)
    if resolution is not None:
        img = fit_resolution(img, resolution, transform)
    return {"pixels": to_float_chw(img), "label": label, "text": record_text(rec),
            "key": rec["__key__"], "shard": rec["__url__"]}


def _tar_names(path: str) -> Iterator[str]:
    """Member names of a plain (uncompressed) tar, read from headers only (skipping data by seek):
    much faster than tarfile on shards of tiny files. Handles ustar prefixes, GNU long names, pax paths."""
    with open(path, "rb") as f:
        size_total = os.fstat(f.fileno()).st_size
        long_name = None
        while True:
            header = f.read(512)
            if len(header) < 512 or header == bytes(512):
                if len(header) and len(header) < 512:
                    raise tarfile.ReadError("unexpected end of data")
                return
            if sum(header) - sum(header[148:156]) + 256 != tarfile.nti(header[148:156]):
                raise tarfile.ReadError(f"bad header checksum at byte {f.tell() - 512}")
            size = tarfile.nti(header[124:136])
            kind = header[156:157]
            padded = (size + 511) // 512 * 512
            if f.tell() + padded > size_total:
                raise tarfile.ReadError("unexpected end of data")
            if kind in (b"L", b"x", b"g"):
                data = f.read(padded)[:size]
                if kind == b"L":
                    long_name = data.rstrip(b"\0").decode("utf-8", "replace")
                elif kind == b"x":
                    for rec in data.split(b"\n"):
                        if b" path=" in rec:
                            long_name = rec.split(b" path=", 1)[1].decode("utf-8", "replace")
                continue
            name = header[:100].rstrip(b"\0").decode("utf-8", "replace")
            prefix = header[345:500].rstrip(b"\0").decode("utf-8", "replace") if header[257:262] == b"ustar" else ""
            if prefix:
                name = prefix + "/" + name
            if long_name is not None:
                name, long_name = long_name, None
            f.seek(padded, 1)
            if kind in (b"0", b"\0", b"7"):
                yield name


def count_samples(pattern: str) -> int:
    """Number of samples (distinct consecutive keys) in all shards; DpldmError on an unreadable shard."""
    total = 0
    for url in expand_shards(pattern):
        try:
            if url.startswith("pipe:") or "://" in url:
                total += sum(1 for _ in _read_shard(url))
                continue
            with open(url, "rb") as f:
                plain = f.read(262)[257:262] == b"ustar"
            names = _tar_names(url) if plain else (m.name for m in tarfile.open(url, "r:*") if m.isreg())
            last = None
            for name in names:
                if "/" not in name and name.startswith("__") and name.endswith("__"):
                    continue
                prefix, _ = base_plus_ext(name)
                if prefix is not None and prefix != last:
                    total, last = total + 1, prefix
        except _ShardBroken as e:
            raise DpldmError(f"shard {url}, key {e.key}: {e.reason}") from None
        except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as e:
            raise DpldmError(f"shard {url}: unreadable tar ({type(e).__name__}: {e})") from None
    return total


def manifest_count(pattern: str) -> Optional[int]:
    """The sample count `dpldm data pack` recorded in DIR/dataset.json for a shard directory (None: no manifest,
    e.g. shards written by another tool, or a pattern rather than a directory)."""
    meta = Path(pattern) / "dataset.json"
    if "://" in pattern or pattern.startswith("pipe:") or not meta.is_file():
        return None
    try:
        return int(json.loads(meta.read_text())["count"])
    except (ValueError, KeyError, TypeError) as e:
        raise DpldmError(f"{meta}: malformed pack manifest (expected a 'count'; {e})") from None


def check_complete(pattern: str, read: int, log=_log) -> None:
    """DpldmError when a private set yielded fewer or more samples than its pack manifest counts (shards copied
    half-way, a full node-local disk): training on what is left would silently change N. Without a manifest, a
    notice says the count cannot be checked."""
    expected = manifest_count(pattern)
    if expected is None:
        log(f"data: {pattern} has no dataset.json manifest: its sample count ({read}) cannot be checked")
    elif read != expected:
        raise DpldmError(f"data: read {read} samples from {pattern} but its dataset.json counts {expected}: the "
                         "shards are truncated or incomplete (copied half-way? a disk filled up?); re-copy or re-pack")


# -- writing -------------------------------------------------------------------------------------

class ShardWriter:
    """Samples → OUT/<pattern % shard number> tars of at most `maxcount` samples each (a context manager);
    `paths` lists the shards written. Images are PIL images, uint8 arrays ([H,W] gray, [H,W,C]) or bytes already
    encoded in `fmt`."""

    def __init__(self, out_dir: str | Path, pattern: str = "shard-%06d.tar", *, maxcount: int = 10000,
                 start_shard: int = 0, mtime: int | None = None):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        # an integer mtime: with webdataset's float default, tarfile adds a pax header to every member
        self._sink = wds.ShardWriter(str(self.out / pattern), maxcount=maxcount, start_shard=start_shard,
                                     verbose=0, mtime=int(time.time()) if mtime is None else mtime)
        self.paths: list[str] = []

    def write(self, key: str, image, *, fmt: str = "png", label: int | None = None, text: str | None = None,
              meta: dict | None = None) -> None:
        sample = {"__key__": key, fmt: image if isinstance(image, bytes) else encode_image(image, fmt)}
        if label is not None:
            sample["cls"] = str(int(label)).encode()
        if text is not None:
            sample["txt"] = text.encode()
        if meta is not None:
            sample["json"] = json.dumps(meta).encode()
        self._sink.write(sample)
        if self._sink.fname and (not self.paths or self.paths[-1] != self._sink.fname):
            self.paths.append(self._sink.fname)

    def close(self) -> None:
        self._sink.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
