"""The murmur2 partitioner must agree with Kafka's Java client byte for byte."""

from __future__ import annotations

import pytest

from orchestrator.protocol.partitioning import murmur2, partition_for

# Values from Apache Kafka's own tests of Utils.murmur2.
JAVA_VECTORS = [
    ("21", -973932308),
    ("foobar", -790332482),
    ("a-little-bit-long-string", -985981536),
    ("a-little-bit-longer-string", -1486304829),
    ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    ("abc", 479470107),
]


@pytest.mark.parametrize(("key", "expected"), JAVA_VECTORS)
def test_murmur2_matches_the_java_client(key: str, expected: int) -> None:
    assert murmur2(key.encode()) == expected


def test_partition_is_the_positive_hash_modulo_the_count() -> None:
    assert partition_for(b"abc", 4) == (479470107 & 0x7FFFFFFF) % 4
    assert partition_for(b"21", 7) == (-973932308 & 0x7FFFFFFF) % 7
    assert all(0 <= partition_for(str(i).encode(), 12) < 12 for i in range(1000))
