/* 5-tuple hash for the ring slot: murmur3's 32-bit mixing over the flow key. The same
 * program on every node gives the same slot, so a standby picks the same backend. */
#ifndef HALB_HASH_H
#define HALB_HASH_H

#include "structs.h"

static __always_inline __u32 rotl32(__u32 x, int r)
{
	return (x << r) | (x >> (32 - r));
}

static __always_inline __u32 mix32(__u32 h, __u32 k)
{
	k *= 0xcc9e2d51;
	k = rotl32(k, 15);
	k *= 0x1b873593;
	h ^= k;
	h = rotl32(h, 13);
	return h * 5 + 0xe6546b64;
}

static __always_inline __u32 flow_hash(const struct flow_key *key)
{
	__u32 h = 0x9747b28c ^ key->proto;

#pragma unroll
	for (int i = 0; i < 4; i++) {
		h = mix32(h, key->src[i]);
		h = mix32(h, key->dst[i]);
	}
	h = mix32(h, ((__u32)key->sport << 16) | key->dport);
	/* murmur3 finaliser: every input bit reaches every output bit. */
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

#endif
