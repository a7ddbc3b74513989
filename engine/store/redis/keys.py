"""Key layout of the Redis store: one set of key names for a standalone Redis and a cluster.

`{...}` is a hash tag (a cluster places a key by the CRC16 of its tag only; a standalone Redis
ignores it). `{g}` pins the item counters, their log and the meta keys to one slot, so one
script updates them together; a user's keys carry the tag of the user's own slot, so they sit
together on one shard and users spread over all of them. Table: docs/feature_store.md.
"""
from __future__ import annotations

import functools
import itertools
import string
from binascii import crc_hqx

SLOTS = 16384               # Redis Cluster hash slots

META, CATALOG, LOCK = "meta:{g}:bundle", "meta:{g}:catalog", "meta:{g}:seed"
IMP, POS, HOT, LOG = "item:{g}:imp", "item:{g}:pos", "item:{g}:hot", "item:{g}:log"
EPOCH = "meta:{g}:epoch"


def _crc_slot(text: str) -> int:
    return crc_hqx(text.encode(), 0) % SLOTS


META_SLOT = _crc_slot("g")


@functools.cache
def slot_tags() -> tuple[str, ...]:
    """For each cluster slot, the first string over [0-9a-zA-Z] (shorter first) whose CRC16 lands
    in it: the hash tag that pins a key to that slot. Every server derives the same table."""
    tags: list[str | None] = [None] * SLOTS
    left = SLOTS
    for n in (1, 2, 3):     # all 16,384 slots are hit within 3 characters
        for chars in itertools.product(string.digits + string.ascii_letters, repeat=n):
            tag = "".join(chars)
            s = _crc_slot(tag)
            if tags[s] is None:
                tags[s], left = tag, left - 1
        if not left:
            return tuple(tags)
    raise AssertionError("slot tag table incomplete")


def user_slot(user_id: str) -> int:
    return _crc_slot(user_id)


def user_key(user_id: str, slot: int | None = None) -> str:
    """Prefix of the user's keys (`u:{T}:<user id>:`); + recent, seen or n."""
    return f"u:{{{slot_tags()[user_slot(user_id) if slot is None else slot]}}}:{user_id}:"


def stamp_key(slot: int) -> str:
    """Key whose value is the bundle version of the state in `slot` (cluster)."""
    return META if slot == META_SLOT else f"s:{{{slot_tags()[slot]}}}"


class Stamp:
    """The bundle version this process reads and writes the DB under (the stamps' value, checked
    by every read and script): its bundle's, or that of the bundle whose state a DB over the
    same catalog holds. Live state belongs to the catalog, not the model (as the embedded
    store's shared arrays do), so a process on another model version over that catalog (a
    replica started after a hot roll, whose peers kept the DB's stamp) follows it instead of
    refusing it. One object shared by reader, writer, mirror and seeder: they switch together."""

    def __init__(self, version: str):
        self.set(version)

    def set(self, version: str) -> None:
        self.name, self.raw = version, version.encode()


def seq_key(slot: int, writer: str) -> str:
    """Key holding the last event sub-batch one server process applied to `slot`."""
    return f"ev:{{{slot_tags()[slot]}}}:{writer}"
