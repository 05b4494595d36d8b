// SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause)
/* The floor of any program that must look its flow up (bench/xdp_cost.py only): the
 * minimal XDP_TX program plus one lookup in the production flows map (same LRU hash,
 * same 40-byte key). The key is filled from an IPv4/TCP frame with word loads at fixed
 * offsets after one bounds check: no parsing, no filter, nothing else. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "constants.h"
#include "maps.h"
#include "structs.h"

SEC("xdp")
int halb_floor(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct flow_key key = {};
	void *ip = data + 14;

	if (ip + 24 > data_end)
		return XDP_PASS;
	key.src[0] = *(__u32 *)(ip + 12);
	key.dst[0] = *(__u32 *)(ip + 16);
	key.sport = *(__u16 *)(ip + 20);
	key.dport = *(__u16 *)(ip + 22);
	key.proto = *(__u8 *)(ip + 9);
	key.family = HALB_FAMILY_V4;
	return bpf_map_lookup_elem(&flows, &key) ? XDP_TX : XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
